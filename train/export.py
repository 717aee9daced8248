"""Training checkpoints (`.ckpt`) -> vlm checkpoint folders that `vlm caption/ask --model DIR` load directly."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from vlm.checkpoint import save_checkpoint
from vlm.config import VLMConfig
from vlm.errors import VLMError
from vlm.model import VisionLanguageModel
from vlm.processor import Processor


def export_state(meta: dict[str, Any], state_dict: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Rebuilds the model from `meta` (`VLMModule.export_meta`), loads the module's `state_dict` (keys `vlm.*`),
    merges LoRA adapters, and writes a vlm checkpoint folder (atomically)."""
    from train.module import LoraSettings, add_lora, merged_copy

    tmp = Path(tempfile.mkdtemp(prefix="vlm-export-"))
    try:
        for name, data in meta["processor_files"].items():
            (tmp / name).write_bytes(data.numpy().tobytes())
        processor = Processor.from_pretrained(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    model = VisionLanguageModel.from_config(VLMConfig.from_dict(meta["config"]), processor.tokenizer, pretrained=False)
    if meta.get("lora"):
        model.decoder = add_lora(model.decoder, LoraSettings(**meta["lora"]))
    weights = {k.removeprefix("vlm."): v for k, v in state_dict.items() if k.startswith("vlm.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise VLMError(f"the training checkpoint does not match its model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model = merged_copy(model).float().eval()
    return save_checkpoint(model, out_dir, processor)


def export(checkpoint: str, out_dir: str) -> None:
    """Writes the model of a training checkpoint as a vlm checkpoint folder (LoRA adapters merged).

    Args:
        checkpoint: A training checkpoint written by `vlm fit`, e.g. `runs/tiny/checkpoints/last.ckpt`.
        out_dir: The folder to write (replaced atomically if it exists); load it with `vlm caption --model OUT_DIR`.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise VLMError(f"training checkpoint not found: {checkpoint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say so in one line
        raise VLMError(f"cannot read training checkpoint {checkpoint}: {str(e).splitlines()[0]}") from e
    if "vlm" not in ckpt or "state_dict" not in ckpt:
        raise VLMError(f"{checkpoint} is not a training checkpoint written by vlm fit")
    export_state(ckpt["vlm"], ckpt["state_dict"], out_dir)
