"""`vlm bench` (eval/bench.py) on the tiny preset: the record's contents, never its timings."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from vlm.eval import bench as bench_module
from vlm.eval.bench import bench

from vlm.cli import main


def _numbers(tree, path: str = ""):
    """(path, value) for every number in a JSON tree."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        yield path, tree


def test_timed_is_the_median_of_single_calls_after_the_warmup():
    calls = []

    def fn() -> None:
        calls.append(len(calls))
        time.sleep(0.3 if len(calls) == 4 else 0.001)  # the second timed call is slow

    seconds = bench_module._timed(fn, repeats=3, warmup=2)
    assert len(calls) == 5  # --warmup and --steps are exact counts
    assert 0.001 <= seconds < 0.1  # the median: one slow call does not move it (the mean would be over 0.1)


def test_bench_tiny_record(tmp_path, monkeypatch, capsys):
    # No end-to-end runs here (they start processes): pretend the default checkpoint is not there.
    monkeypatch.setattr(bench_module.checkpoint, "DEFAULT_MODEL_DIR", tmp_path / "no-default-model")
    out = tmp_path / "bench.json"
    args = dict(steps=2, warmup=1, rounds=3, gen_batch_sizes=[1, 2], new_tokens=4, text_tokens=16, batch_size=4)
    args["compile"] = False  # compiling the step takes minutes on a CPU
    assert bench(preset="tiny", output=str(out), **args) == 0
    r = json.loads(out.read_text())

    assert r["preset"] == "tiny" and r["device"] == "cpu" and r["dtype"] == "float32"
    assert r["torch"] and r["transformers"] and r["device_name"]
    s = r["shapes"]
    assert s["text_tokens"] == 16 and s["seq_len"] == s["image_tokens"] + 16
    for part in ("vlm", "baseline"):
        assert set(r[part]["train"]) >= {"samples_per_s", "tokens_per_s", "mfu", "peak_memory_mb", "first_loss"}
        second = {"vlm": "generate_compiled", "baseline": "generate_static"}[part]
        assert set(r[part]["generate"]) == {"1", "2"} and set(r[part].get(second, {"1": 0, "2": 0})) == {"1", "2"}
        for g in [*r[part]["generate"].values(), *r[part].get(second, {}).values()]:
            assert g["new_tokens_per_sample"] == 4  # no early end of turn
            assert g["tokens_per_s"] > 0 and g["ttft_s"] > 0
        # throughput follows from the step time: samples/s * tokens per sample = tokens/s
        t = r[part]["train"]
        assert t["tokens_per_s"] == pytest.approx(t["samples_per_s"] * s["seq_len"])
    # The baseline is the exported model itself: the same weights give the same loss on the same batch.
    assert r["baseline"]["train"]["first_loss"] == pytest.approx(r["vlm"]["train"]["first_loss"], rel=1e-4)
    assert r["baseline_shapes"] == s
    assert set(r["ratios"]["train"]) == {"samples_per_s", "tokens_per_s", "mfu", "peak_memory_mb"}
    assert "generate_compiled" not in r["vlm"] and "generate_static" in r["baseline"]  # --no_compile; the static cache
    assert set(r["ratios"]) == {"train", "generate", "generate_vs_static"}
    assert set(r["ratios"]["generate"]) == set(r["ratios"]["generate_vs_static"]) == {"1", "2"}
    # Three rounds, the models taking turns: each figure is the median over rounds, each ratio the median of the
    # rounds' own ratios (not the ratio of the medians).
    rounds = r["rounds"]
    assert len(rounds) == 3 and all(set(x) == {"vlm", "baseline"} for x in rounds)
    for part in ("vlm", "baseline"):
        per_round = sorted(x[part]["generate"]["2"]["tokens_per_s"] for x in rounds)
        assert r[part]["generate"]["2"]["tokens_per_s"] == per_round[1]
        assert r[part]["train"]["first_loss"] == rounds[0][part]["train"]["first_loss"]
    ratios = sorted(x["vlm"]["train"]["samples_per_s"] / x["baseline"]["train"]["samples_per_s"] for x in rounds)
    assert r["ratios"]["train"]["samples_per_s"] == pytest.approx(ratios[1])
    assert r["data"]["images_per_s"] > 0 and r["end_to_end"] is None
    # Packing: the same samples padded (a row each) and packed (rows of at most twice the longest); same loss.
    p = r["packing"]
    pad, pack = p["padded"], p["packed"]
    assert p["samples"] == 4 and pad["rows"] == 4 and pack["rows"] < 4 and p["pack_tokens"] == 2 * pad["width"]
    assert pad["width"] <= pack["width"] <= p["pack_tokens"]
    for k in (pad, pack):
        assert k["padding_fraction"] == pytest.approx(1 - p["real_tokens"] / (k["rows"] * k["width"]))
        assert 0 <= k["padding_fraction"] < 1 and k["tokens_per_s"] > 0
    assert pack["loss"] == pytest.approx(pad["loss"], rel=1e-5)
    assert p["speedup"] == pytest.approx(pack["tokens_per_s"] / pad["tokens_per_s"])
    assert p["text_tokens"]["min"] <= p["text_tokens"]["median"] <= p["text_tokens"]["max"] <= 4 * 16
    numbers = dict(_numbers({k: v for k, v in r.items() if k not in ("settings", "packing")}))
    assert numbers and all(v > 0 for v in numbers.values()), {k: v for k, v in numbers.items() if v <= 0}

    table = capsys.readouterr().err
    assert "vlm/base" in table and "generate batch 2: new tokens/s" in table and "train MFU" in table
    assert "padding fraction" in table and "pack/pad" in table and "rounds: 3" in table


@pytest.mark.slow  # compiling the training step and the decode step: minutes on a CPU
def test_bench_compiled_training_beside_eager(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(bench_module.checkpoint, "DEFAULT_MODEL_DIR", tmp_path / "no-default-model")
    compile = torch.compile  # Dynamo and AOTAutograd without inductor's C++ code generation
    monkeypatch.setattr(torch, "compile", lambda *a, **kw: compile(*a, **{**kw, "backend": "aot_eager"}))
    out = tmp_path / "bench.json"
    args = dict(steps=2, warmup=1, rounds=1, gen_batch_sizes=[1], new_tokens=2, text_tokens=8, batch_size=2)
    assert bench(preset="tiny", output=str(out), baseline=False, **args) == 0
    r = json.loads(out.read_text())
    eager, compiled = r["vlm"]["train"], r["vlm"]["train_compiled"]
    assert set(compiled) >= {"samples_per_s", "tokens_per_s", "mfu", "peak_memory_mb", "speedup"}
    assert compiled["speedup"] == pytest.approx(compiled["samples_per_s"] / eager["samples_per_s"])
    assert "training (vlm), the same step" in capsys.readouterr().err


def test_bench_checkpoint_end_to_end(tiny_checkpoint: Path, tmp_path, capsys):
    """A checkpoint folder is measured as given, and `vlm caption` is timed on it end to end."""
    assert bench(model=str(tiny_checkpoint), steps=1, warmup=0, gen_batch_sizes=[1], new_tokens=2, text_tokens=4,
                 batch_size=1, rounds=1, baseline=False, compile=False) == 0  # fmt: skip
    r = json.loads(capsys.readouterr().out)  # the record goes to stdout without --output
    assert r["model"] == str(tiny_checkpoint) and r["preset"] is None
    assert r["baseline"] is None and r["ratios"] is None and "skipped" in r["baseline_note"]
    assert len(r["rounds"]) == 1 and set(r["rounds"][0]) == {"vlm"}
    e = r["end_to_end"]
    assert e["model"] == str(tiny_checkpoint) and e["folder_images"] > 1
    assert e["caption_latency_s"] > 0 and e["folder_images_per_s"] > 0
    # Fresh processes: each ran (and exited as it should: 2 for the missing image and the bad option, else bench fails)
    assert set(e["start_s"]) == {"import_torch", "help", "missing_image", "bad_option", "caption"}
    assert e["start_s"]["caption"] == e["caption_latency_s"] and e["caption_vs_import_torch"] > 0


def test_bench_bad_input(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--steps", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "steps and rounds must be at least 1" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--rounds", "0"])
    assert exit_info.value.code == 2
    assert "rounds must be at least 1" in capsys.readouterr().err


def test_bench_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: vlm bench" in out and "--gen_batch_sizes" in out and "--no_baseline" in out
