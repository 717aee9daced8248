"""`vlm fit` end to end on CPU: the tiny recipe learns, runs leave a loadable model, resuming is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from train.callbacks import AtomicCheckpointIO
from train.cli import main, make_cli
from train.export import export
from vlm.checkpoint import load

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "samples" / "configs" / "tiny.yaml"
SHAPES = ROOT / "samples" / "data" / "shapes-mini"
# The machine's cores are shared: one intra-op thread avoids oversubscription (the training module never raises it).
torch.set_num_threads(1)
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def test_tiny_recipe_lowers_the_loss_and_leaves_a_loadable_model(tmp_path):
    cli = make_cli(
        [
            "--config",
            str(TINY),
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=30",
            "--trainer.val_check_interval=30",
            "--trainer.limit_val_batches=2",
            "--data.generate_samples=8",
            "--data.num_workers=1",
            *QUIET,
        ],
        run=False,
    )
    before = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]["val/loss"]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]["val/loss"]
    print(f"tiny recipe, 30 steps: validation loss {before:.3f} -> {after:.3f}")
    assert after < 0.75 * before

    # The run folder: resolved config, logs, curves, checkpoints, and the model as a vlm checkpoint folder.
    for name in ("config.yaml", "metrics.csv", "curves.png", "checkpoints/last.ckpt", "model/config.json"):
        assert (tmp_path / name).is_file(), name
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "train/tokens_per_s" in header and "val/accuracy" in header
    model, processor = load(tmp_path / "model")
    trained = cli.model.vlm.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name
    # `vlm export` of the last checkpoint writes the same weights.
    export(str(tmp_path / "checkpoints" / "last.ckpt"), str(tmp_path / "exported"))
    exported, _ = load(tmp_path / "exported")
    for name, value in exported.state_dict().items():
        assert torch.equal(value, trained[name]), name
    # Resuming reads checkpoints as tensors and plain containers only.
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert {"vlm", "rng", "optimizer_states", "lr_schedulers"} <= set(ckpt)


class StopAt(Callback):
    """Simulates a crash: raises when the given optimizer step is reached."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """48 training rows (6 batches of 8 per epoch) and 16 validation rows, from the shipped sample."""
    out = tmp_path_factory.mktemp("data")
    for split, n in (("train", 48), ("val", 16)):
        lines = (SHAPES / f"{split}.jsonl").read_text().splitlines()[: n * 20 : 20]
        rows = [{**json.loads(line), "image": str(SHAPES / json.loads(line)["image"])} for line in lines]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def run_args(root: Path, data: Path) -> list[str]:
    return [
        "--config",
        str(TINY),
        f"--trainer.default_root_dir={root}",
        f"--data.train={data / 'train.jsonl'}",
        f"--data.val={data / 'val.jsonl'}",
        "--data.batch_size=8",
        "--data.num_workers=0",
        "--data.generate_samples=4",
        "--trainer.max_steps=16",
        "--trainer.val_check_interval=5",
        "--trainer.limit_val_batches=1",
        "--trainer.callbacks.init_args.every_n_train_steps=4",
        "--model.warmup=3",
        *QUIET,
    ]


def test_resume_after_a_crash_ends_with_the_same_weights(tmp_path, small_data):
    # Uninterrupted: 16 steps over 3 epochs of 6 batches.
    main(["fit", *run_args(tmp_path / "a", small_data)])
    # Crashes at step 10 (epoch 1, batch 4); the last checkpoint is from step 8, mid-epoch.
    crashed = make_cli(run_args(tmp_path / "b", small_data), run=False)
    crashed.trainer.callbacks.append(StopAt(10))
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.trainer.fit(crashed.model, datamodule=crashed.datamodule)
    last = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8 and last["epoch"] == 1
    assert not (tmp_path / "b" / "model").exists()
    # Resumed: weights, optimizer, schedule, step, RNG states and the position in the epoch come back.
    main(["fit", *run_args(tmp_path / "b", small_data), "--ckpt_path=last"])
    a = load(tmp_path / "a" / "model")[0].state_dict()
    b = load(tmp_path / "b" / "model")[0].state_dict()
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"resumed vs uninterrupted: largest parameter difference {worst}")
    assert worst == 0.0


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    def dies_midway(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
