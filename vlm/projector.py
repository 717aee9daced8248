"""Projectors: encoder tokens (B, N, C_enc) -> decoder embeddings (B, N', D)."""

from __future__ import annotations

from torch import Tensor, nn

from vlm.config import ProjectorConfig
from vlm.errors import VLMError


def output_norm(dim: int, enabled: bool) -> nn.Module | None:
    """An RMS norm for the projector's output (`ProjectorConfig.output_norm`), or None. Its gain starts at 1;
    `VisionLanguageModel.from_config` sets it to the scale of the decoder's token embeddings."""
    return nn.RMSNorm(dim, eps=1e-6) if enabled else None


class MLPProjector(nn.Module):
    """LLaVA-1.5's projector (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning"):
    Linear-GELU-Linear applied to every patch. Names match transformers' `LlavaMultiModalProjector`."""

    def __init__(self, in_dim: int, out_dim: int, norm: bool = False):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim)
        self.norm = output_norm(out_dim, norm)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear_2(self.act(self.linear_1(x)))
        return x if self.norm is None else self.norm(x)


class PixelShuffleProjector(nn.Module):
    """nanoVLM / SmolVLM's projector: fold each `factor` x `factor` block of the patch grid into one token
    (space-to-depth), then one Linear. `factor**2` times fewer image tokens for the decoder to read."""

    def __init__(self, in_dim: int, out_dim: int, grid_size: tuple[int, int], factor: int, norm: bool = False):
        super().__init__()
        h, w = grid_size
        if factor < 1 or h % factor or w % factor:
            raise VLMError(f"pixel_shuffle factor {factor} must divide the encoder's patch grid {h}x{w}")
        self.grid_size, self.factor = grid_size, factor
        self.proj = nn.Linear(in_dim * factor * factor, out_dim, bias=False)
        self.norm = output_norm(out_dim, norm)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        (h, w), r = self.grid_size, self.factor
        x = x.reshape(b, h // r, r, w // r, r, c)  # (B, h/r, r, w/r, r, C)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, (h // r) * (w // r), r * r * c)  # (B, N/r^2, r^2 C)
        x = self.proj(x)
        return x if self.norm is None else self.norm(x)


def build_projector(cfg: ProjectorConfig, in_dim: int, out_dim: int, grid_size: tuple[int, int]) -> nn.Module:
    if cfg.kind == "mlp":
        return MLPProjector(in_dim, out_dim, cfg.output_norm)
    if cfg.kind == "pixel_shuffle":
        return PixelShuffleProjector(in_dim, out_dim, grid_size, cfg.factor, cfg.output_norm)
    raise VLMError(f"unknown projector kind {cfg.kind!r}; choose mlp or pixel_shuffle")


def _fold(cfg: ProjectorConfig) -> int:
    """How many patches of each row and column the projector folds into one token."""
    return cfg.factor if cfg.kind == "pixel_shuffle" else 1


def num_output_tokens(cfg: ProjectorConfig, num_input_tokens: int) -> int:
    return num_input_tokens // _fold(cfg) ** 2


def output_grid(cfg: ProjectorConfig, grid_size: tuple[int, int]) -> tuple[int, int]:
    """Rows and columns of the tokens the projector writes for an encoder patch grid."""
    h, w = grid_size
    return h // _fold(cfg), w // _fold(cfg)
