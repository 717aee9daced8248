"""Image encoders in timm's manner: a registry plus `create_encoder(name, pretrained=False, **overrides)`.

Any timm model name works (ViTs first: `vit_tiny_patch16_224`, `vit_base_patch16_siglip_224`, ...); names
registered here with `@register_encoder` take precedence. Every encoder exposes the same small interface:
`forward(pixels) -> (B, N, C)` tokens, `num_features` (C), `num_tokens` (N), `grid_size` and
`data_config` (input size, mean, std, interpolation), read from the model itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from vlm.encoders.ports import to_timm

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_encoder(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Registers a constructor `fn(pretrained: bool, **overrides) -> timm-style model` under its name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_encoders(pattern: str = "") -> list[str]:
    """Names accepted by `create_encoder`: registered ones, then timm's (filtered by a wildcard pattern)."""
    return sorted(_REGISTRY) + timm.list_models(pattern or "*")


class ImageEncoder(nn.Module):
    """Wraps a timm model and returns the hidden states of one layer as a token sequence.

    Features are the chosen block's output without the final norm, exactly what LLaVA reads from a
    transformers vision tower's `hidden_states[feature_layer]`. Blocks after that layer are removed.

    `input_size` sets the side (or (height, width)) of the images it reads, for models that take any size (CNNs):
    their grid of tokens follows it. A ViT's size is part of its architecture (`img_size` when it is built).
    """

    def __init__(
        self,
        model: nn.Module,
        feature_layer: int = -1,
        keep_prefix_tokens: bool = False,
        input_size: int | tuple[int, int] | None = None,
    ):
        super().__init__()
        is_vit = hasattr(model, "blocks") and hasattr(model, "patch_embed")
        # ViTs count blocks; other timm models count the stages their forward_intermediates can return.
        num_blocks = len(model.blocks) if is_vit else len(getattr(model, "stage_ends", model.feature_info))
        if feature_layer == 0 or not -num_blocks <= feature_layer <= num_blocks:
            raise ValueError(
                f"feature_layer must be in -{num_blocks}..-1 or 1..{num_blocks} for this encoder, got {feature_layer}"
            )
        # hidden_states[k] (k >= 1) is block k-1's output; negative k counts from the end, as in LLaVA.
        self.block_index = num_blocks + feature_layer if feature_layer < 0 else feature_layer - 1
        model.prune_intermediate_layers(indices=[self.block_index], prune_norm=True, prune_head=True)
        self.model = model
        self.num_prefix_tokens = getattr(model, "num_prefix_tokens", 0)
        self.keep_prefix_tokens = keep_prefix_tokens and self.num_prefix_tokens > 0
        self.data_config = self._data_config(model, input_size)
        self.num_features, self.grid_size = self._feature_shape()
        self.num_tokens = self.grid_size[0] * self.grid_size[1] + (
            self.num_prefix_tokens if self.keep_prefix_tokens else 0
        )

    @staticmethod
    def _data_config(model: nn.Module, input_size: int | tuple[int, int] | None = None) -> dict[str, Any]:
        cfg = timm.data.resolve_model_data_config(model)
        # timm's pretrained config keeps its own input size even when `img_size` was overridden.
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img_size is not None:
            cfg["input_size"] = (3, *img_size)
        if input_size is not None:
            size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"input_size must be a side or (height, width) in pixels, got {input_size}")
            if img_size is not None and tuple(img_size) != size:
                raise ValueError(
                    f"input_size {size} differs from this ViT's img_size {tuple(img_size)}: a ViT's size is part of "
                    "its architecture, set it with the override img_size"
                )
            cfg["input_size"] = (3, *size)
        return {k: cfg[k] for k in ("input_size", "mean", "std", "interpolation")}

    @torch.no_grad()
    def _feature_shape(self) -> tuple[int, tuple[int, int]]:
        """(channels, (h, w)) of the chosen layer: read from a ViT, or from one dry run otherwise."""
        grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
        if grid is not None and hasattr(self.model, "embed_dim"):
            return self.model.embed_dim, tuple(grid)
        was_training = self.training
        self.eval()
        x = torch.zeros(1, *self.data_config["input_size"])
        out = self._intermediates(x)[0]
        self.train(was_training)
        c, h, w = (out[0] if isinstance(out, tuple) else out).shape[-3:]
        return c, (h, w)

    def _intermediates(self, pixels: torch.Tensor) -> list[Any]:
        kw = {"return_prefix_tokens": True} if self.keep_prefix_tokens else {}
        return self.model.forward_intermediates(pixels, indices=[self.block_index], intermediates_only=True, **kw)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, N, C) tokens; prefix tokens (if kept) come first."""
        out = self._intermediates(pixels)[0]
        prefix = None
        if self.keep_prefix_tokens:
            out, prefix = out
        tokens = out.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)
        return tokens if prefix is None else torch.cat([prefix, tokens], dim=1)


def create_encoder(
    name: str,
    pretrained: bool = False,
    *,
    weights: str | Path | None = None,
    pos_embed_std: float | None = None,
    feature_layer: int = -1,
    keep_prefix_tokens: bool = False,
    input_size: int | tuple[int, int] | None = None,
    **overrides: Any,
) -> ImageEncoder:
    """Builds an encoder by name.

    Args:
        name: A registered encoder or any timm model name.
        pretrained: Load the published weights by name (needs the model hub).
        weights: Load weights from this local file instead (.safetensors or a torch state dict; the layouts of
            `vlm.encoders.ports` are renamed onto the timm model first).
        pos_embed_std: Redraw a ViT's learned position embedding with this std (for a model started from scratch;
            refused with pretrained weights, which it would overwrite).
        feature_layer: Which hidden state to return (-1 last block, -2 penultimate, k >= 1 block k).
        keep_prefix_tokens: Keep class/register tokens in the output.
        input_size: Side (or (height, width)) in pixels of the images a CNN reads, instead of its pretrained
            config's (e.g. 96 for small images: fewer tokens, much less compute). ViTs take `img_size` instead.
        overrides: Keyword arguments for the model's constructor, e.g. `img_size=384`.
    """
    kwargs: dict[str, Any] = {"num_classes": 0, **overrides}
    if pos_embed_std is not None and (pretrained or weights is not None):
        raise ValueError("pos_embed_std redraws the position embedding: only for an encoder started from scratch")
    if weights is not None and not Path(weights).is_file():
        raise ValueError(f"encoder weights file not found: {weights}")
    if weights is not None:
        pretrained = False  # the file's weights replace any published ones
    if name in _REGISTRY:
        model = _REGISTRY[name](pretrained=pretrained, **kwargs)
    else:
        if not timm.is_model(name):
            raise ValueError(f"unknown encoder {name!r}: not registered and not a timm model name")
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except TypeError as e:
            raise ValueError(f"bad encoder override for {name}: {e}") from e
    if weights is not None:
        load_weights(model, Path(weights))
    if pos_embed_std is not None:
        if getattr(model, "pos_embed", None) is None or pos_embed_std <= 0:
            raise ValueError(f"pos_embed_std needs a ViT with a learned position embedding and a std > 0 ({name})")
        with torch.no_grad():
            nn.init.trunc_normal_(model.pos_embed, std=pos_embed_std, a=-2 * pos_embed_std, b=2 * pos_embed_std)
    return ImageEncoder(
        model, feature_layer=feature_layer, keep_prefix_tokens=keep_prefix_tokens, input_size=input_size
    )


def load_weights(model: nn.Module, path: Path) -> None:
    """Loads a local weights file strictly: every key must match (a classifier head in the file is ignored).

    timm's own file loading is lenient for headless models, so a file meant for another architecture would load
    nothing and leave the encoder random without an error; this refuses it instead. A file in another codebase's
    layout that `vlm.encoders.ports` knows (e.g. the EfficientNet PyTorch ports) is renamed onto the model first.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):  # common training-checkpoint layouts
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict")
    state = to_timm({k.removeprefix("module."): v for k, v in state.items()}, model)
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    state = {k: v for k, v in state.items() if not any(k == h or k.startswith(h + ".") for h in heads)}
    pos = getattr(model, "pos_embed", None)
    if pos is not None and "pos_embed" in state and state["pos_embed"].shape != pos.shape:
        # A ViT trained at another resolution: resample its position embeddings to this grid.
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], model.patch_embed.grid_size, num_prefix_tokens=prefix
        )
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(
            f"encoder weights {path} do not fit {type(model).__name__}: {str(e).splitlines()[-1]}"
        ) from None
    if missing or unexpected:
        raise ValueError(
            f"encoder weights {path} do not match the model: {len(missing)} missing (e.g. {sorted(missing)[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]})"
        )
