"""Typed configs for the three parts of a VLM, nested in `VLMConfig`, and the named presets.

Configs hold names and numbers only (never classes), so a config serializes to JSON and a checkpoint
folder can rebuild its model from `config.json` alone.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlm.errors import VLMError
from vlm.files import read_json

CONFIG_FILE = "config.json"  # a checkpoint folder's config
WEIGHTS_FILE = "model.safetensors"  # ... and its weights
PROCESSOR_FILE = "processor_config.json"  # ... and its processor settings (image transform, prompts)
PARTS = ("encoder", "projector", "decoder")  # the three parts of every model, in data-flow order
TINY_TOKENIZER = "package:vlm/assets/tiny_tokenizer"  # found in the installed package, so configs name no machine path


@dataclass
class EncoderConfig:
    """An image encoder: any timm model name plus the keyword overrides timm's constructor takes.

    `feature_layer` indexes the encoder's hidden states the way LLaVA's `vision_feature_layer` does:
    0 is the patch embedding, -1 the last block's output (before the final norm), -2 the penultimate.
    """

    name: str = "vit_base_patch16_siglip_224"
    overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"img_size": 64, "depth": 2}
    feature_layer: int = -1
    keep_prefix_tokens: bool = False  # keep the class/register tokens as image tokens
    pretrained: bool = False  # timm weights by name (needs the hub) when building a fresh model
    # Or a local weights file (.safetensors, or a torch state dict; `package:<pkg>/<file>` names one inside an
    # installed Python package). Files in a layout `vlm.encoders.ports` knows (EfficientNet PyTorch ports) are renamed.
    weights: str | None = None
    # The side in pixels of the images a CNN encoder reads (its token grid follows), instead of its pretrained config's
    # (e.g. 96 for 28x28 images). A ViT's size is part of its architecture: `overrides: {img_size: ...}`.
    input_size: int | None = None
    # A ViT started from scratch draws its position embedding with this std (timm's default: 0.02). A larger one
    # keeps each patch's position visible in the features before training has shaped them (see the `shapes` preset).
    pos_embed_std: float | None = None


@dataclass
class ProjectorConfig:
    """Maps encoder features into the decoder's embedding space.

    `mlp`: Linear-GELU-Linear per patch (LLaVA-1.5). `pixel_shuffle`: folds each `factor`x`factor`
    block of patches into one token, then a Linear (nanoVLM / SmolVLM): `factor**2` times fewer tokens.
    """

    kind: Literal["mlp", "pixel_shuffle"] = "mlp"
    factor: int = 2  # pixel_shuffle only
    # An RMS norm on the output whose gain starts at the RMS of the decoder's token embeddings, so image and text
    # tokens enter the decoder at one scale (docs/learning.md: without it a model trained from scratch ignores images).
    output_norm: bool = False


@dataclass
class DecoderConfig:
    """A transformers causal LM.

    `name_or_path` is a hub id, a local transformers folder or a `.gguf` file; with `pretrained` its
    weights are loaded, otherwise the model is built at random from its config. `hf_config` holds the
    transformers config (model_type and sizes): it is what a checkpoint stores, so loading needs no hub.
    """

    name_or_path: str | None = None
    pretrained: bool = False
    hf_config: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None  # defaults to name_or_path


@dataclass
class VLMConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    image_token: str = "<image>"
    # Instruction the CLI and the data reader use for caption rows, so training and inference agree.
    caption_prompt: str = "Describe the image."
    # Where a user turn whose text has no <image> placeholder gets its images: before the text (LLaVA's layout), or
    # after it, so that the decoder reads the question first and every image token can attend to it (early fusion).
    images_after_text: bool = False
    # The decoder's rotary positions for image tokens: "sequence" (consecutive, like text: LLaVA) or "grid" (each
    # token's row and column on the patch grid, as in Qwen2-VL's multimodal RoPE; see `vlm.positions`).
    image_positions: str = "sequence"
    # The longest answer (in tokens) the training recipe generated for validation (`model.max_new_tokens`): `vlm eval`
    # generates this many for question rows unless told otherwise, so a model is scored as it was validated.
    answer_tokens: int | None = None
    # How the model's answers are scored when they carry more than the answer (e.g. steps, then the answer): a regular
    # expression whose last match (its group, if it has one) is the answer. `vlm eval` uses it unless told otherwise.
    answer_regex: str | None = None
    # What the model knows, in a sentence: printed when a command falls back to the default model, and at the top of
    # the model card, so nobody mistakes a model of synthetic shapes for one that describes photos.
    description: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> VLMConfig:
        """The config a dict (e.g. a parsed config.json) describes; a one-line `VLMError` naming `source` and the
        field when a key is unknown or a value has the wrong type for its field."""
        d = dict(d)
        d.pop("format_version", None)
        parts = {}
        for name, part_cls in (("encoder", EncoderConfig), ("projector", ProjectorConfig), ("decoder", DecoderConfig)):
            part = d.pop(name, {})
            if not isinstance(part, dict):
                raise VLMError(f"bad {source}: {name} must be an object, got {_short(part)}")
            parts[name] = part_cls(**_checked(part_cls, part, source, f"{name}."))
        return cls(**parts, **_checked(cls, d, source, ""))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"format_version": 1, **self.to_dict()}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> VLMConfig:
        d = read_json(path)
        if not isinstance(d, dict):
            raise VLMError(f"bad config {path}: not a JSON object")
        return cls.from_dict(d, source=f"config {path}")

    @classmethod
    def from_name(cls, name: str) -> VLMConfig:
        """A copy of the named preset (see `PRESETS`)."""
        if name not in PRESETS:
            raise VLMError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls.from_dict(json.loads(json.dumps(PRESETS[name])))


def _checked(cls: type, values: dict[str, Any], source: str, prefix: str) -> dict[str, Any]:
    """`values` if each names a field of the dataclass `cls` and has that field's type; else a one-line `VLMError`
    naming `source` and the field (`prefix` + name), so a bad config.json is refused before anything is built."""
    fields = {f.name for f in dataclasses.fields(cls) if f.name not in PARTS}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise VLMError(f"bad {source}: unknown config keys: {', '.join(prefix + k for k in unknown)}")
    hints = typing.get_type_hints(cls)
    return check_fields(values, {name: hints[name] for name in fields}, f"bad {source}", prefix)


def check_fields(
    values: dict[str, Any], types: dict[str, Any], source: str, prefix: str = "", required: tuple[str, ...] = ()
) -> dict[str, Any]:
    """`values` (read from a JSON file) if each one that `types` names fits its type hint and none of `required` is
    missing; else a one-line `VLMError`: "SOURCE: PREFIXNAME must be a string, got 5"."""
    for name in required:
        if name not in values:
            raise VLMError(f"{source}: {prefix}{name} is missing")
    for name, value in values.items():
        if name in types and not _has_type(value, types[name]):
            raise VLMError(f"{source}: {prefix}{name} must be {_type_name(types[name])}, got {_short(value)}")
    return values


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a config field's type hint (the few kinds config fields use). JSON has no separate
    integers for floats, so an int is a float; true and false are not numbers."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if origin is dict:
        key, item = args
        return isinstance(value, dict) and all(_has_type(k, key) and _has_type(v, item) for k, v in value.items())
    if hint in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if hint is float else hint)


def _type_name(hint: Any) -> str:
    """A type hint as the error for a value that does not fit it says it: "a string or null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}
    return names.get(hint, "an object")  # dict[str, Any]


def _short(value: Any) -> str:
    """A value as an error message quotes it: JSON, cut to 60 characters."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, max_pos: int, **kw: Any) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": ffn,
        "max_position_embeddings": max_pos,
        "tie_word_embeddings": True,
        **kw,
    }


def _scratch(img_size: int) -> dict[str, Any]:
    """A model to train from scratch (docs/learning.md says why each choice): a ViT with a convolutional stem
    (encoders/convstem.py; ceil(img_size / 16) squared tokens of 16 px), the MLP projector with an output norm that
    starts image tokens at the scale of text tokens, and a 4-layer Llama 128 wide that reads the question before the
    image. About 1.9M parameters."""
    return {
        "encoder": {
            "name": "vit_convstem",
            "overrides": {"img_size": img_size, "patch_size": 16, "embed_dim": 128, "depth": 4, "num_heads": 4},
        },
        "projector": {"kind": "mlp", "output_norm": True},
        # Weights drawn with std 0.08, about 1/sqrt(width), not Llama's 0.02 (chosen for widths in the thousands): at
        # 0.02 the attention of a 128-wide decoder starts near uniform and finds the image's objects much later.
        "decoder": {"hf_config": _llama(128, 4, 4, 2, 384, 1024, initializer_range=0.08), "tokenizer": TINY_TOKENIZER},
        "images_after_text": True,
    }


# SmolLM2-135M's published architecture (HuggingFaceTB/SmolLM2-135M-Instruct config.json), so the real-size
# presets can be built offline; its weights come from the hub or a local folder / GGUF file.
SMOLLM2_135M = _llama(576, 30, 9, 3, 1536, 8192, rope_theta=100000.0, rms_norm_eps=1e-5, vocab_size=49152)
SMOLLM2_135M_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"

PRESETS: dict[str, dict[str, Any]] = {
    # For tests and smoke runs: builds in well under a second. Encoders are SigLIP-shaped (no class token, no
    # pre-norm) so that every preset exports to transformers' LLaVA.
    "tiny": {
        "encoder": {
            "name": "vit_base_patch16_siglip_224",
            "overrides": {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2},
        },
        "projector": {"kind": "mlp"},
        "decoder": {"hf_config": _llama(64, 2, 2, 1, 128, 1024), "tokenizer": TINY_TOKENIZER},
    },
    # For training from scratch on your own small data on a CPU (samples/configs/scratch.yaml): 64x64 images.
    "scratch": _scratch(64),
    # `scratch` on the shapes benchmark's 75x75 images: 5x5 tokens of 16 px (the grid of Relation Networks' CNN). The
    # context fits a 20-question conversation about one image (about 500 tokens).
    "shapes": _scratch(75),
    # Shaped like nanoVLM-222M: SigLIP-B/16-224 + SmolLM2-135M, pixel shuffle to 49 image tokens.
    "nanovlm-222m": {
        "encoder": {"name": "vit_base_patch16_siglip_224"},
        "projector": {"kind": "pixel_shuffle", "factor": 2},
        "decoder": {"name_or_path": SMOLLM2_135M_HUB, "hf_config": SMOLLM2_135M},
    },
    # The same backbones with LLaVA's MLP projector (196 image tokens): exports to transformers' LLaVA.
    "llava-222m": {
        "encoder": {"name": "vit_base_patch16_siglip_224"},
        "projector": {"kind": "mlp"},
        "decoder": {"name_or_path": SMOLLM2_135M_HUB, "hf_config": SMOLLM2_135M},
    },
}
