"""Training checkpoints (`.ckpt`) -> vlm checkpoint folders that `vlm caption/ask --model DIR` load directly, with
the run's training record (training.json, shown by the model card) beside the weights."""

from __future__ import annotations

import datetime
import re
import sys
from pathlib import Path
from typing import Any

import torch

from vlm.checkpoint import save_checkpoint
from vlm.config import PARTS, VLMConfig
from vlm.errors import VLMError
from vlm.files import check_input_file, write_json
from vlm.lora import LoraSettings, add_lora, merged_copy
from vlm.model import VisionLanguageModel
from vlm.model_card import TRAINING_FILE
from vlm.processor import Processor
from vlm.reward import save_head


def export_state(meta: dict[str, Any], state_dict: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Rebuilds the model from `meta` (`VLMModule.export_meta`), loads the module's `state_dict` (keys `vlm.*`),
    merges LoRA adapters, and writes a vlm checkpoint folder (atomically), plus `meta["training"]` (the run's
    training record) as training.json when there is one, and a reward model's head (keys `head.*`, `vlm fit-reward`)
    as `reward_head.safetensors`, so the folder is a reward model again."""
    processor = Processor.from_tensors(meta["processor_files"])
    model = VisionLanguageModel.from_config(VLMConfig.from_dict(meta["config"]), processor.tokenizer, pretrained=False)
    if meta.get("lora"):
        model.decoder = add_lora(model.decoder, LoraSettings(**meta["lora"]))
    weights = {k.removeprefix("vlm."): v for k, v in state_dict.items() if k.startswith("vlm.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise VLMError(
            f"the training checkpoint does not match its model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model = merged_copy(model).float().eval()
    out = save_checkpoint(model, out_dir, processor)
    head = {k.removeprefix("head."): v for k, v in state_dict.items() if k.startswith("head.")}
    if head:
        save_head(head, out)
    if meta.get("training") is not None:
        write_json(out / TRAINING_FILE, meta["training"])
    return out


def checkpoint_record(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    """The training record of a training checkpoint: the one `vlm fit` stored in it (`VLMModule.training_record` at
    the time of the save), or, for checkpoints from before vlm stored one, what Lightning's own fields tell (steps,
    epochs completed, learning rates, hyperparameters); the data is then unknown and the record says so."""
    now = datetime.datetime.now(datetime.timezone.utc)
    record = dict(ckpt["vlm"].get("training") or {})
    if not record:
        # Each trained part has an optimizer group named after it (and one for its parameters without decay).
        groups = [g for state in ckpt.get("optimizer_states", []) for g in state.get("param_groups", [])]
        saved = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
        record = {
            "format_version": 1,
            "date": saved.isoformat(timespec="seconds"),
            "model": {"lora": ckpt["vlm"].get("lora")},
            "learning_rates": {g["name"]: g.get("initial_lr", g.get("lr")) for g in groups if g.get("name") in PARTS},
            "data": "unknown: this checkpoint does not record the data it was trained on",
            "versions": {"lightning": ckpt.get("pytorch-lightning_version")},
        }
        if ckpt.get("hyper_parameters"):
            record["hyperparameters"] = ckpt["hyper_parameters"]
    record.update(
        written_by=f"vlm import-ckpt of {path}",
        exported_at=now.isoformat(timespec="seconds"),
        steps=ckpt.get("global_step"),
    )
    if "epochs_seen" not in record:  # an older record: Lightning's epoch of a checkpoint is the one it was saved in
        record.pop("epoch", None)
        record["epochs_completed"] = ckpt.get("epoch")
    return record


def read_training_checkpoint(path: str | Path, map_location: Any = None) -> dict[str, Any]:
    """A training checkpoint read with `torch.load(weights_only=True)`: tensors and plain containers only, never
    unpickled code. A file that is missing, not a regular file, truncated, foreign or holding pickled Python objects
    is a one-line `VLMError` naming it."""
    path = check_input_file(path, "training checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ... for a bad file
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))  # what weights_only refuses to unpickle
        if refused:
            raise VLMError(
                f"training checkpoint {path} holds pickled Python objects ({refused.group(1)}); vlm reads only "
                "tensors and plain containers and never unpickles code"
            ) from None
        # torch's own reason follows its advice to load with weights_only=False, which vlm never takes.
        reason = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
        reason = (reason.group(1) if reason else (str(e).splitlines() or [""])[0]).split(". ")[0]
        raise VLMError(f"cannot read training checkpoint {path}: {reason}") from None


def import_ckpt(checkpoint: str, out_dir: str) -> None:
    """Writes the model of a training checkpoint as a vlm checkpoint folder (LoRA adapters merged), with the run's
    training record as of that checkpoint (training.json: steps, data, learning rates; shown by the model card).

    Args:
        checkpoint: A training checkpoint written by `vlm fit`, e.g. `runs/tiny/checkpoints/last.ckpt`.
        out_dir: The folder to write (replaced atomically if it exists); load it with `vlm caption --model OUT_DIR`.
    """
    path = Path(checkpoint)
    ckpt = read_training_checkpoint(path, map_location="cpu")
    if "vlm" not in ckpt or "state_dict" not in ckpt:
        raise VLMError(f"{checkpoint} is not a training checkpoint written by vlm fit")
    out = export_state({**ckpt["vlm"], "training": checkpoint_record(ckpt, path)}, ckpt["state_dict"], out_dir)
    step = ckpt.get("global_step")
    print(f"wrote a vlm checkpoint of {checkpoint} (training step {step}) to {out}", file=sys.stderr)
