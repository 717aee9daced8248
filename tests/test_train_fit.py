"""`vlm fit` end to end on CPU: the tiny recipe learns, runs leave a loadable model, resuming is exact."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch
from conftest import run_vlm
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from vlm.train.callbacks import AtomicCheckpointIO, InterruptedWrites
from vlm.train.cli import main, make_cli

from vlm.checkpoint import load
from vlm.errors import VLMError
from vlm.model_card import write_model_card
from vlm.training_ckpt import import_ckpt

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
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert "val/accuracy" in rows[0]
    # Throughput (Lightning's ThroughputMonitor over the last 10 batches, logged every 10 steps): its items are the
    # real tokens, several per sample.
    speeds = [r for r in rows if r["train/device/items_per_sec"]]
    assert [int(r["step"]) for r in speeds] == [9, 19, 29]
    assert all(float(r["train/device/items_per_sec"]) > 10 * float(r["train/device/samples_per_sec"]) for r in speeds)
    model, processor = load(tmp_path / "model")
    trained = cli.model.vlm.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name
    # Beside the weights, the record of the run, which the model card summarizes.
    record = json.loads((tmp_path / "model" / "training.json").read_text())
    shapes = "samples/data/shapes-mini"
    assert record["written_by"] == "vlm fit" and record["steps"] == 30 and record["model"]["config"] == "tiny"
    assert record["data"]["train"] == [
        {"source": f"{shapes}/train.jsonl", "rows": 4000, "broken_rows": 0},
        {"source": f"{shapes}/train_captions.jsonl", "rows": 200, "broken_rows": 0},
    ]
    assert record["data"]["val"] == [{"source": f"{shapes}/val.jsonl", "rows": 400, "broken_rows": 0}]
    assert record["learning_rates"] == {"encoder": 1e-3, "projector": 1e-3, "decoder": 1e-3}
    assert record["batch_size"] == 32 and record["global_batch_size"] == 32 and record["precision"] == "32-true"
    assert record["epochs_seen"] == round(30 / 132, 3)  # 4200 rows in batches of 32
    assert record["versions"]["lightning"] == lightning.__version__ and record["wall_time_s"] > 0
    last = record["last_metrics"]
    assert last["val_step"] == 30 and last["val_loss"] == pytest.approx(after, rel=1e-5) and 0 < last["train_loss"]
    card = write_model_card(tmp_path / "model").read_text()
    assert f"- **Data**: `{shapes}/train.jsonl` (4,000 rows), `{shapes}/train_captions.jsonl` (200 rows)" in card
    assert "- **Steps**: 30 optimizer steps" in card and f"validation loss {last['val_loss']:.4f}" in card
    # `vlm import-ckpt` of the last checkpoint writes the same weights, and the record as of that checkpoint.
    import_ckpt(str(tmp_path / "checkpoints" / "last.ckpt"), str(tmp_path / "exported"))
    exported, _ = load(tmp_path / "exported")
    for name, value in exported.state_dict().items():
        assert torch.equal(value, trained[name]), name
    from_ckpt = json.loads((tmp_path / "exported" / "training.json").read_text())
    assert from_ckpt["written_by"] == f"vlm import-ckpt of {tmp_path / 'checkpoints' / 'last.ckpt'}"
    assert from_ckpt["steps"] == 30 and from_ckpt["data"] == record["data"]
    # A checkpoint from before runs recorded themselves: what Lightning stored, and the data said to be unknown.
    old = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    del old["vlm"]["training"]
    torch.save(old, tmp_path / "old.ckpt")
    import_ckpt(str(tmp_path / "old.ckpt"), str(tmp_path / "old"))
    from_old = json.loads((tmp_path / "old" / "training.json").read_text())
    assert from_old["steps"] == 30 and from_old["data"].startswith("unknown")
    assert from_old["learning_rates"] == record["learning_rates"] and "last_metrics" not in from_old
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
    records = [json.loads((tmp_path / run / "model" / "training.json").read_text()) for run in ("a", "b")]
    assert [r["steps"] for r in records] == [16, 16] and [r["epochs_seen"] for r in records] == [2.667, 2.667]
    assert records[1]["data"] == records[0]["data"] and records[1]["data"]["train"][0]["rows"] == 48
    # The log keeps what the crashed part wrote (the resumed part starts at step 8) and adds the rest.
    with open(tmp_path / "b" / "metrics.csv", newline="") as f:
        logged = {int(row["step"]) for row in csv.DictReader(f) if row.get("step")}
    assert min(logged) < 8 and max(logged) >= 14
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


def test_a_short_run_is_judged_on_all_the_rows_of_its_epoch(tmp_path, small_data, caplog):
    # 2 broken rows of 50 (4%) against data.max_bad_fraction=0.05: a run of 2 steps reads 16 of them. The 2 rows
    # found broken up front were once counted against only the 16 read (2 of 18, 11.1%) and the run refused.
    lines = (small_data / "train.jsonl").read_bytes().splitlines(keepends=True)
    bad = [b'{"question": "caf\xe9?", "answer": "b"}\n', b"{not json\n"]  # the first is Latin-1, not UTF-8
    (tmp_path / "train.jsonl").write_bytes(b"".join(lines[:10] + bad[:1] + lines[10:30] + bad[1:] + lines[30:]))
    args = [
        *run_args(tmp_path / "run", small_data),
        f"--data.train={tmp_path / 'train.jsonl'}",
        "--data.max_bad_fraction=0.05",
        "--trainer.max_steps=2",
    ]
    cli = make_cli(args, run=False)
    with caplog.at_level("INFO"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert "epoch 0, training data: 2 of 50 rows broken and skipped (4.00%)" in caplog.text
    assert f"{tmp_path / 'train.jsonl'}: line 11: not valid UTF-8 (byte 0xe9 at column 18)" in caplog.text
    assert f"{tmp_path / 'train.jsonl'}: line 32: bad JSON" in caplog.text
    # One more broken row (3 of 51, 5.9%) is over the limit, and the run says which rows.
    (tmp_path / "train.jsonl").write_bytes((tmp_path / "train.jsonl").read_bytes() + b"[]\n")
    cli = make_cli(args, run=False)
    with pytest.raises(VLMError) as e:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert str(e.value).startswith(
        "3 of 51 rows (5.9%) of the training data "
        f"{tmp_path / 'train.jsonl'} are broken, more than data.max_bad_fraction=0.05; first: "
        f"{tmp_path / 'train.jsonl'}: line 11: not valid UTF-8"
    )
    assert "line 32: bad JSON" in str(e.value) and "line 51: a row must be a JSON object" in str(e.value)


def test_broken_rows_found_in_workers_are_reported_and_can_stop_the_run(tmp_path, small_data, caplog):
    rows = [json.loads(line) for line in (small_data / "train.jsonl").read_text().splitlines()[:20]]
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    for k in (3, 8, 13, 18):
        rows.insert(k, {"image": str(tmp_path / "corrupt.png"), "question": "What?", "answer": "circle"})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        *run_args(tmp_path / "run", small_data),
        f"--data.train={tmp_path / 'train.jsonl'}",
        "--data.num_workers=1",
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=3",
    ]
    # The images are only opened in the loader worker; the count still reaches the main process.
    strict = make_cli([*args, "--data.max_bad_fraction=0.1"], run=False)
    with pytest.raises(VLMError, match=r"^4 of 24 rows \(16.7%\) of the training data are broken") as e:
        strict.trainer.fit(strict.model, datamodule=strict.datamodule)
    assert "\n" not in str(e.value) and "corrupt" in str(e.value)

    lenient = make_cli([*args, "--data.max_bad_fraction=0.5"], run=False)
    with caplog.at_level("INFO"):
        lenient.trainer.fit(lenient.model, datamodule=lenient.datamodule)
    assert "epoch 0, training data: 4 of 24 rows broken and skipped (16.67%)" in caplog.text
    metrics = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    column = metrics[0].split(",").index("data/train_bad_rows")
    assert [line.split(",")[column] for line in metrics[1:] if line.split(",")[column]] == ["4.0"]


def test_fit_prints_the_run_only_and_counts_steps(tmp_path, small_data):
    """`vlm fit` prints no adverts and no library deprecation warnings; its bar counts steps out of max_steps, and a
    resumed run starts at the step it resumed from. The record counts epochs one way: passes, and whole passes."""
    args = [a for a in run_args(tmp_path, small_data) if a not in QUIET]
    runs = [run_vlm(["fit", *args, "--trainer.max_steps=8"])]
    runs.append(run_vlm(["fit", *args, "--trainer.max_steps=12", "--ckpt_path=last"]))
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
        out = run.stdout + run.stderr
        for noise in ("litlogger", "Tip:", "LeafSpec", "deprecated", "/-"):
            assert noise not in out, noise
    first, resumed = (run.stdout.replace("\r", "\n") for run in runs)
    assert re.search(r"\b8/8 \[", first) and re.search(r"\b1/8 \[", first)
    # Resumed from the checkpoint of step 8: the bar starts there.
    assert re.search(r"\b8/12 \[", resumed) and re.search(r"\b12/12 \[", resumed)
    assert not re.search(r"\b[1-7]/12 \[", resumed)
    record = json.loads((tmp_path / "model" / "training.json").read_text())
    assert (record["steps"], record["epochs_seen"], record["epochs_completed"]) == (
        12,
        2.0,
        2,
    ) and "epoch" not in record


def test_a_run_clears_the_temporary_files_of_killed_writes(tmp_path, small_data):
    """Temporary files of atomic writes whose writer died are deleted when the next run starts in the folder; those
    of a live writer, and other files, are left alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getppid()  # a running process other than this one (whose own writes reuse its temporary names)
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir(parents=True)
    planted = {
        checkpoints / f".epoch=0-step=4.ckpt.{dead.pid}.partial": False,
        checkpoints / f".last.ckpt.{dead.pid}.partial": False,
        tmp_path / f".config.yaml.{dead.pid}.partial": False,
        checkpoints / f".last.ckpt.{live}.partial": True,  # still being written
        checkpoints / "notes.partial": True,  # not an atomic write's
    }
    for path in planted:
        path.write_bytes(b"half a checkpoint")
    main(["fit", *run_args(tmp_path, small_data), "--trainer.max_steps=2"])
    assert {path: path.exists() for path in planted} == planted
    assert (checkpoints / "last.ckpt").is_file()


def test_a_run_prunes_the_checkpoints_a_killed_run_left(tmp_path):
    """A run killed between writing a periodic checkpoint and deleting the one it replaces leaves a file its
    ModelCheckpoint never learns about (resuming restores what the checkpoint remembers). The next run deletes such
    files; never last.ckpt, the checkpoint it resumes from, what a ModelCheckpoint remembers, or other files."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    names = ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt", "epoch=1-step=6-v1.ckpt"]
    names += ["last.ckpt", "by-hand.ckpt", "notes.txt"]
    for name in names:
        (checkpoints / name).write_bytes(b"a checkpoint")

    def start_run(resume: str | None, remembered: str | None, **settings) -> list[str]:
        callback = ModelCheckpoint(dirpath=checkpoints, save_last=True, **settings)
        trainer = lightning.Trainer(default_root_dir=tmp_path, callbacks=[callback], logger=False)
        if remembered is not None:  # what the checkpoint resumed from says (Lightning restores it before on_fit_start)
            callback.load_state_dict({**callback.state_dict(), "best_model_path": str(checkpoints / remembered)})
        trainer.ckpt_path = str(checkpoints / resume) if resume else None
        InterruptedWrites().on_fit_start(trainer, None)
        return sorted(p.name for p in checkpoints.iterdir())

    # Keeping every checkpoint: nothing is pruned.
    assert start_run("last.ckpt", "epoch=0-step=4.ckpt", save_top_k=-1) == sorted(names)
    # Resumed from last.ckpt, which remembers step 4: step 2 was never deleted, step 6 was written after it.
    kept = ["by-hand.ckpt", "epoch=0-step=4.ckpt", "last.ckpt", "notes.txt"]
    assert start_run("last.ckpt", "epoch=0-step=4.ckpt") == kept
    # Resumed from a file by hand: it is kept, whatever it is named; a fresh run keeps no periodic checkpoint.
    assert start_run("epoch=0-step=4.ckpt", None) == kept
    assert start_run(None, None) == ["by-hand.ckpt", "last.ckpt", "notes.txt"]


def test_fit_refuses_unreadable_inputs_in_one_line(tmp_path, small_data):
    # A pickled checkpoint: torch's weights_only refuses it, and the run says so in one line naming the file.
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": print}, evil)
    with pytest.raises(VLMError) as err:
        main(["fit", *run_args(tmp_path / "run", small_data), f"--ckpt_path={evil}"])
    assert str(err.value) == (
        f"training checkpoint {evil} holds pickled Python objects (print); vlm reads only tensors and plain "
        "containers and never unpickles code"
    )
    image = ROOT / "samples" / "images" / "shapes_0.png"
    with pytest.raises(VLMError, match=f"^cannot read training checkpoint {image}: Unsupported operand 80$"):
        AtomicCheckpointIO().load_checkpoint(image)
    with pytest.raises(VLMError, match=f"^data file not found: {tmp_path / 'missing.jsonl'}$"):
        main(["fit", *run_args(tmp_path / "run", small_data), f"--data.train={tmp_path / 'missing.jsonl'}"])


def test_fit_names_the_option_or_file_it_refuses(tmp_path, small_data):
    with pytest.raises(VLMError) as err:
        main(["fit", *run_args(tmp_path, small_data), f"--seed_everything={2**70}"])
    assert str(err.value) == f"seed_everything must be true, false or an integer from 0 to {2**32 - 1}, got {2**70}"
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("trainer:\n  max_steps: caf\u00e9\n".encode("latin-1"))
    for args in (["--config", str(latin)], [f"--config={latin}"]):
        with pytest.raises(VLMError, match=f"^{latin} is not UTF-8 text \\(byte 0xe9 at offset 25\\)$"):
            main(["fit", *run_args(tmp_path, small_data), *args])


class Losses(Callback):
    """Records each training step's loss."""

    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


@pytest.mark.slow  # about 100 s each on a busy 2-core CPU; inductor over 10 minutes until its on-disk cache is warm
@pytest.mark.parametrize(
    "backend",
    [
        # Dynamo's graph capture and AOTAutograd (what could change the numerics or the parameter names) without
        # inductor's C++ code generation; then the default backend, inductor.
        "aot_eager",
        "inductor",
    ],
)
def test_compiled_training_matches_eager_and_checkpoints_plain_names(tmp_path, small_data, monkeypatch, backend):
    def losses(root: Path, steps: int, *extra: str, resume: bool = False) -> list[float]:
        args = [
            *run_args(root, small_data),
            f"--trainer.max_steps={steps}",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.callbacks.init_args.every_n_train_steps=2",
            *extra,
        ]
        cli = make_cli(args, run=False)
        record = Losses()
        cli.trainer.callbacks.append(record)
        last = root / "checkpoints" / "last.ckpt"
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=last if resume else None)
        return record.losses

    eager = losses(tmp_path / "eager", 3)
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **kw: compile(*a, **{**kw, "backend": backend}))
    compiled = losses(tmp_path / "compiled", 2, "--model.compile=true")
    # Resumed from the compiled run's step-2 checkpoint, compiled again.
    compiled += losses(tmp_path / "compiled", 3, "--model.compile=true", resume=True)
    print(f"losses: eager {eager}, compiled ({backend}) {compiled}")
    assert compiled == pytest.approx(eager, rel=1e-4)
    ckpt = torch.load(tmp_path / "compiled" / "checkpoints" / "last.ckpt", weights_only=True)
    assert not [k for k in ckpt["state_dict"] if "_orig_mod" in k]
    assert ckpt["vlm"]["training"]["compiled"] is True
    a, b = (load(tmp_path / run / "model")[0].state_dict() for run in ("eager", "compiled"))
    assert a.keys() == b.keys()
