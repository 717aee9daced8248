"""`vlm bench`: training and generation speed of a vlm model, against transformers' LLaVA with the same shapes.

Both models run in one process on the same random inputs, so ratios compare like with like. They take turns:
`rounds` rounds, each measuring both (vlm first in odd rounds, the baseline first in even ones), so a machine that
speeds up or slows down during the run (a shared CPU does) moves both alike. Within a round every figure is a median
over repeats after warm-up; the figures printed are the medians over rounds, and each ratio is the median of the
rounds' own ratios. Each repeat is timed on its own (stdlib timeit, garbage collection off) by torch.utils.benchmark's
clock, which synchronizes the accelerator before reading the time, so a CUDA repeat ends when its kernels do; the
model not being measured waits on the CPU.

FLOPs per training sample follow the 6 x parameters x tokens rule (Kaplan et al. 2020, "Scaling Laws for Neural
Language Models"; forward 2, backward 4), applied per part because each part sees a different number of tokens:
6 * (encoder params * encoder tokens + projector params * image tokens + decoder params * sequence length).
Decoder params leave out the input embedding table (a lookup, not a matmul) unless it is tied to the output head;
attention's sequence-squared term is left out (small at these lengths). MFU divides the achieved FLOP/s by the
FLOP/s of one large matmul in the same dtype, timed in the same process: a practical peak, not the datasheet's.

Packing (vlm only): the same training step on a batch whose samples have a realistic spread of lengths (text lengths
log-normal around text_tokens / 2, each sample with one image), collated twice by `vlm.collate.Collator`: padded
to the longest sample, and packed into rows of at most pack_tokens. Both carry the same real tokens, so their
tokens/s (padding excluded) compare directly; the padding fraction is the share of the batch's positions that hold
padding. With sdpa or eager attention a packed row still computes the masked-out attention between its samples.
"""

from __future__ import annotations

import copy
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import benchmark

from vlm import checkpoint
from vlm.config import TINY_TOKENIZER, VLMConfig
from vlm.decoder import context_length, resolve_source
from vlm.errors import VLMError
from vlm.generation import GenerationOptions
from vlm.inference import Device, DType, items_from_inputs, run_items
from vlm.model import IGNORE_INDEX, VisionLanguageModel, packing_problem
from vlm.processor import Processor, add_image_token, tokenizer_for

FOLDER_IMAGES = 32  # images in the folder the data pipeline and folder captioning read
# The packing length mix: text lengths log-normal with median text_tokens / 2 and this sigma (a few long
# conversations among many short answers), clipped to [4, 4 x text_tokens] and to the decoder's context.
MIX_SIGMA = 1.0
# How each model generates, each timed: record key -> the setting that picks it (vlm: `GenerationOptions.compile`, the
# own decode loop eager or with its step compiled; transformers: `generate`'s cache_implementation, None for its default
# dynamic cache). The first of each is the pair the main table compares.
GENERATION_PATHS = {
    "vlm": {"generate": False, "generate_compiled": True},
    "baseline": {"generate": None, "generate_static": "static"},
}
# Generation ratios: name -> (vlm's path, the baseline's path).
RATIO_PAIRS = {
    "generate": ("generate", "generate"),
    "generate_vs_static": ("generate", "generate_static"),
    "generate_compiled": ("generate_compiled", "generate"),
    "generate_compiled_vs_static": ("generate_compiled", "generate_static"),
}


def _timed(fn: Callable[[], Any], repeats: int, warmup: int) -> float:
    """Median seconds of `fn` over `repeats` calls after `warmup` untimed ones (see the module docstring)."""
    for _ in range(warmup):
        fn()
    return statistics.median(timeit.Timer(fn, timer=benchmark.timer).repeat(repeat=repeats, number=1))


def _matmul_peak(device: torch.device, dtype: torch.dtype) -> tuple[int, float]:
    """FLOP/s of one square matmul large enough to reach the hardware's practical peak."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return n, 2 * n**3 / _timed(lambda: a @ b, 10, 3)


def _build(preset: str) -> tuple[VisionLanguageModel, Processor, str | None]:
    """A random-weight model of a preset, and a note when its tokenizer had to be stood in for."""
    from transformers import AutoTokenizer

    config = VLMConfig.from_name(preset)
    source = config.decoder.tokenizer or config.decoder.name_or_path
    note = None
    try:  # random weights need no download: a hub tokenizer is read from the local cache or not at all
        tokenizer = AutoTokenizer.from_pretrained(
            resolve_source(source), local_files_only=True, trust_remote_code=False
        )
        add_image_token(tokenizer, config.image_token)
    except OSError:
        # The text is random, so only the vocabulary's size matters: the bundled tokenizer padded with placeholder
        # tokens to the preset's vocabulary (plus the image token) gives the same embedding and head shapes.
        config.decoder.tokenizer = TINY_TOKENIZER
        tokenizer = tokenizer_for(config)
        vocab = config.decoder.hf_config.get("vocab_size", len(tokenizer) - 1) + 1
        tokenizer.add_tokens([f"<|bench_pad_{i}|>" for i in range(vocab - len(tokenizer))])
        note = f"no local copy of the {source} tokenizer: random text over the bundled one padded to {vocab} tokens"
    model = VisionLanguageModel.from_config(config, tokenizer, pretrained=False)
    return model, Processor.from_model(model, tokenizer), note


def _shapes(model: VisionLanguageModel, text_tokens: int) -> dict[str, Any]:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    embedding = model.decoder.get_input_embeddings().weight
    head = model.decoder.get_output_embeddings()
    decoder = count(model.decoder) - (0 if head is not None and head.weight is embedding else embedding.numel())
    grid = model.encoder.grid_size
    encoder_tokens = grid[0] * grid[1] + getattr(model.encoder.model, "num_prefix_tokens", 0)
    n, seq = model.num_image_tokens, model.num_image_tokens + text_tokens
    return {
        "image_size": list(model.encoder.data_config["input_size"][1:]),
        "encoder_tokens": encoder_tokens,
        "image_tokens": n,
        "text_tokens": text_tokens,
        "seq_len": seq,
        "encoder_params": count(model.encoder),
        "projector_params": count(model.projector),
        "decoder_params": decoder,
        "flops_per_sample": 6 * (count(model.encoder) * encoder_tokens + count(model.projector) * n + decoder * seq),
    }


def _baseline_source(
    model: VisionLanguageModel, processor: Processor, folder: Path | None, tmp: Path
) -> tuple[Path | None, VisionLanguageModel | None, Processor, str]:
    """Exports the model (or, if it cannot be, the nearest LLaVA-shaped one) as a transformers LLaVA folder.

    Returns (LLaVA folder or None, the nearest model if one was built, its processor, a note for the output)."""
    from vlm.llava import export_hf

    if folder is None:
        folder = checkpoint.save_checkpoint(model, tmp / "vlm", processor)
    try:
        export_hf(str(folder), str(tmp / "llava"))
        return tmp / "llava", None, processor, "transformers LlavaForConditionalGeneration, the same weights"
    except VLMError as e:
        if model.config.projector.kind != "pixel_shuffle":
            return None, None, processor, f"no baseline: {e}"
    # LLaVA has no pixel shuffle: the nearest LLaVA keeps encoder and decoder and projects every patch (MLP).
    config = copy.deepcopy(model.config)
    config.projector.kind = "mlp"
    nearest = VisionLanguageModel.from_config(config, processor.tokenizer, pretrained=False)
    nearest_processor = Processor.from_model(nearest, processor.tokenizer)
    export_hf(str(checkpoint.save_checkpoint(nearest, tmp / "nearest", nearest_processor)), str(tmp / "llava"))
    note = (
        f"NEAREST SHAPE: transformers LLaVA with the same encoder and decoder but an MLP projector "
        f"({nearest.num_image_tokens} image tokens vs {model.num_image_tokens}); ratios compare the two designs"
    )
    return tmp / "llava", nearest, nearest_processor, note


def _inputs(processor: Processor, shapes: dict[str, Any], batch_size: int, gen_batch_sizes: list[int], vocab: int):
    """A training batch (random text labelled after the image tokens) and generation batches, the same every call."""
    g = torch.Generator().manual_seed(0)
    n, t = shapes["image_tokens"], shapes["text_tokens"]
    h, w = shapes["image_size"]
    text = torch.randint(0, vocab, (batch_size, t), generator=g)
    text[text == processor.image_token_id] = processor.tokenizer.eos_token_id
    ids = torch.cat([torch.full((batch_size, n), processor.image_token_id), text], dim=1)
    labels = torch.cat([torch.full((batch_size, n), IGNORE_INDEX), text], dim=1)
    pixels = torch.randn(max([batch_size, *gen_batch_sizes]), 3, h, w, generator=g)
    train = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixels[:batch_size],
        "labels": labels,
    }
    prompt = processor.prompt(processor.caption_prompt, 1)
    gen = {b: {**processor.pad([prompt] * b, "left"), "pixel_values": pixels[:b]} for b in gen_batch_sizes}
    return train, gen


def _measure(net: nn.Module, processor: Processor, train_batch, gen_batches, shapes, args, peak: float) -> dict:
    """Training step and generation figures for one model (vlm or transformers' LLaVA: same call signatures)."""
    device, dtype, steps, warmup = args[:4]
    to = lambda b: {k: v.to(device, dtype) if k == "pixel_values" else v.to(device) for k, v in b.items()}  # noqa: E731
    own = isinstance(net, VisionLanguageModel)
    train = _train_figures(net, to(train_batch), shapes, device, steps, warmup, peak)
    record = {"train": train}
    if own and args[-1]:  # the same step through `torch.compile(net)` (the module itself stays eager); the first
        compiled = torch.compile(net)  # warm-up step compiles
        record["train_compiled"] = _train_figures(
            compiled, to(train_batch), shapes, device, steps, max(warmup, 1), peak
        )
        record["train_compiled"]["speedup"] = train["step_s"] / record["train_compiled"]["step_s"]
    net.eval()
    stop = set(processor.stop_token_ids) | {processor.tokenizer.pad_token_id}
    for path, setting in GENERATION_PATHS["vlm" if own else "baseline"].items():
        if path == "generate_compiled" and not args[-1]:
            continue
        record[path] = _generation(net, processor, gen_batches, setting, to, args, stop)
    return record


def _train_figures(
    net: nn.Module,
    batch: dict[str, Any],
    shapes: dict[str, Any],
    device: torch.device,
    steps: int,
    warmup: int,
    peak: float,
) -> dict[str, Any]:
    """Step time, throughput, MFU and peak memory of AdamW training steps on `batch` (already on the device); the
    first step's loss."""
    losses: list[float] = []
    step = _train_step(net, batch, losses)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step_s = _timed(step, steps, warmup)
    if device.type == "cuda":
        memory, memory_kind = torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max allocated"
    else:  # KiB on Linux, bytes on macOS; the whole process's peak so far, models before this one included
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        memory, memory_kind = rss / (2**20 if sys.platform == "darwin" else 2**10), "process peak RSS"
    b = batch["input_ids"].shape[0]
    return {
        "step_s": step_s,
        "samples_per_s": b / step_s,
        "tokens_per_s": b * shapes["seq_len"] / step_s,
        "flops_per_s": b * shapes["flops_per_sample"] / step_s,
        "mfu": b * shapes["flops_per_sample"] / step_s / peak,
        "peak_memory_mb": memory,
        "memory_kind": memory_kind,
        "first_loss": losses[0],
    }


def _generation(net: nn.Module, processor: Processor, gen_batches, setting: Any, to, args, stop: set[int]) -> dict:
    """New tokens/s and time to first token per batch size, greedy, for one way of generating (`GENERATION_PATHS`)."""
    _, _, steps, _, new_tokens, _ = args
    own = isinstance(net, VisionLanguageModel)
    gen_repeats = min(steps, 5)
    figures = {}
    for size, gen_batch in gen_batches.items():
        inputs = to(gen_batch)
        prompt_len = inputs["input_ids"].shape[1]

        def run(n: int, inputs=inputs) -> torch.Tensor:
            with torch.no_grad():
                if own:  # no stop tokens: an end-of-turn token must not end a timed run early
                    options = GenerationOptions(max_new_tokens=n, compile=setting)
                    return net.generate(**inputs, options=options, pad_token_id=processor.tokenizer.pad_token_id)
                kw = GenerationOptions(max_new_tokens=n).hf_kwargs(
                    processor.stop_token_ids, processor.tokenizer.pad_token_id
                )  # min_new_tokens: likewise
                return net.generate(**inputs, **kw, min_new_tokens=n, cache_implementation=setting)

        out = run(new_tokens)  # also the warm-up (and, for a compiled step, its compiling)
        new = out if own else out[:, prompt_len:]  # transformers' generate returns prompt + new tokens
        real = min(sum(int(t) not in stop for t in row) for row in new.tolist())
        gen_s = _timed(lambda: run(new_tokens), gen_repeats, 0)
        figures[str(size)] = {
            "new_tokens_per_sample": real,
            "tokens_per_s": size * real / gen_s,
            "ttft_s": _timed(lambda: run(1), gen_repeats, 0),
        }
    return figures


def _train_step(net: nn.Module, batch: dict[str, Any], losses: list[float]) -> Callable[[], None]:
    """One AdamW training step on `batch` (already on the device), recording its loss in `losses`."""
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-6)

    def step() -> None:
        loss = net(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    return step


def _length_mix(
    processor: Processor, shapes: dict[str, Any], batch_size: int, vocab: int, context: int | None
) -> list[dict[str, Any]]:
    """`batch_size` training samples (one image, then random labelled text) with log-normal text lengths."""
    g = torch.Generator().manual_seed(1)
    n, t = shapes["image_tokens"], shapes["text_tokens"]
    longest = min(4 * t, (context or n + 4 * t) - n)
    median = torch.tensor(max(t / 2, 1.0)).log()
    draws = (median + MIX_SIGMA * torch.randn(batch_size, generator=g)).exp()
    lengths = [int(x) for x in draws.round().clamp(min=min(4, longest), max=longest)]
    h, w = shapes["image_size"]
    samples = []
    for length in lengths:
        text = torch.randint(0, vocab, (length,), generator=g)
        text[text == processor.image_token_id] = processor.tokenizer.eos_token_id
        samples.append(
            {
                "input_ids": [processor.image_token_id] * n + text.tolist(),
                "labels": [IGNORE_INDEX] * n + text.tolist(),
                "pixel_values": torch.randn(1, 3, h, w, generator=g),
                "bad": [],
            }
        )
    return samples


def _packing(net: nn.Module, processor: Processor, samples: list[dict], pack_tokens: int | None, args) -> dict:
    """Padded vs packed training steps on the same samples (see the module docstring)."""
    from vlm.collate import Collator

    device, dtype, steps, warmup = args[:4]
    lengths = [len(s["input_ids"]) - s["input_ids"].count(processor.image_token_id) for s in samples]
    real = sum(len(s["input_ids"]) for s in samples)
    pack_tokens = pack_tokens or 2 * max(len(s["input_ids"]) for s in samples)
    record: dict[str, Any] = {
        "samples": len(samples),
        "text_tokens": {"min": min(lengths), "median": sorted(lengths)[len(lengths) // 2], "max": max(lengths)},
        "real_tokens": real,
        "pack_tokens": pack_tokens,
    }
    batches = {"padded": Collator(processor)(samples), "packed": Collator(processor, pack_tokens)(samples)}
    keys = ("input_ids", "attention_mask", "position_ids", "labels")
    on_device = {
        kind: {**{k: b[k].to(device) for k in keys if k in b}, "pixel_values": b["pixel_values"].to(device, dtype)}
        for kind, b in batches.items()
    }
    net.eval()
    with torch.no_grad():  # the same weights for both: the losses must agree (padding or packing, the same samples)
        loss = {kind: net(**b).loss.item() for kind, b in on_device.items()}
    for kind, batch in batches.items():
        step_s = _timed(_train_step(net, on_device[kind], []), steps, warmup)
        rows, width = batch["input_ids"].shape
        record[kind] = {
            "rows": rows,
            "width": width,
            "padding_fraction": 1 - real / (rows * width),
            "step_s": step_s,
            "samples_per_s": len(samples) / step_s,
            "tokens_per_s": real / step_s,
            "loss": loss[kind],
        }
    record["speedup"] = record["packed"]["tokens_per_s"] / record["padded"]["tokens_per_s"]
    return record


def _image_folder(tmp: Path) -> Path:
    """FOLDER_IMAGES PNGs: the sample images under samples/ cycled, or random ones where there are none."""
    from PIL import Image

    from vlm.images import list_images

    folder = tmp / "images"
    folder.mkdir()
    samples_dir = Path(__file__).resolve().parent.parent / "samples" / "images"
    samples = list_images(samples_dir) if samples_dir.is_dir() else []
    g = torch.Generator().manual_seed(0)
    for i in range(FOLDER_IMAGES):
        if samples:
            shutil.copy(samples[i % len(samples)], folder / f"{i:03d}.png")
        else:
            pixels = torch.randint(0, 256, (224, 224, 3), dtype=torch.uint8, generator=g).numpy()
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folder


def _data_rate(processor: Processor, folder: Path, batch_size: int, steps: int) -> dict[str, Any]:
    from PIL import Image

    from vlm.images import list_images, load_image

    paths = list_images(folder)

    def run() -> None:
        for i in range(0, len(paths), batch_size):
            processor.transform([load_image(p) for p in paths[i : i + batch_size]])

    seconds = _timed(run, min(steps, 5), 1)
    with Image.open(paths[0]) as first:
        size = list(first.size)
    return {"images_per_s": len(paths) / seconds, "images": len(paths), "source_size": size}


def _end_to_end(model_dir: Path, folder: Path, device: str, dtype: str, repeats: int, tmp: Path) -> dict[str, Any]:
    """`vlm caption` on one image in a fresh process (start, imports and load included), and on a folder; fresh
    processes that end early (`vlm --help`, a missing image, a bad option) and `python -c "import torch"`."""
    from vlm.checkpoint import open_model
    from vlm.generation import GenerationOptions
    from vlm.images import list_images

    script = shutil.which("vlm", path=str(Path(sys.executable).parent)) or shutil.which("vlm")  # this install's
    vlm = [script] if script else [sys.executable, "-m", "vlm.cli"]
    image = list_images(folder)[0]
    caption = ["caption", str(image), "--model", str(model_dir), "--device", device, "--dtype", dtype]
    runs = {  # name -> (command, its exit code)
        "import_torch": ([sys.executable, "-c", "import torch"], 0),
        "help": ([*vlm, "--help"], 0),
        "missing_image": ([*vlm, "caption", str(tmp / "missing.png"), "--model", str(model_dir)], 2),
        "bad_option": ([*vlm, *caption, "--top_p", "3"], 2),
        "caption": ([*vlm, *caption], 0),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):  # in turns, like the models: a machine whose speed drifts moves all alike
        for name, (cmd, code) in runs.items():
            start = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            times[name].append(time.perf_counter() - start)
            if done.returncode != code:
                raise VLMError(f"`{' '.join(cmd)}` exited {done.returncode}: {done.stderr.strip()[-500:]}", exit_code=1)
    ratios = [c / t for c, t in zip(times["caption"], times["import_torch"], strict=True)]
    start = time.perf_counter()  # what `vlm caption FOLDER` runs once its model is loaded
    net, processor = open_model(str(model_dir), device, dtype)
    items, _ = items_from_inputs([str(folder)], processor.caption_prompt)
    failed = [it.error for it in run_items(items, net, processor, GenerationOptions(), batch_size=8) if it.error]
    folder_s = time.perf_counter() - start
    if failed:
        raise VLMError(f"captioning {folder} failed: {failed[0]}", exit_code=1)
    return {
        "model": str(model_dir),
        "caption_latency_s": statistics.median(times["caption"]),
        "start_s": {name: statistics.median(t) for name, t in times.items()},
        "caption_vs_import_torch": statistics.median(ratios),
        "folder_images_per_s": len(list_images(folder)) / folder_s,
        "folder_images": len(list_images(folder)),
    }


def _ratios(vlm: dict, base: dict) -> dict[str, Any]:
    keys = ("samples_per_s", "tokens_per_s", "mfu", "peak_memory_mb")
    ratios: dict[str, Any] = {"train": {k: vlm["train"][k] / base["train"][k] for k in keys}}
    for name, (ours, theirs) in RATIO_PAIRS.items():
        if ours in vlm and theirs in base:
            ratios[name] = {
                b: {k: g[k] / base[theirs][b][k] for k in ("tokens_per_s", "ttft_s")} for b, g in vlm[ours].items()
            }
    return ratios


def _median_tree(trees: list[Any]) -> Any:
    """The trees' shape, each number the median of the trees' numbers there (other values: the first tree's)."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: _median_tree([t[k] for t in trees]) for k in first}
    if isinstance(first, int | float) and not isinstance(first, bool):
        return statistics.median(trees)
    return first


def _rounds(models: dict[str, tuple], rounds: int, args, peak: float) -> dict[str, Any]:
    """Measures each model `rounds` times, taking turns; models: name -> (module, processor, train, gen, shapes)."""
    device = args[0]
    names = list(models)
    per_round = []
    for i in range(rounds):
        measured = {}
        for name in names if i % 2 == 0 else names[::-1]:
            net, processor, train_batch, gen_batches, shapes = models[name]
            measured[name] = _measure(net.to(device), processor, train_batch, gen_batches, shapes, args, peak)
            if device.type == "cuda":  # one model on the device at a time: its memory figure is its own
                net.to("cpu")
                torch.cuda.empty_cache()
        per_round.append({name: measured[name] for name in names})
    result = {name: _median_tree([r[name] for r in per_round]) for name in names}
    for name in names:  # the first training step's loss is only comparable before any model has trained
        result[name]["train"]["first_loss"] = per_round[0][name]["train"]["first_loss"]
    if "baseline" in result:
        result["ratios"] = _median_tree([_ratios(r["vlm"], r["baseline"]) for r in per_round])
    result["rounds"] = per_round
    return result


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def _table(r: dict[str, Any]) -> str:
    s = r["shapes"]
    lines = [
        f"vlm bench: {r['preset'] or r['model']} on {r['device']} ({r['device_name']}, {r['threads']} threads), "
        f"{r['dtype']}, torch {r['torch']}, transformers {r['transformers']}",
        f"shapes: image {s['image_size'][0]}x{s['image_size'][1]} -> {s['encoder_tokens']} encoder tokens -> "
        f"{s['image_tokens']} image tokens + {s['text_tokens']} text = {s['seq_len']} per sample; params encoder "
        f"{s['encoder_params'] / 1e6:.3g}M projector {s['projector_params'] / 1e6:.3g}M decoder "
        f"{s['decoder_params'] / 1e6:.3g}M; {s['flops_per_sample'] / 1e9:.4g} GFLOP per training sample",
        f"matmul {r['matmul']['size']}^2 {r['dtype']}: {r['matmul']['flops_per_s'] / 1e9:.4g} GFLOP/s (MFU's peak)",
        f"baseline: {r['baseline_note']}",
        f"rounds: {len(r['rounds'])}, the models taking turns; figures: medians over rounds; vlm/base: the median of "
        "the rounds' ratios",
        *[f"note: {n}" for n in r["notes"]],
        "",
        f"{'median':<44}{'vlm':>11}{'baseline':>11}{'vlm/base':>10}",
    ]
    rows = [  # (name, the vlm figure's path, the baseline's, the ratio's)
        (f"train samples/s (batch {r['settings']['batch_size']})", ("train", "samples_per_s")),
        ("train tokens/s", ("train", "tokens_per_s")),
        ("train MFU", ("train", "mfu")),
        (f"train memory MB ({r['vlm']['train']['memory_kind']})", ("train", "peak_memory_mb")),
        ("train first loss (equal if exported)", ("train", "first_loss")),
    ]
    rows = [(name, path, path, path) for name, path in rows]
    for b in r["vlm"]["generate"]:
        for what, key in (("new tokens/s", "tokens_per_s"), ("time to first token s", "ttft_s")):
            rows.append(
                (f"generate batch {b}: {what}", ("generate", b, key), ("generate", b, key), ("generate", b, key))
            )
        rows += [
            ("  compiled step vs default: new tokens/s", ("generate_compiled", b, "tokens_per_s"),
             ("generate", b, "tokens_per_s"), ("generate_compiled", b, "tokens_per_s")),
            ("  eager vs static cache: new tokens/s", ("generate", b, "tokens_per_s"),
             ("generate_static", b, "tokens_per_s"), ("generate_vs_static", b, "tokens_per_s")),
            ("  compiled vs static cache: new tokens/s", ("generate_compiled", b, "tokens_per_s"),
             ("generate_static", b, "tokens_per_s"), ("generate_compiled_vs_static", b, "tokens_per_s")),
        ]  # fmt: skip

    def get(d: dict | None, path: tuple[str, ...]) -> str:
        for key in path:
            d = d.get(key) if isinstance(d, dict) else None
        return _fmt(d)

    for name, ours, theirs, ratio in rows:
        lines.append(
            f"{name:<44}{get(r['vlm'], ours):>11}{get(r['baseline'], theirs):>11}{get(r['ratios'], ratio):>10}"
        )
    extra = [(f"data: load + transform images/s ({r['data']['source_size'][0]}px)", r["data"]["images_per_s"])]
    if r["end_to_end"]:
        e = r["end_to_end"]
        extra += [("vlm caption IMG: s (start, import, load)", e["caption_latency_s"])]
        extra += [("  / python -c 'import torch' (median ratio)", e["caption_vs_import_torch"])]
        extra += [(f"  start: {name.replace('_', ' ')} s", t) for name, t in e["start_s"].items() if name != "caption"]
        extra += [(f"vlm caption FOLDER: images/s ({e['folder_images']}, load incl.)", e["folder_images_per_s"])]
    lines += [f"{name:<44}{_fmt(value):>11}" for name, value in extra]
    if "train_compiled" in r["vlm"]:
        eager, compiled = r["vlm"]["train"], r["vlm"]["train_compiled"]
        lines += [
            "",
            f"{'training (vlm), the same step':<44}{'eager':>11}{'compiled':>11}{'speedup':>10}",
            f"{'train samples/s':<44}{_fmt(eager['samples_per_s']):>11}{_fmt(compiled['samples_per_s']):>11}"
            f"{_fmt(compiled['speedup']):>10}",
            f"{'train memory MB (' + eager['memory_kind'] + ')':<44}{_fmt(eager['peak_memory_mb']):>11}"
            f"{_fmt(compiled['peak_memory_mb']):>11}",
        ]
    p = r["packing"]
    if p is None:
        return "\n".join(lines)
    pad, pack, text = p["padded"], p["packed"], p["text_tokens"]
    shape = lambda k: f"{k['rows']}x{k['width']}"  # noqa: E731
    lines += [
        "",
        f"packing (vlm): {p['samples']} samples of {s['image_tokens']} image tokens + {text['min']}-{text['max']} "
        f"text (median {text['median']}); packed rows of at most {p['pack_tokens']} tokens",
        f"{'median':<44}{'padded':>11}{'packed':>11}{'pack/pad':>10}",
        f"{'rows x row length':<44}{shape(pad):>11}{shape(pack):>11}",
        f"{'padding fraction':<44}{_fmt(pad['padding_fraction']):>11}{_fmt(pack['padding_fraction']):>11}",
        f"{'train real tokens/s':<44}{_fmt(pad['tokens_per_s']):>11}{_fmt(pack['tokens_per_s']):>11}"
        f"{_fmt(p['speedup']):>10}",
        f"{'loss (same weights: equal)':<44}{_fmt(pad['loss']):>11}{_fmt(pack['loss']):>11}",
    ]
    return "\n".join(lines)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def bench(
    preset: str = "tiny",
    model: str | None = None,
    batch_size: int = 8,
    gen_batch_sizes: list[int] = [1, 8],  # noqa: B006 (read only; jsonargparse shows it in --help)
    text_tokens: int = 128,
    new_tokens: int = 32,
    steps: int = 10,
    warmup: int = 3,
    rounds: int = 3,
    device: Device = "auto",
    dtype: DType = "auto",
    pack_tokens: int | None = None,
    baseline: bool = True,
    compile: bool = True,
    output: str | None = None,
) -> int:
    """Measure training and generation speed against a transformers LLaVA baseline with the same shapes.

    Prints a table of medians and vlm/baseline ratios on stderr and a JSON record on stdout (or to --output).
    Training: full AdamW steps on random images and text; MFU is relative to a matmul timed in this process.
    Generation: greedy, exactly new_tokens tokens; first-token time is a generate of one token. vlm's own decode
    loop is timed eager and with its step compiled, transformers' generate with its default and its static cache.
    Also times the data pipeline and, for --model or the default checkpoint, `vlm caption` end to end and the
    start of a fresh `vlm` process (--help, a missing image, a bad option) against `python -c "import torch"`.
    Packing: the same step on batch_size samples of spread lengths, padded vs packed (padding fraction, real
    tokens/s, loss).

    Args:
        preset: A named preset built with random weights: tiny, shapes, nanovlm-222m, llava-222m.
        model: A vlm checkpoint folder to measure instead of a preset.
        batch_size: Training batch size (also the samples of the packing length mix).
        gen_batch_sizes: Generation batch sizes, e.g. [1,32].
        text_tokens: Text tokens per training sample (after the image tokens); the packing length mix's median
            is half this.
        new_tokens: New tokens per generated sample.
        steps: Timed training steps (generation and data: at most 5 repeats; `vlm caption` runs: at most 3).
        warmup: Untimed training steps first (generation: one untimed call per batch size).
        rounds: Rounds of measuring both models in turn; figures are medians over rounds.
        device: Where to run: auto (CUDA when available), cpu, cuda or cuda:N (the GPU numbered N).
        dtype: Weights' precision: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16.
        pack_tokens: Longest packed row of the packing comparison (as data.pack_tokens in training); default:
            twice the mix's longest sample.
        baseline: Also measure transformers' LlavaForConditionalGeneration.
        compile: Also time vlm's training step through `torch.compile` (samples/s and peak memory beside eager's)
            and the own decode loop with its step compiled (on a CPU each first compiles for a minute or more,
            untimed).
        output: Write the JSON record to this file instead of stdout.
    """
    import timm
    import transformers

    settings = {k: v for k, v in locals().items() if k not in ("timm", "transformers")}  # the call, for the record
    sizes = (batch_size, text_tokens, new_tokens, steps, rounds, *gen_batch_sizes)
    if min(sizes) < 1 or warmup < 0 or not gen_batch_sizes:
        raise VLMError("batch sizes, text_tokens, new_tokens, steps and rounds must be at least 1, warmup at least 0")
    if pack_tokens is not None and pack_tokens < 1:
        raise VLMError("pack_tokens must be at least 1")
    dev = checkpoint.resolve_device(device)
    dt = checkpoint.resolve_dtype(dtype, dev)
    notes: list[str] = []
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="vlm-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if model is not None:
            net, processor = checkpoint.load(model)
        else:
            net, processor, note = _build(preset)
            notes += [note] if note else []
        shapes = _shapes(net, text_tokens)
        vocab = net.decoder.get_input_embeddings().num_embeddings
        train_batch, gen_batches = _inputs(processor, shapes, batch_size, gen_batch_sizes, vocab)
        needed = max(shapes["seq_len"], gen_batches[gen_batch_sizes[0]]["input_ids"].shape[1] + new_tokens)
        context = context_length(net.decoder)
        if context is not None and needed > context:
            raise VLMError(f"text_tokens / new_tokens need {needed} positions, over the decoder's context of {context}")
        source = hf_dir = None
        note = "skipped (--no_baseline)"
        if baseline:
            hf_dir, source, base_processor, note = _baseline_source(net, processor, Path(model) if model else None, tmp)
        n, peak = _matmul_peak(dev, dt)
        args = (dev, dt, steps, warmup, new_tokens, compile)
        models = {"vlm": (net.to(dt), processor, train_batch, gen_batches, shapes)}
        base_shapes = None
        if hf_dir is not None:
            from transformers import LlavaForConditionalGeneration

            base_shapes = _shapes(source, text_tokens) if source is not None else shapes
            base_train, base_gen = train_batch, gen_batches
            if source is not None:
                base_train, base_gen = _inputs(base_processor, base_shapes, batch_size, gen_batch_sizes, vocab)
            llava = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=dt, trust_remote_code=False)
            models["baseline"] = (llava, base_processor, base_train, base_gen, base_shapes)
            del llava  # held by `models` only
        results = _rounds(models, rounds, args, peak)
        del models  # free the baseline before the end-to-end runs
        packing = None  # after the rounds: its training steps must not change the weights the first losses compare
        problem = packing_problem(net.decoder)
        if problem is None:
            mix = _length_mix(processor, shapes, batch_size, vocab, context)
            packing = _packing(net.to(dev, dt), processor, mix, pack_tokens, args)
        else:
            notes.append(f"packing not measured: {problem}")
        del net
        folder = _image_folder(tmp)
        data = _data_rate(processor, folder, batch_size, steps)
        e2e_dir = Path(model) if model else checkpoint.DEFAULT_MODEL_DIR
        e2e = None
        if (e2e_dir / checkpoint.CONFIG_FILE).is_file():
            e2e = _end_to_end(e2e_dir, folder, dev.type, dtype, min(steps, 3), tmp)
    record = {
        "preset": None if model else preset,
        "model": model,
        "device": dev.type,
        "device_name": _device_name(dev),
        "threads": torch.get_num_threads(),
        "dtype": str(dt).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "settings": settings,
        "shapes": shapes,
        "matmul": {"size": n, "flops_per_s": peak},
        "vlm": results["vlm"],
        "baseline": results.get("baseline"),
        "baseline_note": note,
        "baseline_shapes": base_shapes,
        "ratios": results.get("ratios"),
        "rounds": results["rounds"],
        "packing": packing,
        "data": data,
        "end_to_end": e2e,
        "notes": notes,
    }
    print(_table(record), file=sys.stderr)
    text = json.dumps(record, indent=2)
    if output:
        Path(output).write_text(text + "\n")
        print(f"wrote {output}", file=sys.stderr)
    else:
        print(text)
    return 0
