"""Distributed data parallel training with 2 CPU processes (gloo), through the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from vlm.checkpoint import load

ROOT = Path(__file__).resolve().parents[1]


def test_ddp_with_two_cpu_processes(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "vlm.train.cli",
        "fit",
        "--config",
        "samples/configs/tiny.yaml",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_steps=6",
        "--trainer.val_check_interval=6",
        "--trainer.limit_val_batches=1",
        "--data.batch_size=8",
        "--data.num_workers=0",
        "--data.generate_samples=4",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "distributed_backend=gloo" in log and "All distributed processes registered" in log
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"] == 6  # the loader's resume state
    load(tmp_path / "model")
    record = json.loads((tmp_path / "model" / "training.json").read_text())
    assert record["steps"] == 6 and record["devices"] == 2 and record["strategy"] == "DDPStrategy"
    assert record["batch_size"] == 8 and record["global_batch_size"] == 16
