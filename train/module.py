"""The training system around a `VisionLanguageModel`: which parts train and how fast, the optimizer and schedule,
the training and validation steps, and what a checkpoint carries beyond the weights. The model itself stays a plain
`nn.Module` (`self.vlm`), built in `__init__` so the data module can take its processor in `setup`.

Choices, said once:
- Per-part learning rates (`lr_encoder`, `lr_projector`, `lr_decoder`); 0 freezes the part (requires_grad False,
  not in the optimizer). Alignment (projector only) and instruction tuning (projector + decoder) are two recipes.
- Weight decay applies to matrices only: parameters with ndim >= 2, except embedding tables (`nn.Embedding`
  weights, hence a tied LM head too) and the ViT's position embedding and prefix tokens. Biases and norm weights
  (ndim 1) never decay.
- Schedule: linear warmup from 0, then cosine decay to `min_lr_ratio` x the peak, stepped every optimizer step.
- The loss is the model's mean cross-entropy over the batch's answer tokens.
- AdamW runs fused (one kernel for all parameters) when the model is on CUDA, except where gradients are clipped under
  mixed precision (Lightning refuses that: a fused step unscales the gradients itself), and as torch chooses elsewhere.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from vlm.checkpoint import build, load_model
from vlm.config import PARTS, VLMConfig
from vlm.errors import VLMError
from vlm.generation import GenerationOptions
from vlm.lora import LoraSettings, add_lora
from vlm.processor import Processor

# ViT parameters that are embeddings although they are not `nn.Embedding` weights.
_EMBEDDING_NAMES = ("pos_embed", "cls_token", "reg_token")
# Training throughput is averaged over this many batches.
THROUGHPUT_WINDOW = 10


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states, in types `torch.load(weights_only=True)` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode (no dropout) for the block, then each back in the mode it was in."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.train(training)


def decay_split(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(parameters with weight decay, without) among the trainable parameters of `module`."""
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = id(p) in embeddings or name.rsplit(".", 1)[-1] in _EMBEDDING_NAMES
        (decay if p.ndim >= 2 and not is_embedding else no_decay).append(p)
    return decay, no_decay


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_options(device_type: str, clips_mixed_precision: bool = False) -> dict[str, Any]:
    """AdamW's implementation for parameters on this device type: fused on CUDA unless gradients are clipped under
    mixed precision (Lightning refuses to clip for a fused optimizer there); torch's default otherwise (foreach on
    accelerators, a loop on the CPU)."""
    return {"fused": True} if device_type == "cuda" and not clips_mixed_precision else {}


def lora_settings(lora: bool | LoraSettings | None) -> LoraSettings | None:
    """`model.lora` as given (true, false, unset or the settings) -> the settings, or None for no adapters."""
    if lora is True:
        return LoraSettings()
    return lora or None


class VLMModule(LightningModule):
    """Trains a vision-language model.

    Args:
        config: The model to build: a preset name (tiny, shapes, nanovlm-222m, llava-222m) or a full `VLMConfig`.
        init_from: Start from this vlm checkpoint folder instead (its config and weights; `config` is ignored):
            for a second stage or domain fine-tuning.
        expand_decoder: Deepen the decoder to this many layers before training, by block expansion: new layers
            start as the identity, so training starts from what the model already computes (for a stage that needs
            more depth than the model it starts from; see `vlm.decoder.expand_layers`).
        images_after_text: Set where images go in a turn without `<image>` placeholders (`VLMConfig.images_after_text`):
            after the text, so the decoder reads the question before the image, or before it. Unset: the model's own.
        image_positions: Set the decoder's rotary positions for image tokens (`VLMConfig.image_positions`):
            `sequence` (consecutive, like text) or `grid` (row and column on the patch grid). Unset: the model's own.
        pretrained: Load the pretrained weights the config asks for (encoder/decoder `pretrained`, `weights`).
        lr_encoder: Peak learning rate of the image encoder; 0 freezes it.
        lr_projector: Peak learning rate of the projector; 0 freezes it.
        lr_decoder: Peak learning rate of the decoder (of its LoRA adapters with `lora`); 0 freezes it.
        weight_decay: AdamW weight decay, on matrices only (see the module docstring).
        betas: AdamW betas.
        warmup: Warmup length: a fraction of the total optimizer steps (< 1) or a number of steps (>= 1).
        min_lr_ratio: The cosine schedule ends at this fraction of each peak learning rate.
        gradient_checkpointing: Recompute activations in the backward pass (decoder, and the encoder when trained):
            less memory, about a third more compute.
        lora: Train LoRA adapters on the decoder instead of its weights: `true` for the defaults (r 16, alpha 32,
            dropout 0.05, all-linear), or the settings (`--model.lora.r 8`, ...; see `vlm.lora.LoraSettings`).
        max_new_tokens: Longest generated answer for validation accuracy.
        compile: Compile the model's forward with `torch.compile` for this run: faster steps on a GPU once the first
            steps have paid for compiling (minutes on a CPU). Checkpoints and the exported model are the same as
            without it.
    """

    # Read by Lightning's ThroughputMonitor (see `configure_callbacks`): FLOPs are not counted, so the training logs
    # have no MFU (`vlm bench` measures it).
    flops_per_batch = None
    # The command that trains with this module (in the training record), and the logged metrics beyond the losses and
    # validation accuracy that `curves.png` plots.
    command = "vlm fit"
    curve_metrics: tuple[str, ...] = ()

    def __init__(
        self,
        config: str | VLMConfig | None = None,
        init_from: str | None = None,
        expand_decoder: int | None = None,
        images_after_text: bool | None = None,
        image_positions: str | None = None,
        pretrained: bool = True,
        lr_encoder: float = 0.0,
        lr_projector: float = 1e-3,
        lr_decoder: float = 1e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup: float = 0.03,
        min_lr_ratio: float = 0.1,
        gradient_checkpointing: bool = False,
        lora: bool | LoraSettings | None = None,
        max_new_tokens: int = 16,
        compile: bool = False,
    ):
        super().__init__()
        self.lrs = {"encoder": lr_encoder, "projector": lr_projector, "decoder": lr_decoder}
        if any(lr < 0 for lr in self.lrs.values()):
            raise VLMError("learning rates must be >= 0 (0 freezes a part)")
        self.weight_decay, self.betas, self.warmup, self.min_lr_ratio = weight_decay, tuple(betas), warmup, min_lr_ratio
        self.lora, self.max_new_tokens, self.compile_model = lora_settings(lora), max_new_tokens, compile
        # Where the weights started, for the training record (a full VLMConfig has no name: see config.json).
        name = None if init_from is not None else config if isinstance(config, str) else "custom"
        self._origin = {"config": name, "init_from": init_from, "pretrained": pretrained}
        self.vlm, self.processor = self._build(config, init_from, pretrained)
        if expand_decoder is not None:
            old = self.vlm.config.decoder.hf_config.get("num_hidden_layers")
            self.vlm.expand_decoder(expand_decoder)
            self._origin["expand_decoder"] = {"from_layers": old, "to_layers": expand_decoder}
        if images_after_text is not None:  # the processor lays out every prompt, so training and inference agree
            self.vlm.config.images_after_text = self.processor.images_after_text = images_after_text
        if image_positions is not None:
            self.vlm.set_image_positions(image_positions)
        self.vlm.config.answer_tokens = max_new_tokens  # saved with the model: `vlm eval` answers as validation did
        for part, lr in self.lrs.items():
            if lr == 0:  # frozen: no gradients, and eval mode (Lightning keeps it), so a frozen CNN's batch norms use
                getattr(self.vlm, part).requires_grad_(False).eval()  # and keep their saved statistics
        if self.lora is not None:
            if lr_decoder == 0:
                raise VLMError("model.lora trains decoder adapters: set model.lr_decoder > 0")
            self.vlm.decoder = add_lora(self.vlm.decoder, self.lora)
        # The KV cache is for generation; training forwards must not build one.
        self.vlm.decoder.config.use_cache = False
        if gradient_checkpointing:
            self.vlm.decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if lr_encoder > 0 and hasattr(self.vlm.encoder.model, "set_grad_checkpointing"):
                self.vlm.encoder.model.set_grad_checkpointing(True)
        self._processor_files = self.processor.to_tensors()
        self._pending_rng: dict[str, Any] | None = None
        self._correct = 0
        self._answered = 0
        self._fit_started: float | None = None  # time.perf_counter() when this fit session started
        self._val_step: int | None = None  # the step of the last validation
        self._earlier: dict[str, Any] = {}  # the training record of the checkpoint this run resumed from

    @staticmethod
    def _build(config: str | VLMConfig | None, init_from: str | None, pretrained: bool):
        if init_from is not None:
            if config is not None:
                rank_zero_info(f"model.init_from {init_from}: its own config is used, model.config is ignored")
            return load_model(init_from).train(), Processor.from_pretrained(init_from)
        if config is None:
            raise VLMError("choose a model: --model.config PRESET (or a full config) or --model.init_from DIR")
        if isinstance(config, str):
            config = VLMConfig.from_name(config)
        model, processor = build(config, pretrained=pretrained)
        return model.train(), processor

    def setup(self, stage: str) -> None:
        if self.trainer.strategy.root_device.type == "cpu":
            # On CPU, intra-op threads of every training process plus the loader workers must not outnumber the
            # cores: oversubscribed threads spin and stall (several times slower). Never raises the thread count.
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            workers = getattr(self.trainer.datamodule, "num_workers", 0) or 0
            budget = max(1, cores // max(1, self.trainer.num_devices) - workers)
            torch.set_num_threads(min(torch.get_num_threads(), budget))
        if self.compile_model and stage == "fit":
            # In place (`nn.Module.compile`): the module and its parameter names stay as they are, so state dicts,
            # checkpoints and exports carry no `_orig_mod.` prefix. Here rather than in `__init__`, so a method's
            # reference copy of the starting model (DPO, GRPO) is a plain module of its own. Validation runs the
            # compiled forward too (one more compilation, for eval mode).
            self.vlm.compile()

    # ---- what a checkpoint carries beyond the weights ----

    def export_meta(self) -> dict[str, Any]:
        """What `vlm.training_ckpt` needs to rebuild the model from a training checkpoint without the YAML, and the
        run's `training_record` so far (exported as training.json beside the weights)."""
        return {
            "config": self.vlm.config.to_dict(),
            "lora": asdict(self.lora) if self.lora is not None else None,
            "processor_files": self._processor_files,
            "training": self.training_record(),
        }

    def training_record(self) -> dict[str, Any]:
        """The facts of this run up to now: where the model started, the data and its row counts, learning rates,
        steps, batch size, hardware, wall time, the last losses, software versions (see `vlm.model_card`).

        How far training went, in one unit each: `steps`, the optimizer steps taken; `epochs_seen`, the passes over
        the training rows they make (steps x accumulate_grad_batches / batches per epoch per device, e.g. 0.379);
        `epochs_completed`, the whole passes among them (its integer part). Both are None for streamed data, whose
        epoch length is unknown. (Lightning's own `current_epoch` is not recorded: a run stopped by `max_steps`
        mid-epoch counts that epoch as finished.)
        """
        import datetime

        import lightning
        import transformers

        record: dict[str, Any] = {
            "format_version": 1,
            "written_by": self.command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": {**self._origin, "lora": asdict(self.lora) if self.lora is not None else None},
            "learning_rates": dict(self.lrs),
            "optimizer": {
                "name": "AdamW",
                "weight_decay": self.weight_decay,
                "betas": list(self.betas),
                "warmup": self.warmup,
                "min_lr_ratio": self.min_lr_ratio,
            },
        }
        trainer = self._trainer  # None outside a Trainer (the `trainer` property would raise)
        if trainer is not None:
            datamodule = trainer.datamodule
            per_epoch = trainer.num_training_batches  # per device; inf for streams
            batch = getattr(datamodule, "batch_size", None)
            accumulate = trainer.accumulate_grad_batches
            elapsed = time.perf_counter() - self._fit_started if self._fit_started is not None else 0.0
            passes = trainer.global_step * accumulate / per_epoch if 0 < per_epoch < math.inf else None
            record.update(
                data=datamodule.describe() if hasattr(datamodule, "describe") else "unknown (not a VLMDataModule)",
                steps=trainer.global_step,
                epochs_seen=round(passes, 3) if passes is not None else None,
                epochs_completed=math.floor(passes) if passes is not None else None,
                batch_size=batch,
                accumulate_grad_batches=accumulate,
                global_batch_size=batch * accumulate * trainer.world_size if batch else None,
                precision=str(trainer.precision),
                compiled=self.compile_model,
                accelerator=trainer.strategy.root_device.type,
                devices=trainer.num_devices,
                num_nodes=trainer.num_nodes,
                strategy=type(trainer.strategy).__name__,
                # A resumed run adds the time up to its checkpoint; work lost after that checkpoint is not counted.
                wall_time_s=round(self._earlier.get("wall_time_s", 0.0) + elapsed, 1),
                last_metrics=self._last_metrics(),
            )
        # Plain strings (torch's version is a str subclass): checkpoints are read with weights_only=True.
        record["versions"] = {
            "lightning": str(lightning.__version__),
            "torch": str(torch.__version__),
            "transformers": str(transformers.__version__),
        }
        return record

    def _last_metrics(self) -> dict[str, Any]:
        """The last training loss and broken-row count (of the last epoch), and the last validation's loss and
        accuracy (from before a resume if this session has not validated yet)."""
        metrics = self.trainer.callback_metrics
        last: dict[str, Any] = {}
        if "train/loss" in metrics:
            last["train_loss"] = float(metrics["train/loss"])
        if "data/train_bad_rows" in metrics:  # the last epoch's, found up front or in the loaders
            last["train_bad_rows"] = int(metrics["data/train_bad_rows"])
        if self._val_step is not None and "val/loss" in metrics:
            last["val_step"] = self._val_step
            last["val_loss"] = float(metrics["val/loss"])
            if "val/accuracy" in metrics:
                last["val_accuracy"] = float(metrics["val/accuracy"])
        else:
            earlier = self._earlier.get("last_metrics") or {}
            last.update({k: v for k, v in earlier.items() if k.startswith("val_")})
        return last

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["vlm"] = self.export_meta()
        checkpoint["rng"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Applied at the first training batch: set now, the restore steps that follow would move the RNGs.
        self._pending_rng = checkpoint.get("rng")
        self._earlier = checkpoint.get("vlm", {}).get("training") or {}

    def on_fit_start(self) -> None:
        self._fit_started = time.perf_counter()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    # ---- optimization ----

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups: each trained part's parameters with and without weight decay, at its rate."""
        groups = []
        for part in PARTS:
            lr = self.lrs[part]
            if lr == 0:
                continue
            decay, no_decay = decay_split(getattr(self.vlm, part))
            groups += [
                {"params": decay, "lr": lr, "weight_decay": self.weight_decay, "name": part},
                {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{part}_no_decay"},
            ]
        return groups

    def configure_optimizers(self):
        groups = [g for g in self.param_groups() if g["params"]]
        if not groups:
            raise VLMError("nothing to train: every learning rate (model.lr_encoder/lr_projector/lr_decoder) is 0")
        device = self.device.type
        clips = (
            device == "cuda" and self.clips_gradients() and isinstance(self.trainer.precision_plugin, MixedPrecision)
        )
        optimizer = torch.optim.AdamW(groups, betas=self.betas, **adamw_options(device, clips))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.warmup * total) if self.warmup < 1 else int(self.warmup)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, self.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def clips_gradients(self) -> bool:
        """Whether training clips gradients (`trainer.gradient_clip_val`; a method that clips its own says so)."""
        return bool(self.trainer.gradient_clip_val)

    def forward(self, batch: dict[str, Any]):
        return self.vlm(
            batch["input_ids"],
            batch.get("attention_mask"),  # packed batches have none: position_ids keep their samples apart
            batch["pixel_values"],
            batch["labels"],
            batch.get("position_ids"),
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        loss = self(batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["num_samples"])
        return loss

    # ---- validation: loss, and exact-match accuracy of generated answers ----

    def on_validation_epoch_start(self) -> None:
        self._correct, self._answered = 0, 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self(batch).loss
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["num_samples"])
        if "generate" in batch:
            from vlm.answers import exact_match

            gen = batch["generate"]
            new = self.vlm.generate(
                gen["input_ids"],
                gen["attention_mask"],
                gen["pixel_values"],
                GenerationOptions(max_new_tokens=self.max_new_tokens),
                self.processor.stop_token_ids,
                self.processor.tokenizer.pad_token_id,
            )
            answers = [self.processor.decode(ids) for ids in new]
            for answer, refs in zip(answers, gen["references"]):
                self._correct += int(exact_match(answer, refs))
                self._answered += 1
            self.score_answers(answers, gen)

    def score_answers(self, answers: list[str], gen: dict[str, Any]) -> None:
        """A hook for methods that judge validation answers further (GRPO: their reward)."""

    def on_validation_epoch_end(self) -> None:
        counts = torch.tensor([self._correct, self._answered], dtype=torch.float64, device=self.device)
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        if counts[1] > 0:
            self.log("val/accuracy", counts[0] / counts[1], prog_bar=True)
        if not self.trainer.sanity_checking:
            self._val_step = self.trainer.global_step

    def export_model(self, state: dict[str, torch.Tensor], out: Path) -> Path:
        """Writes the trained model of `state` (this module's state dict) as a vlm checkpoint folder."""
        from vlm.training_ckpt import export_state

        return export_state(self.export_meta(), state, out)

    # ---- always-on callbacks ----

    def configure_callbacks(self) -> list[Callback]:
        from vlm.train.callbacks import DataHealth, InterruptedWrites, RunArtifacts

        # Lightning's ThroughputMonitor counts each batch's samples (a packed row holds several) and, as its items,
        # real tokens (padding excluded); it logs train/device/items_per_sec (tokens/s of one device) and, on several
        # devices, train/items_per_sec (all of them) over the last THROUGHPUT_WINDOW batches, data loading included,
        # validation not. Also samples and batches per second, and the same for validation (validate/...).
        throughput = ThroughputMonitor(
            batch_size_fn=itemgetter("num_samples"), length_fn=itemgetter("num_tokens"), window_size=THROUGHPUT_WINDOW
        )
        return [InterruptedWrites(), DataHealth(), throughput, RunArtifacts()]
