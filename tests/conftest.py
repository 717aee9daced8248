"""Shared fixtures for the core tests: tiny models of several decoder families, tiny checkpoints and images.

Models come from the `tiny` preset (milliseconds to build once torch/transformers are imported); the decoder
families differ only in `decoder.hf_config`. A freshly initialised tiny decoder tends to repeat one token
whatever it is shown, which would let a broken cache or padding pass unnoticed, so `scramble` gives the
decoder larger random weights: greedy outputs then depend on every input token and every image.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image

if TYPE_CHECKING:
    from vlm.config import VLMConfig

# The test models are tiny: one thread is faster than two fighting over a shared machine's cores (read by torch
# when it is first imported, which happens after this file is loaded; subprocesses inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow (minutes each on a CPU)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# Tiny transformers configs of several causal-LM families; each spells its sizes its own way.
DECODERS: dict[str, dict | None] = {
    "llama": None,  # the preset's own (SmolLM-shaped) Llama
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 256},
    "gptj": {"model_type": "gptj", "n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 256, "rotary_dim": 16},
    "qwen2": {
        "model_type": "qwen2",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 128,
        "max_position_embeddings": 256,
    },
}
# Each family as above, plus decoders whose image tokens take grid positions (vlm/positions.py).
FAMILIES = [*DECODERS, "llama-grid", "qwen2-grid"]


def family_config(family: str) -> VLMConfig:
    """`tiny_config` for a name of `FAMILIES`."""
    name, _, grid = family.partition("-")
    return tiny_config(name, image_positions="grid" if grid else "sequence")


SMALL_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_config(
    decoder: str = "llama",
    encoder: str | None = None,
    overrides: dict | None = None,
    projector: str = "mlp",
    factor: int = 2,
    keep_prefix_tokens: bool = False,
    image_positions: str = "sequence",
) -> VLMConfig:
    """The `tiny` preset with another decoder family, encoder or projector swapped in."""
    from vlm.config import VLMConfig

    config = VLMConfig.from_name("tiny")
    if DECODERS[decoder] is not None:
        config.decoder.hf_config = copy.deepcopy(DECODERS[decoder])
    if encoder is not None:
        config.encoder.name = encoder
        config.encoder.overrides = dict(SMALL_VIT if overrides is None else overrides)
    elif overrides is not None:
        config.encoder.overrides = dict(overrides)
    config.encoder.keep_prefix_tokens = keep_prefix_tokens
    config.projector.kind = projector
    config.projector.factor = factor
    config.image_positions = image_positions
    return config


def scramble(model, seed: int = 0, std: float = 0.2):
    """Redraws the decoder's weight matrices with a larger spread, so generation depends on its inputs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.decoder.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def build_tiny(config: VLMConfig | None = None, seed: int = 0, scrambled: bool = True):
    """(model, processor) in eval mode, deterministic for a seed."""
    import torch

    from vlm.checkpoint import build
    from vlm.config import VLMConfig

    torch.manual_seed(seed)
    model, processor = build(config or VLMConfig.from_name("tiny"), pretrained=False)
    if scrambled:
        scramble(model, seed)
    return model.eval(), processor


def assert_same_weights(a, b) -> None:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="session")
def tiny():
    """The scrambled tiny Llama VLM and its processor (treat as read-only)."""
    return build_tiny()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny checkpoint written by the same function `vlm init --preset tiny DIR` runs."""
    from vlm.commands import init

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    assert init(str(out), preset="tiny", seed=0) == 0
    return out


@pytest.fixture(scope="session")
def varied_checkpoint(tiny_checkpoint: Path, tmp_path_factory) -> Path:
    """The `vlm init` checkpoint with its decoder scrambled, so CLI predictions are non-empty and input-dependent."""
    from vlm.checkpoint import load, save_checkpoint

    model, processor = load(tiny_checkpoint)
    out = tmp_path_factory.mktemp("ckpt") / "varied"
    save_checkpoint(scramble(model, seed=1), out, processor)
    return out


def labelled_spans(labels: list[int]) -> list[list[int]]:
    """Runs of consecutive labelled positions (the answer spans of a label row)."""
    from vlm.processor import IGNORE_INDEX  # not at the top: torch must load after OMP_NUM_THREADS is set

    spans, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return spans + ([current] if current else [])


def solid(color: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> Image.Image:
    return Image.new("RGB", size, color)


@pytest.fixture(scope="session")
def pil_images() -> list[Image.Image]:
    """Small RGB images that differ in colour, layout and size."""
    half = solid((255, 0, 0), (40, 24))
    half.paste((0, 0, 255), (0, 0, 20, 24))
    return [solid((250, 30, 30)), solid((20, 200, 40), (16, 48)), half, solid((240, 240, 240), (64, 64))]


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory, pil_images) -> Path:
    """A folder of three good PNGs (a.png, c.png, d.png) and a text file named b.png."""
    folder = tmp_path_factory.mktemp("images")
    pil_images[0].save(folder / "a.png")
    (folder / "b.png").write_text("not an image")
    pil_images[1].save(folder / "c.png")
    pil_images[2].save(folder / "d.png")
    return folder


def training_batch(processor, images: list[Image.Image]) -> dict:
    """A right-padded training batch: a one-image VQA, a two-image turn and a text-only chat."""
    conversations = [
        ([{"role": "user", "content": "<image>\nWhat colour is it?"}, {"role": "assistant", "content": "red"}], 1),
        (
            [
                {"role": "user", "content": "Compare <image> with <image>."},
                {"role": "assistant", "content": "the left one is green"},
            ],
            2,
        ),
        ([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}], 0),
    ]
    encoded = [processor.encode(messages, n, placeholders=True) for messages, n in conversations]
    batch = processor.pad([ids for ids, _ in encoded], "right", [labels for _, labels in encoded])
    batch["pixel_values"] = processor.transform(images[:3])
    return batch


def vlm_command() -> list[str]:
    """The `vlm` console script of this Python's environment (else the one on PATH, else `python -m vlm.cli`): a
    virtual environment's script is found even when its bin/ folder is not on PATH."""
    script = shutil.which("vlm", path=str(Path(sys.executable).parent)) or shutil.which("vlm")
    return [script] if script else [sys.executable, "-m", "vlm.cli"]


def run_vlm(
    args: list, cwd: Path | None = None, stdin: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Runs the installed `vlm` console script (see `vlm_command`) in a subprocess, with `stdin` as its input if
    given (else none); a run past `timeout` seconds fails the test (`TimeoutExpired`)."""
    env = {k: v for k, v in os.environ.items() if k != "VLM_DEBUG"}
    feed = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
    return subprocess.run(
        [*vlm_command(), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **feed
    )


def finishes_within(seconds: float, fn: Callable[[], Any]) -> Any:
    """`fn()`'s result (or its exception), or a test failure when it has not returned after `seconds`: for code
    that hangs when it regresses (e.g. opening a named pipe), so the test fails instead of hanging the run."""
    outcome: list = []

    def call() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as e:  # handed to the test's thread below
            outcome.append((False, e))

    threading.Thread(target=call, daemon=True).start()
    deadline = time.monotonic() + seconds
    while not outcome and time.monotonic() < deadline:
        time.sleep(0.01)
    assert outcome, f"did not finish within {seconds} s"
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
