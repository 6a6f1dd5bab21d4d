"""Swin Transformer: hierarchical vision transformer with shifted windows.

Paper: Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
ICCV 2021, https://arxiv.org/abs/2103.14030 (Swin-T: C=96, depths 2-2-6-2, heads 3-6-12-24).

A patch embedding (P x P patches -> C channels, LayerNorm) gives an (H/P, W/P) grid. Four stages
follow; stages 2-4 first merge each 2x2 neighbourhood (concat 4C -> LayerNorm -> Linear to 2C),
halving the grid. Each block is pre-norm attention + MLP like ViT, but attention is restricted to
non-overlapping M x M windows (W-MSA) with a learned relative position bias; every second block
cyclically shifts the grid by M/2 first (SW-MSA) so information crosses window borders, and an
attention mask stops tokens that were not neighbours before the shift from attending to each other.

Implementation note: a window partition is just a permutation of the tokens, and LayerNorm, the
MLP and the residual add are per token, so the blocks of a stage keep the residual stream in the
current block's window order and move between orders with ONE gather per block (timm does roll +
partition + reverse + roll: four copies). Parameter names follow timm (`layers.1.downsample.reduction`,
`layers.0.blocks.1.attn.relative_position_bias_table`, ...); timm's `head.fc` is our `head`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imgarena.errors import UserError
from imgarena.models._base import MATCH_PREV_GROUP, ClassifierMixin
from imgarena.models._layers import (DropPath, Mlp, PatchEmbed, fused_cpu_inference, init_linears_, linear,
                                     linear_residual, split_heads, trunc_normal_)
from imgarena.models._registry import register_family


# --- token orders -------------------------------------------------------------------------------

def window_order(H: int, W: int, window: int, shift: int) -> torch.Tensor:
    """Raster index of each token listed window by window (windows row-major, tokens row-major inside).

    With `shift`, the grid is first rolled by -shift on both axes (the paper's cyclic shift), so
    window-order position p holds raster token (r + shift) % H, (c + shift) % W.
    """
    # Index tables are built on the CPU even under a `torch.device("meta")` context (shape-only builds).
    rows = (torch.arange(H, device="cpu") + shift) % H
    cols = (torch.arange(W, device="cpu") + shift) % W
    raster = rows[:, None] * W + cols[None, :]  # (H, W): raster index of the shifted grid
    nh, nw = H // window, W // window
    return raster.reshape(nh, window, nw, window).permute(0, 2, 1, 3).reshape(-1)  # (nh, nw, M, M) flattened


class _PermuteTokens(torch.autograd.Function):
    """x[:, idx] whose backward is the inverse gather (the default backward is a slower scatter-add)."""

    @staticmethod
    def forward(ctx, x, idx, inv):
        ctx.save_for_backward(inv)
        return x.index_select(1, idx)

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        return grad.index_select(1, inv), None, None


def permute_tokens(x: torch.Tensor, idx: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Reorder the tokens of x (B, L, C): out[:, i] = x[:, idx[i]]; `inv` is idx's inverse permutation."""
    if x.requires_grad and torch.is_grad_enabled() and not torch.jit.is_tracing():
        return _PermuteTokens.apply(x, idx, inv)
    return x.index_select(1, idx)


def shifted_window_mask(H: int, W: int, window: int, shift: int) -> torch.Tensor:
    """(nW, N, N) additive mask for SW-MSA: -100 between tokens from different pre-shift regions.

    After the roll, a border window holds pieces of up to 4 regions that were not adjacent in the
    image; labelling the 3x3 slabs of the shifted grid and comparing labels gives the mask (the
    paper's and timm's -100, which softmax turns into ~0 weight).
    """
    label = torch.zeros(H, W, device="cpu")
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            label[hs, ws] = cnt
            cnt += 1
    # `label` is indexed in shifted coordinates; window order of the shifted grid is window_order(.., 0).
    lab = label.reshape(-1)[window_order(H, W, window, 0)].reshape(-1, window * window)  # (nW, N)
    diff = lab[:, None, :] - lab[:, :, None]  # (nW, N, N)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) index into the (2M-1)^2 bias table for every pair of tokens in an M x M window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window, device="cpu"), torch.arange(window, device="cpu"),
                                       indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2), each in [-(M-1), M-1]
    rel = rel + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


# --- blocks -------------------------------------------------------------------------------------

class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, plus a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim, self.window_area = num_heads, dim // num_heads, window * window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        index = relative_position_index(window).reshape(-1).to(torch.empty(0).device)  # build device (maybe meta)
        self.register_buffer("relative_position_index", index, persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def rel_pos_bias(self) -> torch.Tensor:
        N = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index].view(N, N, -1)  # (N, N, heads)
        return bias.permute(2, 0, 1).unsqueeze(0)  # (1, heads, N, N)

    def attend(self, x: torch.Tensor, mask: torch.Tensor | None = None, fused: bool = False) -> torch.Tensor:
        """x: (B*nW, N, C) windows; mask: (nW, N, N) additive shift mask or None -> (B*nW, N, C) before `proj`."""
        B_, N, C = x.shape
        q, k, v = split_heads(linear(x, self.qkv, fused), self.num_heads)  # each (B*nW, heads, N, d)
        bias = self.rel_pos_bias()  # (1, heads, N, N)
        if mask is not None:
            bias = bias + mask.unsqueeze(1)  # (nW, heads, N, N): small, shared by every image
        if torch.is_grad_enabled():
            # Training: explicit attention. With a learned bias, SDPA would take its math path anyway
            # (plus a "safe softmax" pass), and the per-window mask is added by broadcasting over the
            # batch instead of being materialised at (B*nW, heads, N, N).
            nW = bias.shape[0]
            attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)  # (B*nW, heads, N, N)
            attn = (attn.view(B_ // nW, nW, self.num_heads, N, N) + bias).view(B_, self.num_heads, N, N)
            attn = F.dropout(attn.softmax(dim=-1), self.attn_drop, self.training)
            x = attn @ v  # (B*nW, heads, N, d)
        else:  # inference: the fused kernel, which never stores the attention matrix
            if mask is not None:
                bias = bias.expand(B_ // bias.shape[0], -1, -1, -1, -1).reshape(B_, self.num_heads, N, N)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return x.transpose(1, 2).reshape(B_, N, C)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj_drop(self.proj(self.attend(x, mask)))


class SwinTransformerBlock(nn.Module):
    """(S)W-MSA block on tokens already in this block's window order: (B, L, C) -> (B, L, C)."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, L, C = x.shape
        windows = self.norm1(x).view(-1, self.window * self.window, C)  # (B*nW, N, C): consecutive tokens
        if self.training and (isinstance(self.drop_path1, DropPath) or self.attn.proj_drop.p > 0):
            x = x + self.drop_path1(self.attn(windows, mask).view(B, L, C))
            return x + self.drop_path2(self.mlp(self.norm2(x)))
        # Without stochastic depth the residual adds fold into the output projections (same values).
        fused = fused_cpu_inference(x, self)
        x = linear_residual(self.attn.attend(windows, mask, fused), self.attn.proj, x.view_as(windows), fused)
        x = x.view(B, L, C)
        return self.mlp.forward_residual(self.norm2(x), x)


class PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood (4C), LayerNorm, Linear to 2C: (B, H, W, C) -> (B, H/2, W/2, 2C)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        # (B, H/2, dh, W/2, dw, C) -> (B, H/2, W/2, dw, dh, C): the paper's order x0,x1,x2,x3 =
        # (0,0), (1,0), (0,1), (1,1) offsets, which is what the reference weights expect.
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinTransformerStage(nn.Module):
    """Optional PatchMerging, then `depth` blocks alternating W-MSA and SW-MSA. NHWC in, NHWC out."""

    def __init__(self, dim: int, out_dim: int, grid: tuple[int, int], depth: int, downsample: bool, num_heads: int,
                 window: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: list[float] | None = None):
        super().__init__()
        self.downsample = PatchMerging(dim, out_dim) if downsample else nn.Identity()
        H, W = grid  # grid after the downsample
        self.grid = grid
        # A window as big as the grid needs no shifting (the whole map is one window), as in the paper.
        shift = 0 if min(H, W) <= window else window // 2
        window = min(window, H, W)
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(out_dim, num_heads, window, 0 if i % 2 == 0 else shift, mlp_ratio, qkv_bias,
                                 proj_drop, attn_drop, (drop_path or [0.0] * depth)[i])
            for i in range(depth)])
        # Gathers between orders: raster -> block 0, block i-1 -> block i, last block -> raster.
        orders = [window_order(H, W, window, b.shift) for b in self.blocks]
        raster = torch.arange(H * W, device="cpu")
        steps = []
        for prev, cur in zip([raster] + orders, orders + [raster]):
            idx = torch.argsort(prev)[cur]  # position in `prev` order of each token of `cur` order
            steps.append(torch.stack([idx, torch.argsort(idx)]))
        # A grid that is one single window is already in window order: skip those gathers.
        self.reorder_needed = [not torch.equal(st[0], raster) for st in steps]
        # Tables are computed on the CPU, then moved to the device being built on (e.g. "meta").
        device = torch.empty(0).device
        self.register_buffer("reorder", torch.stack(steps).to(device), persistent=False)  # (depth+1, 2, H*W)
        mask = shifted_window_mask(H, W, window, shift).to(device) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)  # (nW, N, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        for i, blk in enumerate(self.blocks):
            if self.reorder_needed[i]:
                x = permute_tokens(x, self.reorder[i, 0], self.reorder[i, 1])
            x = blk(x, self.attn_mask if blk.shift else None)
        if self.reorder_needed[-1]:
            x = permute_tokens(x, self.reorder[-1, 0], self.reorder[-1, 1])
        return x.reshape(B, H, W, C)


# --- model --------------------------------------------------------------------------------------

def _stage_grids(img_size: int, patch_size: int, window_size: int, num_stages: int) -> list[int]:
    """Grid side per stage, stopping at the first stage that cannot be windowed (or halved into)."""
    g, grids = (img_size // patch_size if img_size % patch_size == 0 else 0), []
    for i in range(num_stages):
        if i > 0:
            if g % 2:
                break
            g //= 2
        if g == 0 or (g > window_size and g % window_size):  # a grid <= window is one window
            break
        grids.append(g)
    return grids


def check_swin_sizes(img_size: int, patch_size: int, window_size: int, num_stages: int) -> list[tuple[int, int]]:
    """Per-stage grid sizes; ValueError naming working img_sizes when the grid and windows don't divide."""
    grids = _stage_grids(img_size, patch_size, window_size, num_stages)
    if len(grids) == num_stages:
        return [(g, g) for g in grids]
    ok = lambda n: len(_stage_grids(n, patch_size, window_size, num_stages)) == num_stages  # noqa: E731
    below = next((n for n in range(img_size - 1, patch_size - 1, -1) if ok(n)), None)
    above = next(n for n in range(img_size + 1, 64 * img_size) if ok(n))
    near = " or ".join(str(n) for n in (below, above) if n)
    raise UserError(
        f"swin: img_size {img_size} with patch_size {patch_size} gives a {img_size / patch_size:g}x"
        f"{img_size / patch_size:g} patch grid that cannot be halved {num_stages - 1} times into "
        f"{window_size}x{window_size} windows (stage {len(grids) + 1} does not divide); "
        f"use img_size {near}, or another window_size/patch_size")


class SwinTransformer(ClassifierMixin, nn.Module):
    """Swin Transformer; `embed_dim` C doubles at every stage, `window_size` M, `depths`, `num_heads`."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, patch_size: int = 4,
                 window_size: int = 7, embed_dim: int = 96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        grids = check_swin_sizes(img_size, patch_size, window_size, len(depths))
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        self.num_features = dims[-1]
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, norm_layer=nn.LayerNorm,
                                      output_fmt="NHWC")  # (B, H/P, W/P, C)
        n = sum(depths)
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # stochastic depth grows with depth
        self.layers = nn.Sequential(*[
            SwinTransformerStage(dims[max(i - 1, 0)], dims[i], grids[i], depths[i], i > 0, num_heads[i], window_size,
                                 mlp_ratio, qkv_bias, proj_drop_rate, attn_drop_rate,
                                 dpr[sum(depths[:i]):sum(depths[:i + 1])])
            for i in range(len(depths))])
        self.norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's init: truncated-normal(0.02) Linear weights and bias tables, zero biases."""
        init_linears_(self)
        for m in self.modules():
            if isinstance(m, WindowAttention):
                trunc_normal_(m.relative_position_bias_table, std=0.02)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, H/(P*8), W/(P*8), 8C) normalized NHWC features."""
        x = self.layers(self.patch_embed(x))
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=(1, 2)))  # global average pooling: (B, 8C)
        return x if pre_logits else self.head(x)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's grouping: patch embedding, each stage's downsample and blocks (each stage when coarse), head."""
        return dict(stem=r"^patch_embed", blocks=r"^layers\.(\d+)" if coarse else [
            (r"^layers\.(\d+)\.downsample", (0,)), (r"^layers\.(\d+)\.\w+\.(\d+)", None),
            (r"^norm", (MATCH_PREV_GROUP,))])

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}

    def explain_grid(self, feats: torch.Tensor, input_hw) -> torch.Tensor:
        """Explain contract: the last stage's (B, h, w, C) token grid as (B, C, h, w). Attention is
        windowed, so there is no global attention to roll out (the default attention_trace says so)."""
        return feats.permute(0, 3, 1, 2)


VARIANTS = {
    "swin_t": dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                   _paper=True, _timm="swin_tiny_patch4_window7_224"),
    # Small inputs: 32 px / patch 2 = 16x16 grid -> 16, 8, 4, 2 per stage with 4x4 windows
    # (the 4x4 and 2x2 stages are a single window, so they are not shifted).
    "swin_t_cifar": dict(img_size=32, patch_size=2, window_size=4, embed_dim=96, depths=(2, 2, 6, 2),
                         num_heads=(3, 6, 12, 24)),
}


def build_swin(**kwargs) -> SwinTransformer:
    return SwinTransformer(**kwargs)


register_family(VARIANTS, build_swin, family="swin")
