"""The names vlm and transformers' LLaVA give the same things, each pair written once and read both ways.

Weights: a vlm model's state dict (`encoder.model.*` a timm ViT, `projector.*`, `decoder.*` a transformers causal
LM) against LLaVA's legacy layout (`vision_tower.vision_model.*` in transformers' CLIP/SigLIP names,
`multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.*`). `llava_names` says where each vlm
weight lives in LLaVA; export applies it forwards (`to_llava`: rename, split timm's fused qkv), import backwards
(`from_llava`: look each vlm weight up, join q, k and v). Also the activation names of the two libraries.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from vlm.errors import VLMError

ENCODER = "encoder.model."
# vlm prefix -> LLaVA (legacy layout) prefix; "{base}" is the decoder's base_model_prefix (model, transformer, ...).
PARTS = [
    (ENCODER, "vision_tower.vision_model."),
    ("projector.", "multi_modal_projector."),
    ("decoder.{base}.", "language_model.model."),
    ("decoder.lm_head.", "language_model.lm_head."),
]
# timm ViT name -> transformers CLIP/SigLIP vision tower name. "{i}" is a block number, "{p}" weight or bias;
# "{qkv}" marks timm's fused q, k, v Linear, which transformers keeps as three (split along the output dim).
VISION_KEYS = [
    ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),  # a bias in SigLIP only
    ("pos_embed", "embeddings.position_embedding.weight"),
    ("cls_token", "embeddings.class_embedding"),  # CLIP only
    ("norm_pre.{p}", "pre_layrnorm.{p}"),  # CLIP only
    ("blocks.{i}.attn.qkv.{p}", "encoder.layers.{i}.self_attn.{qkv}_proj.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layers.{i}.self_attn.out_proj.{p}"),
    ("blocks.{i}.norm1.{p}", "encoder.layers.{i}.layer_norm1.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layers.{i}.layer_norm2.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "encoder.layers.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "encoder.layers.{i}.mlp.fc2.{p}"),
    ("norm.{p}", "post_layernorm.{p}"),
]
# timm keeps these with leading batch dims, (1, N, D) and (1, 1, D); transformers as (N, D) and (D,).
_BATCH_DIMS = {ENCODER + "pos_embed": 1, ENCODER + "cls_token": 2}
_FIELDS = {"{i}": r"(?P<i>\d+)", "{p}": r"(?P<p>weight|bias)"}


def _regex(pattern: str) -> re.Pattern:
    parts = re.split(r"(\{i\}|\{p\})", pattern)
    return re.compile("".join(_FIELDS.get(part, re.escape(part)) for part in parts))


_VISION_REGEXES = [(_regex(timm), hf) for timm, hf in VISION_KEYS]


def tower_names(timm_key: str) -> list[str]:
    """The transformers vision tower weights holding a timm ViT weight: three for the fused qkv, else one; none if
    the tower has no place for it."""
    for regex, hf in _VISION_REGEXES:
        match = regex.fullmatch(timm_key)
        if match:
            fields = match.groupdict()
            parts = ("q", "k", "v") if "{qkv}" in hf else ("",)
            return [hf.format(qkv=part, **fields) for part in parts]
    return []


def llava_names(key: str, base: str) -> list[str]:
    """The LLaVA weights (legacy layout) holding vlm weight `key`, for a decoder whose base_model_prefix is `base`;
    none if LLaVA has no place for it."""
    for ours, theirs in PARTS:
        ours = ours.format(base=base)
        if key.startswith(ours):
            rest = key[len(ours) :]
            return [theirs + name for name in (tower_names(rest) if ours == ENCODER else [rest])]
    return []


def to_llava(state: dict[str, Tensor], base: str) -> dict[str, Tensor]:
    """A vlm state dict in LLaVA's legacy layout: timm's qkv split in three, its batch dims dropped."""
    out = {}
    for key, tensor in state.items():
        names = llava_names(key, base)
        if not names:
            raise VLMError(f"cannot place weight {key!r} in the LLaVA layout")
        tensor = tensor.reshape(tensor.shape[_BATCH_DIMS.get(key, 0) :])
        out.update(zip(names, tensor.chunk(len(names))))
    return out


def from_llava(weights: dict[str, Tensor], keys: list[str], base: str) -> dict[str, Tensor]:
    """The vlm weights named in `keys`, read from LLaVA `weights` (legacy layout): q, k and v joined into timm's qkv,
    its batch dims restored. A weight whose LLaVA source is missing is left out."""
    out = {}
    for key in keys:
        names = llava_names(key, base)
        if not names or any(name not in weights for name in names):
            continue
        tensor = weights[names[0]] if len(names) == 1 else torch.cat([weights[name] for name in names])
        out[key] = tensor.reshape((1,) * _BATCH_DIMS.get(key, 0) + tuple(tensor.shape))
    return out


def legacy_key(key: str) -> str:
    """Any LLaVA key layout (transformers 4.4x, 4.5x legacy, 5.x) -> the legacy one."""
    for new, old in (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.vision_tower.", "vision_tower."),
    ):
        if key.startswith(new):
            key = old + key[len(new) :]
            break
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        key = "vision_tower.vision_model." + key[len("vision_tower.") :]
    return key


# timm activation name -> transformers `hidden_act`; import also reads `_HF_ALIASES`, other names for the same ones.
ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}
_HF_ALIASES = {"gelu_new": "gelu_pytorch_tanh"}


def timm_activation(hf_act: str) -> str | None:
    """The timm activation name for a transformers `hidden_act`, or None if timm has no such activation."""
    hf_act = _HF_ALIASES.get(hf_act, hf_act)
    return next((timm for timm, hf in ACTIVATIONS.items() if hf == hf_act), None)
