"""A ViT with a convolutional stem, for training from scratch on small data.

Reference: T. Xiao, M. Singh, E. Mintun, T. Darrell, P. Dollar, R. Girshick, "Early Convolutions Help Transformers
See Better", NeurIPS 2021. The ViT's patchify layer (one `patch_size` x `patch_size` convolution of stride
`patch_size`) is replaced by a stack of 3x3 convolutions of stride 2, each followed by BatchNorm and ReLU, and a final
1x1 convolution to the embedding width. The paper finds this stem makes ViTs train stably, with plain AdamW at a wide
range of learning rates, and converge faster; `docs/learning.md` measures why this project needs it (a ViT with a
patchify stem, trained from scratch together with the decoder, collapses to features that ignore the objects).

The stem has log2(patch_size) stride-2 convolutions with padding 1, so an image of side n gives a grid of side
ceil(n / patch_size): 75 px and patch 16 give 5 x 5 tokens. Everything after the stem is timm's VisionTransformer
(learned position embedding, pre-norm blocks), so the encoder keeps timm's interface.
"""

from __future__ import annotations

import math
from typing import Any

from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from vlm.encoders.registry import register_encoder


def _stem_widths(patch_size: int, embed_dim: int) -> list[int]:
    """Channels of the stride-2 convolutions: doubling up to the embedding width (Xiao et al.'s ViT-C stems)."""
    n = int(math.log2(patch_size))
    return [max(8, embed_dim >> (n - 1 - i)) for i in range(n)]


class ConvStem(PatchEmbed):
    """A drop-in for timm's `PatchEmbed`: the same attributes (`grid_size`, `num_patches`, `feat_ratio`), a
    convolution stack in place of the patchify convolution."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        stem_widths: list[int] | None = None,
        **kwargs: Any,
    ):
        if patch_size < 2 or patch_size & (patch_size - 1):
            raise ValueError(f"vit_convstem needs a power-of-two patch_size (stride-2 convolutions), not {patch_size}")
        kwargs.pop("dynamic_img_pad", None)  # the stem's padding already covers any image size
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **kwargs)
        widths = list(stem_widths) if stem_widths else _stem_widths(patch_size, embed_dim)
        if len(widths) != int(math.log2(patch_size)):
            raise ValueError(f"stem_widths needs {int(math.log2(patch_size))} entries for patch_size {patch_size}")
        layers: list[nn.Module] = []
        width_in = in_chans
        for width in widths:
            layers += [
                nn.Conv2d(width_in, width, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            width_in = width
        layers.append(nn.Conv2d(width_in, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)

    def _init_img_size(self, img_size):
        if img_size is None:
            return None, None, None
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        grid = (math.ceil(h / self.patch_size[0]), math.ceil(w / self.patch_size[1]))
        return (h, w), grid, grid[0] * grid[1]

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return math.ceil(img_size[0] / self.patch_size[0]), math.ceil(img_size[1] / self.patch_size[1])

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # (B, D, ceil(H/p), ceil(W/p))
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        elif self.output_fmt != "NCHW":
            x = x.permute(0, 2, 3, 1)  # NHWC, for dynamic_img_size
        return self.norm(x)


@register_encoder
def vit_convstem(pretrained: bool = False, stem_widths: list[int] | None = None, **kwargs: Any) -> VisionTransformer:
    """A ViT with a convolutional stem (no class token, as SigLIP's): for training from scratch.

    Takes VisionTransformer's keyword arguments (img_size, patch_size (a power of two), embed_dim, depth, num_heads,
    mlp_ratio, ...) and `stem_widths`, the channels of the stride-2 convolutions (default: doubling up to embed_dim).
    """
    if pretrained:
        raise ValueError("vit_convstem has no published weights: train it, or load a file with encoder.weights")
    kwargs.pop("num_classes", None)
    defaults = {"class_token": False, "global_pool": "avg", "patch_size": 16}
    model = VisionTransformer(
        num_classes=0, embed_layer=lambda **kw: ConvStem(stem_widths=stem_widths, **kw), **{**defaults, **kwargs}
    )
    model.pretrained_cfg = {
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "input_size": (3, *model.patch_embed.img_size),
        "interpolation": "bicubic",
        "classifier": "head",
    }
    return model
