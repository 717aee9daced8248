"""Callbacks every vlm training run gets (`VLMModule.configure_callbacks`), the progress bar of `vlm fit`, and the
atomic checkpoint writer."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info
from vlm.train.data import bad_rows_report, check_bad_fraction

from vlm.files import atomic_file, remove_interrupted_writes
from vlm.training_ckpt import read_training_checkpoint


class DataHealth(Callback):
    """Counts the broken rows of each epoch, every kind alike, one per row: those found while indexing (the data
    module's `train_errors` / `val_errors`) and those found in loader workers (carried in `batch["bad"]`). Reports
    them with the first few reasons, logs `data/bad_rows` at the end of each training and validation epoch, and
    stops the run with a one-line `VLMError` above `data.max_bad_fraction`.

    The share is taken of all the rows of the epoch, read or not: an epoch cut short (`trainer.max_steps`,
    `limit_*_batches`) is not judged as if the rows found broken up front were all in the part it read."""

    def __init__(self) -> None:
        self.seen = {"train": 0, "val": 0}
        self.bad: dict[str, dict[str, str]] = {"train": {}, "val": {}}

    def _count(self, stage: str, batch: dict[str, Any]) -> None:
        self.seen[stage] += batch["num_samples"]  # samples, not rows: a packed row holds several
        for key, message in batch["bad"]:
            self.bad[stage].setdefault(key, message)

    def _report(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        upfront = list(getattr(datamodule, f"{stage}_errors", []))
        found = list(self.bad[stage].items())
        counts = torch.tensor([len(found), self.seen[stage]], dtype=torch.float64, device=pl_module.device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        indexed = max(int(counts[1]), _num_rows(getattr(datamodule, f"{stage}_set", None)))
        num_bad, total = int(counts[0]) + len(upfront), indexed + len(upfront)
        self.seen[stage], self.bad[stage] = 0, {}
        if trainer.sanity_checking:
            return
        name = "training" if stage == "train" else "validation"
        pl_module.log(f"data/{stage}_bad_rows", float(num_bad), sync_dist=False)
        if num_bad:
            rank_zero_info(bad_rows_report(f"epoch {trainer.current_epoch}, {name} data", upfront + found, total))
        limit = getattr(datamodule, "max_bad_fraction", 1.0)
        check_bad_fraction(num_bad, total, limit, f"{name} data", upfront + found)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._count("train", batch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, pl_module, "train")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._count("val", batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, pl_module, "val")


def _num_rows(dataset: Any) -> int:
    """The indexed rows of a map-style dataset; 0 for a stream (its rows are counted as they are read)."""
    try:
        return len(dataset)
    except TypeError:
        return 0


class InterruptedWrites(Callback):
    """At the start of a fit, deletes what a killed run left in the run folder and the checkpoint folders:

    - `atomic_file`'s temporary files (`.NAME.PID.partial`) whose writer is no longer running;
    - periodic checkpoints that no `ModelCheckpoint` of this run keeps (`orphaned_checkpoints`). A `ModelCheckpoint`
      deletes only the files it remembers, and it remembers what the checkpoint it resumes from says: a run killed
      between writing a new checkpoint and deleting the one it replaces leaves a file that no later run would ever
      delete (nor overwrite: the next save of the same step takes a `-v1` name instead).
    """

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        folders = {Path(trainer.default_root_dir)}
        folders |= {Path(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)}
        for folder in sorted(folders):
            for path in remove_interrupted_writes(folder):
                rank_zero_info(f"removed {path}, left by an interrupted write")
        for path in orphaned_checkpoints(trainer):
            path.unlink(missing_ok=True)
            rank_zero_info(f"removed {path}, a checkpoint of an earlier run that this run's checkpoints do not keep")


def orphaned_checkpoints(trainer: Trainer) -> list[Path]:
    """The periodic checkpoints in the trainer's `ModelCheckpoint` folders that none of them keeps: files named the
    way Lightning names them by default (`epoch=E-step=S.ckpt`, `-vN` for a repeated name) that no callback in that
    folder remembers (its best k, best, k-th best and last paths, as restored from the checkpoint the run resumes from)
    and that are not the checkpoint the run resumes from. Never `last.ckpt` (it is not named so). A folder where a
    callback keeps every checkpoint (`save_top_k=-1`) or names its files itself (`filename`) is left alone: its
    files cannot be told apart from others'."""
    by_folder: dict[Path, list[ModelCheckpoint]] = {}
    for c in trainer.checkpoint_callbacks:
        if isinstance(c, ModelCheckpoint) and c.dirpath:
            by_folder.setdefault(Path(c.dirpath), []).append(c)
    resumed = trainer.ckpt_path
    resumed = {Path(resumed).resolve()} if resumed and "://" not in str(resumed) else set()
    orphans = []
    for folder, callbacks in sorted(by_folder.items()):
        if not folder.is_dir() or any(c.save_top_k == -1 or c.filename is not None for c in callbacks):
            continue
        kept = set(resumed)
        for c in callbacks:
            remembered = [*c.best_k_models, c.best_model_path, c.kth_best_model_path, c.last_model_path]
            kept |= {Path(p).resolve() for p in remembered if p}
        names = {re.compile(r"epoch=\d+-step=\d+(-v\d+)?" + re.escape(c.FILE_EXTENSION)) for c in callbacks}
        for path in sorted(folder.iterdir()):
            named = any(n.fullmatch(path.name) for n in names)
            if named and path.is_file() and not path.is_symlink() and path.resolve() not in kept:
                orphans.append(path)
    return orphans


class RunArtifacts(Callback):
    """At the end of a successful fit: the trained model as a vlm checkpoint folder (`<run>/model`, with the run's
    training record, training.json) and a plot of the training and validation curves (`<run>/curves.png`)."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        state = trainer.strategy.lightning_module_state_dict()  # every rank: sharded strategies gather here
        if not trainer.is_global_zero:
            return
        root = Path(trainer.default_root_dir)
        out = pl_module.export_model(state, root / "model")
        rank_zero_info(f"trained model saved to {out} (load it with: vlm caption --model {out} IMAGE)")
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.save()
                extra = getattr(pl_module, "curve_metrics", ())
                if plot_curves(Path(logger.log_dir) / "metrics.csv", root / "curves.png", extra):
                    rank_zero_info(f"training curves plotted to {root / 'curves.png'}")


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """A CSVLogger `metrics.csv` -> {metric: [(step, value), ...]}."""
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in (None, ""):
                    series.setdefault(key, []).append((step, float(value)))
    return series


def plot_curves(metrics_csv: Path, out: Path, extra: tuple[str, ...] = ()) -> bool:
    """Plots training/validation loss (and validation accuracy) against the step, and each metric of `extra` that
    was logged in a panel of its own (rewards, margins, KL, ...); False when there is nothing."""
    if not metrics_csv.is_file():
        return False
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, never opens a window

    series = read_metrics(metrics_csv)
    if "train/loss" not in series and "val/loss" not in series:
        return False
    has_accuracy = "val/accuracy" in series
    extra = tuple(key for key in extra if key in series)
    panels = 1 + has_accuracy + len(extra)
    fig = Figure(figsize=(2 + 4 * panels, 4), tight_layout=True)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        if key in series:
            steps, values = zip(*series[key])
            axes[0].plot(steps, values, style, label=key, markersize=3)
    axes[0].set(xlabel="step", ylabel="loss", yscale="log")
    axes[0].legend()
    if has_accuracy:
        steps, values = zip(*series["val/accuracy"])
        axes[1].plot(steps, values, "o-", markersize=3, label="val/accuracy")
        axes[1].set(xlabel="step", ylabel="accuracy", ylim=(0, 1))
        axes[1].legend()
    for ax, key in zip(axes[1 + has_accuracy :], extra):
        steps, values = zip(*series[key])
        ax.plot(steps, values, "-" if key.startswith("train/") else "o-", markersize=3)
        ax.set(xlabel="step", title=key)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return True


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting optimizer steps out of the run's total (`trainer.max_steps`, else the steps of
    `max_epochs`) across epochs, rather than batches out of one epoch: a resumed run starts at the step it resumed
    from. The description names the epoch in progress, counted from 0."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        bar = self.train_progress_bar
        bar.total = None if math.isinf(total) else int(total)
        bar.initial = bar.n = bar.last_print_n = trainer.global_step  # a resumed run's rate counts its own steps
        self.on_train_epoch_start(trainer)  # not called when a run resumes mid-epoch

    def on_train_epoch_start(self, trainer: Trainer, *_: Any) -> None:
        self.train_progress_bar.set_description(f"epoch {trainer.current_epoch}, step")  # and shows the bar

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step, bar = trainer.global_step, self.train_progress_bar
        if self._should_update(step, bar.total) and not bar.disable:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in its own folder, fsyncs it, then renames it over the target, so a
    run killed mid-save leaves the previous checkpoint intact. (Lightning's own save goes through an fsspec
    transaction that writes into the system temp folder and moves the file: a copy, not an atomic rename, whenever
    that folder is on another filesystem.) Loads through `read_training_checkpoint` (`torch.load(weights_only=True)`):
    a training checkpoint holds only tensors and plain containers, so resuming never unpickles code, and a file that
    holds more is one line naming it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_file(path, "wb") as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location: Any | None = lambda storage, loc: storage, weights_only=None):
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return read_training_checkpoint(path, map_location)
