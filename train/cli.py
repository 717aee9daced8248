"""`vlm fit|validate --config samples/configs/NAME.yaml [--section.key value ...]`, through LightningCLI; the same for
the preference and reinforcement methods, `vlm fit-dpo|fit-reward|fit-grpo --config ...` (`METHODS`).

One run is one folder, `--trainer.default_root_dir` (default: the working directory):
    config.yaml        the resolved configuration (rewritten when the run resumes)
    checkpoints/       periodic checkpoints and last.ckpt (written atomically); resume with `--ckpt_path last`
    metrics.csv        CSV log (appended on resume); tensorboard/ holds the TensorBoard log
    model/             the trained model as a vlm checkpoint folder, written when fit ends
    curves.png         training and validation curves, written when fit ends
"""

from __future__ import annotations

import csv
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from vlm.train.callbacks import AtomicCheckpointIO, StepProgressBar
from vlm.train.data import PairDataModule, PromptDataModule, VLMDataModule
from vlm.train.grpo import GRPOModule
from vlm.train.module import VLMModule
from vlm.train.preference import DPOModule, RewardModule

from vlm.errors import OptionError, VLMError
from vlm.files import read_text

SUBCOMMANDS = ("fit", "validate")
# Training methods beyond supervised training: command -> (training system, data module). Each trains like `vlm fit`.
METHODS = {
    "fit": (VLMModule, VLMDataModule),
    "fit-dpo": (DPOModule, PairDataModule),
    "fit-reward": (RewardModule, PairDataModule),
    "fit-grpo": (GRPOModule, PromptDataModule),
}
# Without a configured ModelCheckpoint, a run still checkpoints this often, and always keeps last.ckpt.
DEFAULT_CHECKPOINT_EVERY = 500
# The largest seed Lightning's seed_everything takes (numpy's legacy seeding: 32 bits).
SEED_LIMIT = 2**32 - 1


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv when it starts; this one appends to it, under its
    header (new columns still rewrite the file with the old rows kept), so a resumed run keeps its history."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


class AppendingCSVLogger(CSVLogger):
    """A CSVLogger whose metrics.csv survives a resume (see `_AppendingWriter`)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def default_loggers(root: str) -> list:
    """CSV (first: it decides `trainer.log_dir`, hence where config.yaml and checkpoints/ go) and TensorBoard, both
    with a fixed version so that a resumed run keeps writing to the same folder."""
    return [AppendingCSVLogger(root, name="", version=""), TensorBoardLogger(root, name="tensorboard", version="")]


class VLMCLI(LightningCLI):
    """LightningCLI for `VLMModule` + `VLMDataModule`, with only the fit and validate subcommands, CSV and
    TensorBoard logging into the run folder unless `trainer.logger` is set, atomic checkpoint writes unless a
    `CheckpointIO` plugin is given, a `ModelCheckpoint` keeping last.ckpt unless one is configured, and a progress
    bar counting steps out of the run's total (`StepProgressBar`) unless one is configured or it is disabled."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in SUBCOMMANDS}

    def parse_arguments(self, parser, args) -> None:
        """Lightning's parsing, then the checks it lacks: `--seed_everything` in the range numpy's seeding takes (it
        raises a bare "... is not in bounds" mid-run otherwise)."""
        super().parse_arguments(parser, args)
        seed = self.config.get(self.config.get("subcommand") or "", {}).get("seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed <= SEED_LIMIT:
            raise OptionError("seed_everything", f"true, false or an integer from 0 to {SEED_LIMIT}", seed)

    def _parse_ckpt_path(self) -> None:
        """Lightning reads `--ckpt_path` here with a bare `torch.load`, for hyperparameters saved in the checkpoint to
        override the config. VLMModule saves none (a run's settings are its config.yaml), so the file is read once,
        when the run resumes (`AtomicCheckpointIO.load_checkpoint`), where one that cannot be read is one line."""

    def instantiate_trainer(self, **kwargs: Any):
        from lightning.fabric.plugins import CheckpointIO

        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(config.get("default_root_dir") or os.getcwd())
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        defaults = []
        checkpointing = config.get("enable_checkpointing") is not False
        if checkpointing and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            defaults.append(ModelCheckpoint(save_last=True, every_n_train_steps=DEFAULT_CHECKPOINT_EVERY))
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            defaults.append(StepProgressBar())
        if defaults:
            kwargs["callbacks"] = [*callbacks, *defaults]
        return super().instantiate_trainer(**kwargs)


class _DropTips(logging.Filter):
    """Drops Lightning's adverts ("💡 Tip: ... try installing litlogger"), logged as information like real news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_lightning() -> None:
    """What `vlm fit` prints is about the run: no adverts, and no deprecation warnings raised inside the libraries
    (e.g. Lightning calling torch's deprecated `LeafSpec`: news for their authors, not for a user). Deprecation warnings
    pointing at vlm's own code, and every other warning, still show."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(?!vlm\b)")


def make_cli(args: list[str], run: bool = True, method: str = "fit") -> VLMCLI:
    """The LightningCLI of a training method (`METHODS`) for `args` (a subcommand first, unless `run` is False);
    runs it when `run`."""
    # The `vlm` entry point passes its own argv on as `args`: that is intended.
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    # A resumed run writes into its own folder again: that is intended.
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty")
    # Frozen parts are kept in eval mode on purpose (train/module.py): that is intended.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # GRPO (manual optimization) checkpoints the model after a batch's optimizer steps, with the step count: intended.
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
    quiet_lightning()
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them
    module, datamodule = METHODS[method]
    prog = "vlm fit" if method == "fit" else f"vlm {method}"
    return VLMCLI(
        module,
        datamodule,
        args=args,
        run=run,
        seed_everything_default=0,
        auto_configure_optimizers=False,  # VLMModule builds its own per-part optimizer and schedule
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"fit": {"prog": prog}, "validate": {"prog": "vlm validate"}} if run else {},
    )


def main(args: list[str]) -> None:
    """Runs `vlm fit ...`, `vlm validate ...` or a method's `vlm fit-METHOD ...`: `args` starts with the subcommand,
    then `--config` and overrides."""
    method = "fit"
    if args and args[0] in METHODS:
        method, args = args[0], ["fit", *args[1:]]
    elif args and args[0] not in SUBCOMMANDS and not args[0].startswith("-"):
        raise VLMError(f"unknown training command {args[0]!r}; choose from {', '.join([*SUBCOMMANDS, *METHODS])}")
    for i, arg in enumerate(args):  # a config file that is not UTF-8 is named (jsonargparse only says "codec ...")
        path = arg.removeprefix("--config=") if arg.startswith("--config=") else None
        path = args[i + 1] if arg == "--config" and i + 1 < len(args) else path
        if path is not None and Path(path).is_file():
            read_text(path)
    try:
        make_cli(args, method=method)
    except MisconfigurationException as e:  # Lightning's word for a bad trainer setting: one line, no traceback
        raise VLMError(str(e).splitlines()[0]) from e


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except VLMError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
