"""Vision Transformer (ViT).

Paper: Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale", ICLR 2021, https://arxiv.org/abs/2010.11929 (Table 1: Base/Large/Huge); Ti and S widths from
Touvron et al., "Training data-efficient image transformers" (DeiT), https://arxiv.org/abs/2012.12877.

The image is cut into N = (H/P)*(W/P) patches, each linearly projected to D dims; a learned class
token is prepended and a learned position embedding added, giving z0 of shape (N+1, D). Each of
`depth` pre-norm blocks computes

    z' = z + MSA(LN(z))       multi-head self-attention, `num_heads` heads of D/heads dims
    z  = z' + MLP(LN(z'))     Linear(D, mlp_dim) - GELU - Linear(mlp_dim, D)

then LayerNorm; the class token's output (or the mean of the patch tokens) feeds a linear head.
Module and parameter names are timm's, so timm checkpoints load directly.

`distilled=True` adds DeiT's distillation token (Touvron et al., Sec. 4): one more learned prefix
token whose output feeds its own head, `head_dist`, trained on a teacher's predictions while the
class head (or the average-pooled head) learns the labels. With `set_distilled_training(True)` a
model in train mode returns (logits, dist_logits) for the distillation loss; otherwise (eval,
predict, export) it returns their average, DeiT's inference rule.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imgarena.errors import UserError
from imgarena.models._base import MATCH_PREV_GROUP, AttentionTrace, ClassifierMixin
from imgarena.models._layers import (DropPath, Mlp, PatchEmbed, fused_cpu_inference, init_linears_, linear,
                                     linear_residual, split_heads, trunc_normal_)
from imgarena.models._registry import register_family


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None,
                       num_prefix_tokens: int = 1) -> torch.Tensor:
    """Bicubically resize a learned (1, prefix + gh*gw, D) position embedding to another patch grid.

    Prefix tokens (the class token) keep their embedding; the grid part is treated as a D-channel
    image. Used when the input size differs from the size the embedding was trained for.
    """
    n_old = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = int(math.isqrt(n_old))
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    D = grid.shape[-1]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and `F.scaled_dot_product_attention`."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise UserError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def attend(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """Attention output before the output projection: (B, N, C) -> (B, N, h*d)."""
        B, N, C = x.shape
        q, k, v = split_heads(linear(x, self.qkv, fused), self.num_heads)  # each (B, h, N, d)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return x.transpose(1, 2).reshape(B, N, C)  # (B, N, h*d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.proj(self.attend(x)))

    def forward_residual(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        """shortcut + attention(x), the add folded into the output projection (see `linear_residual`)."""
        if self.training and self.proj_drop.p > 0:
            return shortcut + self(x)
        fused = fused_cpu_inference(x, self)
        return linear_residual(self.attend(x, fused), self.proj, shortcut, fused)


class Block(nn.Module):
    """Pre-norm transformer encoder block: z + MSA(LN(z)), then z + MLP(LN(z))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, qkv_bias: bool = True, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and isinstance(self.drop_path1, DropPath):
            x = x + self.drop_path1(self.attn(self.norm1(x)))  # (B, N, D)
            return x + self.drop_path2(self.mlp(self.norm2(x)))
        # Without stochastic depth the residual adds fold into the output projections (same values).
        x = self.attn.forward_residual(self.norm1(x), x)
        return self.mlp.forward_residual(self.norm2(x), x)


class _DistilledHead(nn.Module):
    """The classifier of a distilled ViT as one module: (B, 2D) pooled features (class readout, then
    distillation token) -> the average of the two heads' logits. It holds the model's own two head
    modules (the same parameters), so training or freezing it trains or freezes them."""

    def __init__(self, head: nn.Module, head_dist: nn.Module):
        super().__init__()
        self.head, self.head_dist = head, head_dist

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, x_dist = x.chunk(2, dim=-1)
        return (self.head(x) + self.head_dist(x_dist)) / 2


class VisionTransformer(ClassifierMixin, nn.Module):
    """ViT. `global_pool="token"` classifies from the class token; `"avg"` averages the patch tokens
    (then, as in timm, the final LayerNorm is applied after pooling as `fc_norm`). `mlp_dim` overrides
    `mlp_ratio * embed_dim`. Inputs of another size (a multiple of the patch) resample the position
    embedding on the fly. `distilled` adds the distillation token after the class token (see the
    module docstring); its pooled features are the two readouts side by side, (B, 2 * embed_dim).
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, patch_size: int = 16,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 mlp_dim: int | None = None, qkv_bias: bool = True, class_token: bool = True,
                 global_pool: str = "token", drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, distilled: bool = False):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise UserError(f"global_pool must be 'token' or 'avg', not {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise UserError("global_pool='token' needs class_token=True; use global_pool='avg' without a class token")
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.num_features = self.embed_dim = embed_dim
        self.global_pool = global_pool
        self.distilled = bool(distilled)
        self.distilled_training = False  # set_distilled_training: train mode returns both heads' logits
        self.num_prefix_tokens = int(class_token) + int(self.distilled)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if self.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim))
        self.pos_drop = nn.Dropout(proj_drop_rate)
        mlp_dim = int(mlp_dim or embed_dim * mlp_ratio)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows with depth
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_dim, qkv_bias, proj_drop_rate, attn_drop_rate, dpr[i])
            for i in range(depth)])
        use_fc_norm = global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if self.distilled:
            self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's ViT init: truncated-normal(0.02) Linear weights and position embedding, zero biases."""
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            trunc_normal_(self.dist_token, std=0.02)  # as timm's VisionTransformerDistilled
        init_linears_(self)

    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        pos = self.pos_embed
        if grid != self.patch_embed.grid_size:  # another input size: resample the learned grid
            pos = resample_pos_embed(pos, grid, self.patch_embed.grid_size, self.num_prefix_tokens)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        if prefix:
            x = torch.cat([*prefix, x], dim=1)  # (B, prefix + N, D): [cls], [dist], patches
        return self.pos_drop(x + pos)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, prefix + N, D) token features."""
        grid = (x.shape[-2] // self.patch_embed.patch_size[0], x.shape[-1] // self.patch_embed.patch_size[1])
        x = self._pos_embed(self.patch_embed(x), grid)  # (B, 1+N, D)
        x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        feats = x
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)  # (B, D)
        x = self.head_drop(self.fc_norm(x))
        if not self.distilled:
            return x if pre_logits else self.head(x)
        # the distillation token is the last prefix token; fc_norm normalises it too when the
        # patch tokens are averaged (then the final norm is the identity)
        x_dist = self.head_drop(self.fc_norm(feats[:, self.num_prefix_tokens - 1]))  # (B, D)
        if pre_logits:
            return torch.cat([x, x_dist], dim=1)  # (B, 2D); get_classifier() maps it to forward's logits
        if self.distilled_training and self.training:
            return self.head(x), self.head_dist(x_dist)
        return (self.head(x) + self.head_dist(x_dist)) / 2

    # ---- distillation token (DeiT)
    def set_distilled_training(self, enable: bool = True) -> None:
        """Train mode returns (class head logits, distillation head logits) while enabled (the
        distillation loss trains each on its own target); eval mode always returns their average."""
        if enable and not self.distilled:
            raise ValueError("set_distilled_training needs a model built with distilled=True")
        self.distilled_training = bool(enable)

    def get_classifier(self) -> nn.Module:
        if not self.distilled:
            return self.head
        return _DistilledHead(self.head, self.head_dist)

    def reset_classifier(self, num_classes: int) -> None:
        super().reset_classifier(num_classes)
        if self.distilled:
            dev = next(self.parameters()).device
            self.head_dist = nn.Linear(self.embed_dim, num_classes).to(dev) if num_classes > 0 else nn.Identity()
            if isinstance(self.head_dist, nn.Linear):
                nn.init.trunc_normal_(self.head_dist.weight, std=0.02)
                nn.init.zeros_(self.head_dist.bias)

    # ---- fine-tuning contract (see _base.ClassifierMixin)
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's grouping: tokens, position embedding and patch embedding; each block (the final norm
        joins the last); the head (with fc_norm)."""
        return dict(stem=r"^cls_token|dist_token|pos_embed|patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (MATCH_PREV_GROUP,))])

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n in ("pos_embed", "cls_token", "dist_token")}

    # ---- explain contract (see _base.ClassifierMixin)
    def _grid(self, input_hw) -> tuple[int, int]:
        return input_hw[0] // self.patch_embed.patch_size[0], input_hw[1] // self.patch_embed.patch_size[1]

    def explain_features(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens entering the last block when the head reads the class token (after the last block,
        patch tokens no longer reach the logits, so their gradient would be zero); else the final tokens."""
        if self.global_pool != "token":
            return self.forward_features(x)
        return self.blocks[:-1](self._pos_embed(self.patch_embed(x), self._grid(x.shape[-2:])))

    def explain_head(self, feats: torch.Tensor) -> torch.Tensor:
        if self.global_pool != "token":
            return self.forward_head(feats)
        return self.forward_head(self.norm(self.blocks[-1](feats)))

    def explain_grid(self, feats: torch.Tensor, input_hw) -> torch.Tensor:
        """(B, prefix + h*w, D) tokens -> (B, D, h, w), the patch tokens in raster order."""
        h, w = self._grid(input_hw)
        return feats[:, self.num_prefix_tokens:].transpose(1, 2).reshape(feats.shape[0], -1, h, w)

    def attention_trace(self, x: torch.Tensor) -> AttentionTrace:
        """The forward with each block's attention probabilities computed explicitly and used, so the
        logits are a function of them (gradient-weighted rollout differentiates through them):
        `F.scaled_dot_product_attention` never materialises the probabilities. Eval mode: no dropout,
        no drop path, so the logits equal `forward(x)`."""
        z = self._pos_embed(self.patch_embed(x), self._grid(x.shape[-2:]))  # (B, prefix + N, D)
        B, T, D = z.shape
        attns: list[torch.Tensor] = []
        for blk in self.blocks:
            at = blk.attn
            q, k, v = split_heads(at.qkv(blk.norm1(z)), at.num_heads)  # each (B, h, T, d)
            a = torch.softmax((q @ k.transpose(-2, -1)) * at.head_dim ** -0.5, dim=-1)  # (B, h, T, T)
            attns.append(a)
            z = z + blk.drop_path1(at.proj_drop(at.proj((a @ v).transpose(1, 2).reshape(B, T, D))))
            z = z + blk.drop_path2(blk.mlp(blk.norm2(z)))
        logits = self.forward_head(self.norm(z))
        return AttentionTrace(logits, attns, self.num_prefix_tokens, self._grid(x.shape[-2:]),
                              "token" if self.global_pool == "token" else "avg")

VARIANTS = {
    # Paper variants at 224 px. Ti/S: DeiT widths; B/L/H: ViT Table 1.
    "vit_ti16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, _paper=True, _timm="vit_tiny_patch16_224"),
    "vit_s16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, _paper=True, _timm="vit_small_patch16_224"),
    "vit_b16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, _paper=True, _timm="vit_base_patch16_224"),
    "vit_l16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, _paper=True,
                    _timm="vit_large_patch16_224"),
    "vit_h14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, _paper=True, _timm="vit_huge_patch14_224"),
    "vit_s32": dict(patch_size=32, embed_dim=384, depth=12, num_heads=6, _paper=True, _timm="vit_small_patch32_224"),
    "vit_b32": dict(patch_size=32, embed_dim=768, depth=12, num_heads=12, _paper=True, _timm="vit_base_patch32_224"),
    "vit_l32": dict(patch_size=32, embed_dim=1024, depth=24, num_heads=16, _paper=True,
                    _timm="vit_large_patch32_224"),
    # Small-image variants (28-64 px): patch 4 gives 49 tokens at 28 px, 64 at 32 px (+ class token).
    "vit_t4": dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_dim=768),
    "vit_s4": dict(img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=6),
    # 7x7 patches of a 28 px image (16 tokens, averaged for the head), width 128, depth 4: ~7x vit_t4's
    # training speed on a CPU. Chosen by 10-minute Fashion-MNIST runs on 2 cores (test accuracy at
    # the end): depth 6 with a class token 88.8%, depth 6 averaged 89.1%, depth 4 averaged 89.0%
    # (11 epochs instead of 8), the same with --augment flip 89.3%.
    "vit_t7": dict(img_size=28, patch_size=7, embed_dim=128, depth=4, num_heads=4, mlp_dim=512,
                   class_token=False, global_pool="avg"),
}


def build_vit(**kwargs) -> VisionTransformer:
    return VisionTransformer(**kwargs)


register_family(VARIANTS, build_vit, family="vit")
