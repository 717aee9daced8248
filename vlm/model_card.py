"""Model cards: a checkpoint folder's README.md, generated from the folder's own files, never hand-written numbers.

Sources, all inside the checkpoint folder:

* `config.json` and `processor_config.json`: the architecture;
* `model.safetensors`: parameter counts per part, read from the file's header without loading any weights;
* `training.json` (if present): the record of the training run that `vlm fit` and `vlm import-ckpt` write
  (`vlm.train.module.VLMModule.training_record`), summarized; a record in another format is shown as it is;
* `eval_results.json`: the latest `vlm eval` results per benchmark, written by `vlm eval` through
  `write_model_card(dir, report)`. Each result records the SHA-256 of the weights it was measured on; results of
  other weights (the folder was trained further or overwritten since) are kept in the file but not shown as this
  model's numbers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from vlm.config import CONFIG_FILE, PARTS, PROCESSOR_FILE, WEIGHTS_FILE
from vlm.errors import VLMError
from vlm.files import read_json, write_text

CARD_FILE = "README.md"
EVAL_RESULTS_FILE = "eval_results.json"
TRAINING_FILE = "training.json"
# The parts of a `vlm eval` report an eval_results.json entry keeps (not the per-row failures).
_RESULT_KEYS = (
    "data", "task", "answer_regex", "num_rows", "num_scored", "num_failed", "metrics", "by_type", "type_counts",
    "by_subtype", "subtype_counts", "notes",
    "generation", "dtype", "evaluated_at",
)  # fmt: skip


def parameter_counts(model_dir: str | Path) -> dict[str, int]:
    """Parameters per top-level part (encoder, projector, decoder, and any other prefix) and "total".

    Read from the safetensors header (shapes only). Tied weights are stored once, so each counts once, as in
    `sum(p.numel() for p in model.parameters())`.
    """
    from safetensors import safe_open

    counts = dict.fromkeys(PARTS, 0)
    with safe_open(str(Path(model_dir) / WEIGHTS_FILE), framework="pt") as f:
        for name in f.keys():
            n = 1
            for dim in f.get_slice(name).get_shape():
                n *= dim
            part = name.split(".", 1)[0]
            counts[part] = counts.get(part, 0) + n
    counts["total"] = sum(counts.values())
    return counts


def _weights_dtypes(model_dir: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(model_dir / WEIGHTS_FILE), framework="pt") as f:
        return sorted({f.get_slice(name).get_dtype() for name in f.keys()})


def weights_digest(model_dir: str | Path) -> str:
    """SHA-256 of model.safetensors: which weights an evaluation measured."""
    h = hashlib.sha256()
    with (Path(model_dir) / WEIGHTS_FILE).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_eval_results(model_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The recorded `vlm eval` results of a checkpoint folder, keyed by benchmark (data file or dataset)."""
    path = Path(model_dir) / EVAL_RESULTS_FILE
    if not path.is_file():
        return {}
    results = read_json(path).get("results", {})
    if not isinstance(results, dict):
        raise VLMError(f"{path}: 'results' must map benchmarks to results")
    return results


def result_key(report: dict[str, Any]) -> str:
    """The key of a report in eval_results.json: its data, plus the answer regex it was scored with, if any."""
    regex = report.get("answer_regex")
    return str(report["data"]) + (f" | answer_regex {regex}" if regex else "")


def record_eval_result(model_dir: str | Path, report: dict[str, Any], digest: str | None = None) -> None:
    """Stores a `vlm eval` report in the folder's eval_results.json, replacing any earlier one for the same data
    (scored the same way: see :func:`result_key`)."""
    model_dir = Path(model_dir)
    missing = [k for k in ("data", "task", "metrics") if k not in report]
    if missing:
        raise VLMError(f"not a vlm eval report: it has no {', '.join(missing)}")
    results = read_eval_results(model_dir)
    entry = {k: report[k] for k in _RESULT_KEYS if k in report}
    entry["weights_sha256"] = digest or weights_digest(model_dir)
    results[result_key(report)] = entry
    text = json.dumps({"format_version": 1, "results": results}, indent=2, ensure_ascii=False) + "\n"
    write_text(model_dir / EVAL_RESULTS_FILE, text)


def write_model_card(model_dir: str | Path, report: dict[str, Any] | None = None) -> Path:
    """(Re)writes README.md in a checkpoint folder from the folder's files; returns its path.

    Args:
        model_dir: The checkpoint folder (config.json + model.safetensors).
        report: A `vlm eval` report to record first in the folder's eval_results.json (keyed by its data).
    """
    model_dir = Path(model_dir)
    if not (model_dir / CONFIG_FILE).is_file() or not (model_dir / WEIGHTS_FILE).is_file():
        raise VLMError(f"not a vlm checkpoint folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}): {model_dir}")
    digest = weights_digest(model_dir)
    if report is not None:
        record_eval_result(model_dir, report, digest)
    card = render_model_card(model_dir, digest)
    path = model_dir / CARD_FILE
    write_text(path, card)
    return path


# ---- rendering -----------------------------------------------------------------------------------------------------


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10_000 else str(n)


def _kv(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def _describe_parts(config: dict[str, Any]) -> dict[str, str]:
    enc, proj, dec = config.get("encoder", {}), config.get("projector", {}), config.get("decoder", {})
    overrides = f" ({_kv(enc['overrides'])})" if enc.get("overrides") else ""
    prefix = ", class/register tokens kept" if enc.get("keep_prefix_tokens") else ""
    encoder = f"timm `{enc.get('name')}`{overrides}; features of layer {enc.get('feature_layer', -1)}{prefix}"
    projector = f"`{proj.get('kind', 'mlp')}`"
    if proj.get("kind") == "pixel_shuffle":
        projector += f", factor {proj.get('factor')} ({proj.get('factor', 1) ** 2}x fewer image tokens)"
    hf = dec.get("hf_config", {})
    shape = [
        f"{hf['num_hidden_layers']} layers" if "num_hidden_layers" in hf else None,
        f"hidden size {hf['hidden_size']}" if "hidden_size" in hf else None,
        f"{hf['num_attention_heads']} attention heads" if "num_attention_heads" in hf else None,
        f"{hf['num_key_value_heads']} key/value heads" if "num_key_value_heads" in hf else None,
        f"FFN {hf['intermediate_size']}" if "intermediate_size" in hf else None,
        f"vocabulary {hf['vocab_size']}" if "vocab_size" in hf else None,
        f"context {hf['max_position_embeddings']} tokens" if "max_position_embeddings" in hf else None,
        "tied input/output embeddings" if hf.get("tie_word_embeddings") else None,
    ]
    decoder = f"transformers `{hf.get('model_type', '?')}`: " + ", ".join(s for s in shape if s)
    if dec.get("name_or_path"):
        decoder += f"; architecture of `{dec['name_or_path']}`"
    return {"encoder": encoder, "projector": projector, "decoder": decoder}


def _architecture(model_dir: Path, config: dict[str, Any], processor: dict[str, Any]) -> list[str]:
    counts = parameter_counts(model_dir)
    total = counts["total"]
    parts = _describe_parts(config)
    lines = ["| part | architecture | parameters |", "|---|---|---:|"]
    for part in [*PARTS, *(p for p in counts if p not in (*PARTS, "total"))]:
        share = f" ({100 * counts[part] / total:.1f}%)" if total else ""
        lines.append(f"| {part} | {parts.get(part, '')} | {counts[part]:,}{share} |")
    lines.append(f"| **total** | | **{total:,}** ({_millions(total)}) |")
    lines.append("")
    size = (model_dir / WEIGHTS_FILE).stat().st_size
    lines.append(f"- Weights: `{WEIGHTS_FILE}`, {', '.join(_weights_dtypes(model_dir))}, {size / 1e6:.1f} MB.")
    if processor:
        h, w = processor.get("transform", {}).get("size", ["?", "?"])
        lines.append(
            f"- Images: resized to {w}x{h} pixels, {processor.get('num_image_tokens')} image tokens each, "
            f"placeholder `{processor.get('image_token', config.get('image_token'))}`."
        )
        if processor.get("max_length"):
            lines.append(f"- Context: {processor['max_length']} tokens, image tokens included.")
    dec = config.get("decoder", {})
    tokenizer = dec.get("tokenizer") or dec.get("name_or_path")
    if tokenizer:  # a local folder is named, not its machine-specific path
        shown = Path(tokenizer).name if Path(tokenizer).is_absolute() else tokenizer
        lines.append(f"- Tokenizer: `{shown}`, saved in this folder.")
    lines.append(f'- Caption prompt: "{config.get("caption_prompt", "")}".')
    return lines


def _training(model_dir: Path) -> list[str]:
    path = model_dir / TRAINING_FILE
    if not path.is_file():
        return [f"Unknown: this folder has no `{TRAINING_FILE}` (the record a training run writes beside the weights)."]
    record = read_json(path)
    if not isinstance(record, dict):
        return [f"`{TRAINING_FILE}`: `{json.dumps(record)[:500]}`"]
    if record.get("format_version") == 1:
        return _training_summary(record)
    lines = [f"From `{TRAINING_FILE}`:", ""]
    for key, value in record.items():
        shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        if len(shown) > 300:
            shown = shown[:297] + "..."
        lines.append(f"- **{key}**: {shown}")
    return lines


def _sources(sources: list[dict[str, Any]]) -> str:
    shown = []
    for s in sources:
        name = f"`{s.get('source')}`" + (f" [{s['split']}]" if s.get("split") else "")
        if s.get("rows") is None:
            shown.append(f"{name} (rows not counted)")
        else:
            broken = f"; {s['broken_rows']:,} broken rows skipped" if s.get("broken_rows") else ""
            shown.append(f"{name} ({s['rows']:,} rows{broken})")
    return ", ".join(shown) or "none"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3 * 3600 else f"{seconds / 3600:.1f} h"


def _training_summary(r: dict[str, Any]) -> list[str]:
    """The record `vlm fit` / `vlm import-ckpt` write, as a few lines; fields a record lacks are left out."""
    when = f"on {r.get('date', '?')}"
    if r.get("exported_at"):  # a training checkpoint's record: `date` is when the checkpoint was saved
        when = f"on {r['exported_at']}, from a checkpoint saved {r.get('date', '?')}"
    lines = [f"Recorded by `{r.get('written_by', '?')}` {when}; the full record is `{TRAINING_FILE}`.", ""]
    model = r.get("model") or {}
    if model.get("init_from"):
        start = f"initialised from `{model['init_from']}`"
    elif model.get("config") == "custom":
        start = "a custom config (see config.json)"
    elif model.get("config"):
        start = f"preset `{model['config']}`"
    else:
        start = None
    if start and not model.get("init_from") and "pretrained" in model:  # init_from loads that folder's weights
        start += ", pretrained weights loaded as the config names them" if model["pretrained"] else ", from scratch"
    grown = model.get("expand_decoder")
    if start and grown:
        start += f"; decoder expanded from {grown['from_layers']} to {grown['to_layers']} layers"
        start += " (new ones start as the identity)"
    if model.get("lora"):
        lora = model["lora"]
        start = (start + "; " if start else "") + f"LoRA r={lora.get('r')}, alpha={lora.get('alpha')} (merged)"
    if start:
        lines.append(f"- **Start**: {start}.")
    data = r.get("data")
    if isinstance(data, dict):
        val = f"; validation: {_sources(data['val'])}" if data.get("val") else ""
        streamed = " (streamed)" if data.get("streaming") else ""
        bad = (r.get("last_metrics") or {}).get("train_bad_rows")
        bad = f"; {bad:,} broken rows skipped in the last epoch" if bad else ""
        lines.append(f"- **Data**: {_sources(data.get('train') or [])}{streamed}{val}{bad}.")
    elif data is not None:
        lines.append(f"- **Data**: {data}.")
    if r.get("steps") is not None:
        steps = f"{r['steps']:,} optimizer steps"
        if r.get("epochs_seen") is not None:
            steps += f" ({r['epochs_seen']} passes over the training rows)"
        elif r.get("epochs_completed") is not None:
            steps += f" (whole passes over the training rows: {r['epochs_completed']})"
        if r.get("global_batch_size"):
            world = (r.get("devices") or 1) * (r.get("num_nodes") or 1)
            steps += (
                f", {r['global_batch_size']:,} rows per step ({r.get('batch_size')} per device x {world} device(s)"
                f" x {r.get('accumulate_grad_batches', 1)} accumulated)"
            )
        lines.append(f"- **Steps**: {steps}.")
    lrs = r.get("learning_rates") or {}
    if lrs:
        shown = ", ".join(f"{part} {lr}" if lr != 0 else f"{part} frozen" for part, lr in lrs.items())
        opt = r.get("optimizer") or {}
        if opt.get("name"):
            shown += f"; {opt['name']}, weight decay {opt.get('weight_decay')}, warmup {opt.get('warmup')}"
            shown += f", cosine decay to {opt.get('min_lr_ratio')}x"
        lines.append(f"- **Learning rates** (peak): {shown}.")
    if r.get("accelerator"):
        hardware = f"{r.get('devices')} x {r['accelerator']} ({r.get('strategy')}), precision {r.get('precision')}"
        if r.get("wall_time_s") is not None:
            hardware += f"; wall time {_duration(r['wall_time_s'])}"
        lines.append(f"- **Hardware**: {hardware}.")
    last = r.get("last_metrics") or {}
    losses = []
    if last.get("train_loss") is not None:
        losses.append(f"training loss {format_metric(last['train_loss'])} (last step)")
    if last.get("val_loss") is not None:
        accuracy = f", accuracy {format_metric(last['val_accuracy'])}" if last.get("val_accuracy") is not None else ""
        losses.append(f"validation loss {format_metric(last['val_loss'])}{accuracy} (step {last.get('val_step')})")
    if losses:
        lines.append(f"- **Final losses**: {'; '.join(losses)}.")
    versions = r.get("versions") or {}
    if versions:
        lines.append(f"- **Software**: {', '.join(f'{k} {v}' for k, v in versions.items() if v)}.")
    return lines


def format_metric(value: Any) -> str:
    """A metric value in a table: 4 decimals, "-" when missing."""
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def metric_rows(report: dict[str, Any]) -> list[tuple[str, str, Any, dict[str, Any]]]:
    """A `vlm eval` report's table rows: (level, group, row count, metrics) for the overall scores, then each type,
    then each subtype; the count is None where the report lacks it. Both the printed summary and the model card
    render these."""
    rows = [("overall", "overall", report.get("num_scored"), report.get("metrics", {}))]
    for level in ("type", "subtype"):
        counts = report.get(f"{level}_counts", {})
        rows += [(level, group, counts.get(group), m) for group, m in report.get(f"by_{level}", {}).items()]
    return rows


def _evaluation(results: dict[str, dict[str, Any]], digest: str) -> list[str]:
    current = {k: v for k, v in results.items() if v.get("weights_sha256") == digest}
    stale = len(results) - len(current)
    if not current:
        lines = ["No `vlm eval` results for these weights yet (`vlm eval --model DIR --data FILE` records them)."]
    else:
        lines = ["Measured by `vlm eval` on these exact weights (recorded in `eval_results.json`)."]
    for data, r in sorted(current.items()):
        names = list(r.get("metrics", {}))
        lines += [
            "",
            f"### `{data}`",
            "",
            (f"Scored on the last match of `{r['answer_regex']}` in each answer. " if r.get("answer_regex") else "")
            + f"Task {r.get('task')}; {r.get('num_rows')} rows, {r.get('num_scored')} scored, "
            f"{r.get('num_failed')} failed; evaluated {r.get('evaluated_at', '?')}"
            + (f", {r['dtype']}" if r.get("dtype") else "")
            + (f", generation {_kv(r['generation'])}" if r.get("generation") else "")
            + ".",
            "",
            "| | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names),
        ]
        for level, group, count, m in metric_rows(r):
            label = ("subtype " if level == "subtype" else "") + (group if count is None else f"{group} ({count})")
            lines.append(f"| {label} | " + " | ".join(format_metric(m.get(n)) for n in names) + " |")
        lines += [f"\nNote: {note}" for note in r.get("notes", [])]
    if stale:
        lines += ["", f"({stale} earlier result(s) in `eval_results.json` were measured on other weights; not shown.)"]
    return lines


def render_model_card(model_dir: str | Path, digest: str | None = None) -> str:
    """The model card text of a checkpoint folder (see the module docstring for its sources)."""
    model_dir = Path(model_dir)
    config = read_json(model_dir / CONFIG_FILE)
    processor = read_json(model_dir / PROCESSOR_FILE) if (model_dir / PROCESSOR_FILE).is_file() else {}
    digest = digest or weights_digest(model_dir)
    name = model_dir.resolve().name
    lines = [
        "---",
        "library_name: vlm",
        "pipeline_tag: image-text-to-text",
        "tags:",
        "- vision-language",
        "- vlm",
        "---",
        "",
        f"# {name}",
        "",
        *([config["description"], ""] if config.get("description") else []),
        "A vision-language model of the vlm toolkit: a timm image encoder, a projector into the decoder's embedding "
        "space, and a transformers causal language model that reads the image tokens in place of each `<image>`.",
        "",
        "This card is generated by `vlm.model_card.write_model_card` from the files of this folder (config.json, "
        "model.safetensors, processor_config.json, training.json, eval_results.json); edits to it are overwritten.",
        "",
        "## Architecture",
        "",
        *_architecture(model_dir, config, processor),
        "",
        "## Training",
        "",
        *_training(model_dir),
        "",
        "## Evaluation",
        "",
        *_evaluation(read_eval_results(model_dir), digest),
        "",
        "## Usage",
        "",
        "```bash",
        f"vlm caption --model {name} image.png",
        f'vlm ask --model {name} image.png "What is in the image?"',
        f"vlm eval --model {name} --data test.jsonl --output report.json",
        "```",
        "",
        f"Weights SHA-256: `{digest}`.",
        "",
    ]
    return "\n".join(lines)
