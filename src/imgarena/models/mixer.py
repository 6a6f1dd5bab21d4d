"""MLP-Mixer: an all-MLP architecture for vision.

Paper: Tolstikhin et al., "MLP-Mixer: An all-MLP Architecture for Vision", 2021,
https://arxiv.org/abs/2105.01601 (variants from its Table 1).

The image is cut into S = (H/P)*(W/P) patches, each linearly projected to C channels, giving a
table X of shape (S, C). Each of `num_blocks` Mixer layers applies (paper eq. 1)

    U[:, i] = X[:, i] + W2 GELU(W1 LayerNorm(X)[:, i])    for i = 1..C   (token mixing, W1: D_S x S)
    Y[j, :] = U[j, :] + W4 GELU(W3 LayerNorm(U)[j, :])    for j = 1..S   (channel mixing, W3: D_C x C)

then LayerNorm, global average pooling over the S tokens, and a linear head.

Implementation note (why the layout is (S, B, C)): token mixing multiplies every image's (S, C)
table from the left by W1. Keeping activations token-major, (S, B, C), makes that ONE matrix product
W1 (D_S, S) @ X (S, B*C) for the whole batch -- no transposes and no copies, and its weight gradient
is again one GEMM. Channel mixing is a plain Linear on the last axis in either layout. Parameter
names and shapes are timm's (`mlp_tokens.fc1.weight` is (D_S, S)), so timm checkpoints load as is.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from imgarena.models._base import MATCH_PREV_GROUP, ClassifierMixin
from imgarena.models._layers import DropPath, Mlp, PatchEmbed, fold_residuals, trunc_normal_
from imgarena.models._registry import register_family


class TokenMixingMlp(nn.Module):
    """The token-mixing MLP: W2 GELU(W1 X + b1) + b2 applied to every channel column of X.

    Stored like timm's Mlp over the token axis (fc1: S -> D_S, fc2: D_S -> S), but applied from the
    left to the token-major activation, so no transpose is ever materialised.
    """

    def __init__(self, num_tokens: int, tokens_mlp_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(num_tokens, tokens_mlp_dim)  # W1: (D_S, S)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(tokens_mlp_dim, num_tokens)  # W2: (S, D_S)
        self.drop2 = nn.Dropout(drop)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """GELU(W1 X + b1) for X = x viewed as (S, B*C): every (image, channel) column at once."""
        S, B, C = x.shape  # token-major
        h = torch.addmm(self.fc1.bias[:, None], self.fc1.weight, x.reshape(S, B * C))  # W1 X + b1: (D_S, B*C)
        return self.drop1(self.act(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        S, B, C = x.shape
        y = torch.addmm(self.fc2.bias[:, None], self.fc2.weight, self.hidden(x))  # (S, B*C)
        return self.drop2(y).view(S, B, C)

    def forward_residual(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        """shortcut + token-MLP(x), the add folded into the second GEMM (as `_layers.linear_residual`)."""
        if (self.training and self.drop2.p > 0) or not fold_residuals(x):
            return shortcut + self(x)
        S, B, C = x.shape
        y = torch.addmm(shortcut.reshape(S, B * C), self.fc2.weight, self.hidden(x))  # U = X + W2 H
        return y.add_(self.fc2.bias[:, None]).view(S, B, C)


class MixerBlock(nn.Module):
    """One Mixer layer: pre-LN token mixing, then pre-LN channel mixing, each with a skip connection."""

    def __init__(self, hidden_dim: int, num_tokens: int, tokens_mlp_dim: int, channels_mlp_dim: int,
                 drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.mlp_tokens = TokenMixingMlp(num_tokens, tokens_mlp_dim, drop)  # S -> D_S -> S
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.mlp_channels = Mlp(hidden_dim, channels_mlp_dim, drop=drop)  # C -> D_C -> C

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (S, B, C) -> (S, B, C); the channel MLP's hidden layer is (S, B, D_C).
        # DropPath drops per image, i.e. along axis 1: move that axis to the front for its mask.
        if isinstance(self.drop_path, DropPath) and self.training:
            x = x + self.drop_path(self.mlp_tokens(self.norm1(x)).transpose(0, 1)).transpose(0, 1)
            return x + self.drop_path(self.mlp_channels(self.norm2(x)).transpose(0, 1)).transpose(0, 1)
        # The skip connections are folded into the second GEMM of each MLP (same values, fewer passes).
        x = self.mlp_tokens.forward_residual(self.norm1(x), x)  # U = X + token-MLP(LN(X))
        return self.mlp_channels.forward_residual(self.norm2(x), x)  # Y = U + channel-MLP(LN(U))


class MlpMixer(ClassifierMixin, nn.Module):
    """MLP-Mixer with the paper's axes: `hidden_dim` C, `tokens_mlp_dim` D_S, `channels_mlp_dim` D_C,
    `num_blocks` layers, `patch_size` P. The sequence length S = (img_size/P)^2 follows from the input.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, patch_size: int = 16,
                 num_blocks: int = 8, hidden_dim: int = 512, tokens_mlp_dim: int = 256,
                 channels_mlp_dim: int = 2048, drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.num_features = hidden_dim
        # Per-patch fully connected layer, emitting the token-major (S, B, C) layout the trunk uses.
        self.stem = PatchEmbed(img_size, patch_size, in_chans, hidden_dim, output_fmt="LNC")
        self.num_tokens = self.stem.num_patches  # S
        self.blocks = nn.Sequential(*[
            MixerBlock(hidden_dim, self.num_tokens, tokens_mlp_dim, channels_mlp_dim, proj_drop_rate, drop_path_rate)
            for _ in range(num_blocks)])
        self.norm = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(hidden_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, S, C) normalized token features, like timm's."""
        x = self.stem(x)  # (S, B, C): token-major for the whole trunk
        x = self.blocks(x)  # (S, B, C)
        return self.norm(x).transpose(0, 1).contiguous()  # (B, S, C)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=1)  # global average pooling over tokens: (B, C)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's grouping: stem, one layer per Mixer block (the final norm joins the last), head."""
        return dict(stem=r"^stem", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (MATCH_PREV_GROUP,))])

    def explain_grid(self, feats: torch.Tensor, input_hw) -> torch.Tensor:
        """Explain contract: (B, S, C) tokens -> (B, C, H/P, W/P), the patch grid in raster order."""
        h, w = self.stem.grid_size
        return feats.transpose(1, 2).reshape(feats.shape[0], -1, h, w)

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's Mixer init: xavier-uniform Linear weights, tiny MLP biases, LeCun-normal stem, zero head
        (the paper zero-initialises the head so training starts from uniform predictions)."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if name.startswith("head"):
                    nn.init.zeros_(m.weight)
                    nn.init.zeros_(m.bias)
                else:
                    nn.init.xavier_uniform_(m.weight)
                    if "mlp" in name:
                        nn.init.normal_(m.bias, std=1e-6)
                    else:
                        nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                trunc_normal_(m.weight, std=math.sqrt(1.0 / fan_in) / 0.87962566103423978)  # LeCun normal
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


# Table 1 of the paper. S (sequence length) is (224/P)^2 at the default size: 49, 196 or 256.
VARIANTS = {
    #               P                 layers           C                  D_S                  D_C
    "mixer_s32": dict(patch_size=32, num_blocks=8, hidden_dim=512, tokens_mlp_dim=256, channels_mlp_dim=2048,
                      _paper=True, _timm="mixer_s32_224"),
    "mixer_s16": dict(patch_size=16, num_blocks=8, hidden_dim=512, tokens_mlp_dim=256, channels_mlp_dim=2048,
                      _paper=True, _timm="mixer_s16_224"),
    "mixer_b32": dict(patch_size=32, num_blocks=12, hidden_dim=768, tokens_mlp_dim=384, channels_mlp_dim=3072,
                      _paper=True, _timm="mixer_b32_224"),
    "mixer_b16": dict(patch_size=16, num_blocks=12, hidden_dim=768, tokens_mlp_dim=384, channels_mlp_dim=3072,
                      _paper=True, _timm="mixer_b16_224"),
    "mixer_l32": dict(patch_size=32, num_blocks=24, hidden_dim=1024, tokens_mlp_dim=512, channels_mlp_dim=4096,
                      _paper=True, _timm="mixer_l32_224"),
    "mixer_l16": dict(patch_size=16, num_blocks=24, hidden_dim=1024, tokens_mlp_dim=512, channels_mlp_dim=4096,
                      _paper=True, _timm="mixer_l16_224"),
    # H/14 has no timm entry point; its param count is checked against timm's MlpMixer class directly.
    "mixer_h14": dict(patch_size=14, num_blocks=32, hidden_dim=1280, tokens_mlp_dim=640, channels_mlp_dim=5120,
                      _paper=True),
    # Small-image variants (28-64 px): patch 4 gives 49 tokens at 28 px, 64 at 32 px.
    "mixer_t4": dict(img_size=32, patch_size=4, num_blocks=6, hidden_dim=128, tokens_mlp_dim=64,
                     channels_mlp_dim=512),  # the seeds' reference config
    "mixer_s4": dict(img_size=32, patch_size=4, num_blocks=8, hidden_dim=512, tokens_mlp_dim=256,
                     channels_mlp_dim=2048),  # Mixer-S widths at patch 4
    # 7x7 patches of a 28 px image: 16 tokens, ~2.5x mixer_t4's training speed on a CPU (more epochs
    # in a time budget, each a little less accurate). 90.2% on Fashion-MNIST in 10 minutes on 2 cores
    # with --augment flip (89.1% without: it overfits); benchmarks/time_to_accuracy.py --goals.
    "mixer_t7": dict(img_size=28, patch_size=7, num_blocks=6, hidden_dim=128, tokens_mlp_dim=64,
                     channels_mlp_dim=512),
}


def build_mixer(**kwargs) -> MlpMixer:
    return MlpMixer(**kwargs)


register_family(VARIANTS, build_mixer, family="mixer")
