"""Checkpoint folders: `config.json` + tokenizer and processor files + `model.safetensors`. No pickle.

A folder describes itself: loading needs the folder and nothing else (no hub, no preset). Writes are atomic:
everything goes to a temporary sibling folder that replaces the target in one rename.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import psutil
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors

from vlm.config import CONFIG_FILE, WEIGHTS_FILE, VLMConfig
from vlm.decoder import refuse_remote_code
from vlm.errors import OptionError, VLMError
from vlm.files import atomic_folder, check_name_lengths
from vlm.model import VisionLanguageModel
from vlm.processor import PROCESSOR_FILE, Processor, tokenizer_for


def build(config: VLMConfig, pretrained: bool = True) -> tuple[VisionLanguageModel, Processor]:
    """A fresh model and its processor from a config (pretrained parts loaded where the config asks)."""
    tokenizer = tokenizer_for(config)
    model = VisionLanguageModel.from_config(config, tokenizer, pretrained=pretrained)
    return model, Processor.from_model(model, tokenizer)


def save_checkpoint(model: VisionLanguageModel, path: str | Path, processor: Processor | None = None) -> Path:
    """Writes the model (and processor) to `path`, replacing any folder there only once all is written."""
    path = Path(path)
    # Files others put beside the weights (e.g. a model card) are kept.
    with atomic_folder(path, keep_extra=True) as tmp:
        config = copy.deepcopy(model.config)
        # The weights are in the folder: loading must not fetch pretrained ones again.
        config.encoder.pretrained, config.encoder.weights, config.decoder.pretrained = False, None, False
        config.save(tmp / CONFIG_FILE)
        save_safetensors(model, str(tmp / WEIGHTS_FILE))
        if processor is not None:
            processor.save_pretrained(tmp)
    return path


def _load(path: str | Path) -> tuple[VisionLanguageModel, Processor]:
    """A checkpoint folder's model (eval mode) and processor, each read from disk once."""
    path = check_name_lengths(path, "model folder")
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise VLMError(f"not a vlm checkpoint folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}): {path}")
    refuse_remote_code(path)
    config = VLMConfig.load(path / CONFIG_FILE)
    # A model saved without its processor takes the tokenizer its config names.
    processor = Processor.from_pretrained(path) if (path / PROCESSOR_FILE).is_file() else None
    tokenizer = processor.tokenizer if processor is not None else tokenizer_for(config)
    model = _build_from_file(config, tokenizer, path / CONFIG_FILE)
    try:
        missing, unexpected = load_safetensors(model, str(path / WEIGHTS_FILE), strict=False)
    except SafetensorError as e:
        raise VLMError(f"corrupt weights file {path / WEIGHTS_FILE}: {e}") from None
    except RuntimeError as e:  # shape mismatches; the first one says enough
        first = str(e).splitlines()[1:2] or [str(e)]
        raise VLMError(f"checkpoint {path} does not match its config: {first[0].strip()}") from None
    if missing or unexpected:
        missing, unexpected = sorted(missing)[:3], sorted(unexpected)[:3]  # safetensors returns sets
        raise VLMError(f"checkpoint {path} does not match its config: missing {missing}, unexpected {unexpected}")
    return model.eval(), processor if processor is not None else Processor.from_model(model, tokenizer)


def _build_from_file(config: VLMConfig, tokenizer, file: Path) -> VisionLanguageModel:
    """The model a config read from `file` describes, with random weights. It is first built on the meta device (no
    memory): a model that cannot be built, or that would not fit in the memory this machine has free, is a one-line
    `VLMError` naming the file before anything is allocated."""
    try:
        with torch.device("meta"):
            dry = VisionLanguageModel.from_config(config, tokenizer, pretrained=False)
    except VLMError as e:
        raise VLMError(f"bad config {file}: {e}") from None
    except Exception as e:  # noqa: BLE001 - timm and transformers raise many types for shapes they cannot build
        reason = (str(e).strip().splitlines() or [""])[0]
        raise VLMError(f"cannot build the model {file} describes ({type(e).__name__}: {reason})") from None
    tensors = [*dry.parameters(), *dry.buffers()]
    need, free = sum(t.numel() * t.element_size() for t in tensors), psutil.virtual_memory().available
    if need > free:
        params = sum(p.numel() for p in dry.parameters())
        count = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.2f}M"
        raise VLMError(
            f"the model {file} describes needs {_size(need)} ({count} parameters), more than the "
            f"{_size(free)} of memory free on this machine"
        )
    return VisionLanguageModel.from_config(config, tokenizer, pretrained=False)


def _size(num_bytes: int) -> str:
    """A memory size as people read it: MB below a gigabyte, else GB."""
    return f"{num_bytes / 1e6:.1f} MB" if num_bytes < 1e9 else f"{num_bytes / 1e9:.1f} GB"


def load_model(path: str | Path) -> VisionLanguageModel:
    """A checkpoint folder's model, in eval mode."""
    return _load(path)[0]


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A checkpoint folder's model (in eval mode, on `device`, in `dtype`) and processor."""
    model, processor = _load(path)
    return model.to(device=device, dtype=dtype), processor


DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "samples" / "shapes-model"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """'auto' is CUDA when available, else the CPU; any other name must be a device of this machine."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpus = torch.cuda.device_count()
    names = ["cpu", *(["cuda"] if gpus else []), *(f"cuda:{i}" for i in range(gpus))]
    if device not in names:
        found = "" if gpus else "; no CUDA GPU found"
        raise OptionError("device", f"auto or a device of this machine ({', '.join(names)}{found})", device)
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on a GPU and float32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise VLMError(f"unknown dtype {dtype!r}; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def open_model(model: str | None = None, device: str = "auto", dtype: str = "auto"):
    """The model and processor a command runs: the folder `model`, or the default checkpoint under samples/."""
    path = Path(model) if model else DEFAULT_MODEL_DIR
    if model is None and not (path / CONFIG_FILE).is_file():
        raise VLMError(
            f"no default model at {path}: it is trained by the shapes benchmark recipe and not there yet. "
            "Pass --model DIR (`vlm init --preset tiny DIR` writes an untrained one for smoke tests).",
            exit_code=1,
        )
    dev = resolve_device(device)
    net, processor = load(path, dev, resolve_dtype(dtype, dev))
    if model is None:
        print(f"vlm: {default_model_note(net.config)}", file=sys.stderr)
    return net, processor


def default_model_note(config: VLMConfig) -> str:
    """The line a command prints when it falls back to the default model: what that model knows."""
    knows = (config.description or "see its model card").rstrip(". ")
    return f"default model ({DEFAULT_MODEL_DIR.name}): {knows}. Use --model DIR for other images."
