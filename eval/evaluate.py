"""`vlm eval`: answer a benchmark with a checkpoint (or take another system's predictions) and score them.

Data is the project's JSONL format (read by `vlm.data.read_jsonl`) or a Hugging Face dataset (a `save_to_disk`
folder, a .parquet/.arrow file, or a hub name), read exactly as training reads it (`vlm.data`). Scores come from
`vlm.eval.metrics.score`: VQA accuracy and exact match for question rows, COCO caption metrics for caption rows.

Failed rows are counted, listed in the report and never dropped silently:

* a row that cannot be parsed (bad JSON, no answer, no question) has no reference to score against, so it is left
  out of the metrics (`num_scored` says how many rows were scored);
* a good row the model could not answer (missing or corrupt image, prompt longer than the context) is scored as
  wrong, with an empty prediction.

The predictions file has one line per data row, in data order (broken rows included, with `"prediction": null`
and an `"error"`), so `vlm eval --predictions` can rescore it, and so can the outputs of `vlm ask --output`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from vlm.data import json_lines
from vlm.errors import VLMError
from vlm.files import check_input_file, check_output_file, write_json, write_jsonl
from vlm.generation import GenerationOptions
from vlm.inference import Device, DType, Item, items_from_jsonl, run_items
from vlm.model_card import format_metric, metric_rows

Task = Literal["auto", "vqa", "caption"]
# The reference field each task scores against (see vlm.eval.metrics.score).
_REFERENCE_FIELD = {"vqa": "answer", "caption": "caption"}
_SHOWN_FAILURES = 5  # failures printed to stderr; all of them are in the report


@dataclass
class _Data:
    """A benchmark's rows as work items, one per data row in data order, and which of them can be scored."""

    items: list[Item]
    scorable: list[bool]  # parsed, so it has references; False for broken rows (their item carries the error)
    where: list[str]  # each row's place in the data, for messages: "file.jsonl:LINE" or "dataset[INDEX]"
    name: str  # the data, resolved: the key of a checkpoint's eval results


def data_name(path: Path) -> str:
    """How a report names a data file or folder: relative to the working directory when it lies under it (so a
    checkpoint's recorded results read the same on every machine), else its absolute path."""
    full = path.resolve()
    try:
        return full.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(full)


def _jsonl_data(path: Path, caption_prompt: str, limit: int | None) -> _Data:
    items = items_from_jsonl(path, caption_prompt, require_target=True, limit=limit)
    for it in items:  # messages name the place as file:LINE
        if it.error is not None:
            it.error = it.error.removeprefix(f"line {it.line}: ")
    where = [f"{path}:{it.line}" for it in items]
    return _Data(items, [it.error is None for it in items], where, data_name(path))


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """The fields of a dataset row that can go into the predictions file (in-memory images and bytes cannot)."""
    out = {}
    for key, value in row.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        out[key] = value
    return out


def _dataset_data(spec: str, split: str, columns: dict[str, str], caption_prompt: str, limit: int | None) -> _Data:
    import datasets

    # The reader training uses too, so a dataset row means the same thing to `vlm fit` and `vlm eval`.
    from vlm.data import example_from_record, load_row_images, open_hf_dataset

    ds, base = open_hf_dataset(spec, split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    image_column = columns.get("image", "image")
    if isinstance(ds.features.get(image_column), datasets.Image):
        # Keep the encoded bytes while indexing; each image is decoded only when its batch runs.
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    items, scorable, where = [], [], []
    for i, record in enumerate(ds):
        where.append(f"{spec}[{i}]")
        try:
            ex, images = example_from_record(record, columns, base, caption_prompt, where[-1])
        except VLMError as e:
            items.append(Item({"index": i}, [], "", error=str(e).removeprefix(f"{where[-1]}: ")))
            scorable.append(False)
            continue
        row = _jsonable(ex.row)
        if not all(isinstance(x, Path) for x in images):
            row.pop("image", None)  # the stand-in names of in-memory images mean nothing outside this run
        source = lambda images=images: load_row_images(images)  # noqa: E731 -- decoded when its batch runs
        items.append(Item(row, [], ex.prompt, source=source, placeholders=ex.placeholders))
        scorable.append(True)
    name = data_name(Path(spec)) if Path(spec).exists() else spec
    return _Data(items, scorable, where, name if Path(spec).is_file() else f"{name}[{split}]")


def _read_data(data: str, caption_prompt: str, split: str, columns: dict[str, str] | None, limit: int | None) -> _Data:
    path = Path(data)
    if path.suffix == ".jsonl":
        if columns:
            raise VLMError("--columns is for datasets; a JSONL file uses the project's field names")
        return _jsonl_data(path, caption_prompt, limit)
    return _dataset_data(data, split, dict(columns or {}), caption_prompt, limit)


def _resolve_task(task: str, data: _Data) -> str:
    """The task to score, checked against every scorable row before anything is generated."""
    from vlm.eval.metrics import detect_task

    rows = [it.row for it, ok in zip(data.items, data.scorable, strict=True) if ok]
    if not rows:
        first = next((f"{w}: {it.error}" for it, w in zip(data.items, data.where, strict=True) if it.error), "no rows")
        raise VLMError(f"no usable rows in {data.name}: {len(data.items)} rows, all broken; first: {first}")
    if task == "auto":
        try:
            return detect_task(rows)
        except ValueError as e:
            raise VLMError(f"{data.name}: {e}; pass --task vqa or --task caption for mixed data") from None
    field = _REFERENCE_FIELD[task]
    for it, ok, where in zip(data.items, data.scorable, data.where, strict=True):
        if ok and field not in it.row:
            raise VLMError(f"--task {task} scores the {field!r} of each row, but {where} has none")
    return task


def _apply_predictions(path: str, data: _Data) -> None:
    """Fills the items' predictions from a JSONL file with one row per data row, in data order."""
    file = Path(path)
    rows: list[tuple[int, Any]] = []
    for line in json_lines(file, "predictions file"):
        if line.error is not None:
            raise VLMError(f"{file}:{line.number}: {line.error}")
        rows.append((line.number, line.value))
    if len(rows) != len(data.items):
        raise VLMError(
            f"{file} has {len(rows)} predictions for the {len(data.items)} rows of {data.name}; "
            "it needs one row with a 'prediction' per data row, in data order"
        )
    for k, ((number, pred_row), item, ok) in enumerate(zip(rows, data.items, data.scorable, strict=True), start=1):
        if not isinstance(pred_row, dict) or "prediction" not in pred_row:
            raise VLMError(f"{file}:{number}: a predictions row must be a JSON object with a 'prediction'")
        value = pred_row["prediction"]
        if value is not None and not isinstance(value, str):
            raise VLMError(f"{file}:{number}: 'prediction' must be a string (or null for a failed row)")
        question = pred_row.get("question")
        if ok and question is not None and "question" in item.row and question != item.row["question"]:
            raise VLMError(
                f"{file}:{number}: its question is not that of data row {k}; predictions must be in data order"
            )
        if item.error is not None:
            continue  # a broken data row stays broken whatever was predicted for it
        if value is None or pred_row.get("error"):
            reason = f" ({pred_row['error']})" if pred_row.get("error") else ""
            item.error = f"{file}:{number}: no prediction{reason}"
        else:
            item.prediction = value


def _compile_answer_regex(pattern: str) -> re.Pattern[str]:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise VLMError(f"answer_regex {pattern!r} is not a regular expression: {e}") from None
    if rx.groups > 1:
        raise VLMError(f"answer_regex {pattern!r} has {rx.groups} groups; give at most one (the answer)")
    return rx


LAST_WORD = re.compile(r"(\S+)$")
"""The ``--answer_regex`` of a model that explains before it answers: score each answer's last word."""


def extract_answer(prediction: str, rx: re.Pattern[str]) -> str:
    """The part of a prediction that is scored under ``--answer_regex``: the last match of ``rx`` (its group when it
    has one), or "" when nothing matches (so the row scores as wrong)."""
    matches = list(rx.finditer(prediction))
    if not matches:
        return ""
    last = matches[-1]
    return (last.group(1) if rx.groups else last.group(0)) or ""


def _write_predictions(path: Path, items: list[Item], rx: re.Pattern[str] | None) -> None:
    """Each data row plus its "prediction" (null and an "error" for a failed row), in data order; atomic. Under
    ``--answer_regex`` a row also has the "scored" part of its prediction."""
    rows = []
    for it in items:
        row = it.result()
        if rx is not None and it.error is None:
            row["scored"] = extract_answer(it.prediction, rx)
        rows.append(row)
    write_jsonl(path, rows)


def predictions_path(output: str | Path) -> Path:
    """Where the predictions of a report go: `report.json` -> `report.predictions.jsonl`, beside it."""
    output = Path(output)
    return output.with_name(output.stem + ".predictions.jsonl")


def summary_table(report: dict[str, Any]) -> str:
    """The report as text: a header, then one line per group (overall, each type, each subtype, indented) and one
    column per metric."""
    names = list(report["metrics"])
    rows = metric_rows(report)
    labels = [
        ("  " if level == "subtype" else "") + f"{group} ({'?' if n is None else n})" for level, group, n, _ in rows
    ]
    values = [m for *_, m in rows]
    width = max(len(label) for label in labels)
    cols = [max(len(n), 8) for n in names]
    source = f"model {report['model']}" if report.get("model") else f"predictions {report['predictions_from']}"
    timing = report["timing"]
    regex = f" | answer_regex {report['answer_regex']}" if report.get("answer_regex") else ""
    lines = [
        f"{source} | data {report['data']} | task {report['task']}{regex}",
        f"{report['num_rows']} rows: {report['num_scored']} scored, {report['num_failed']} failed"
        + (f" | {timing['total_s']:.1f} s" if timing.get("total_s") is not None else ""),
        "",
        " " * width + "  " + "  ".join(n.rjust(c) for n, c in zip(names, cols, strict=True)),
    ]
    for label, metrics in zip(labels, values, strict=True):
        cells = [format_metric(metrics.get(n)).rjust(c) for n, c in zip(names, cols, strict=True)]
        lines.append(label.ljust(width) + "  " + "  ".join(cells))
    lines += [f"note: {note}" for note in report.get("notes", [])]
    return "\n".join(lines)


def evaluate(
    model: str | None = None,
    data: str | None = None,
    task: Task = "auto",
    output: str | None = None,
    predictions: str | None = None,
    batch_size: int = 16,
    device: Device = "auto",
    dtype: DType = "auto",
    limit: int | None = None,
    split: str = "test",
    columns: dict[str, str] | None = None,
    update_card: bool = False,
    answer_regex: str | None = None,
    gen: GenerationOptions | None = None,
) -> int:
    """Score a model on a benchmark: VQA accuracy / exact match, or BLEU, ROUGE-L, CIDEr and METEOR for captions.

    Prints a table of the metrics overall, per question type (the rows' "type") and per "subtype". Rows that fail are
    counted and reported: broken rows (no reference) are left out of the metrics, rows the model could not answer
    score as wrong. With --update_card the results are recorded in the checkpoint folder (eval_results.json) and its
    README.md is regenerated; without it nothing is written into the model folder.
    Exits with 2 when some rows failed (the report is still written).

    Args:
        model: A vlm checkpoint folder (default: samples/shapes-model/, which knows only the synthetic
            shapes benchmark).
        data: The benchmark (required): a JSONL file in the project's format, a folder written by datasets'
            save_to_disk, a .parquet or .arrow file, or a dataset name on the Hugging Face hub.
        task: What to score: vqa (rows with "answer"), caption (rows with "caption"), or auto (from the rows).
        output: Write the report (JSON) here, and each data row plus its "prediction" beside it
            (report.json -> report.predictions.jsonl).
        predictions: Score this JSONL file of predictions (one row with a "prediction" per data row, in data order,
            e.g. another system's outputs) instead of running a model.
        batch_size: Rows per forward pass.
        device: Where to run: auto (CUDA when available), cpu, cuda or cuda:N (the GPU numbered N).
        dtype: Weights' precision: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.
        limit: Evaluate only the first LIMIT rows (a quick check; such runs do not update the model card).
        split: The split of a dataset to evaluate.
        columns: For datasets: field -> dataset column, e.g. {image: img, answer: label}.
        update_card: Record the results in the checkpoint folder and regenerate its model card.
        answer_regex: Score only the last match of this regular expression in each prediction (its group, if it has
            one), e.g. '(\\S+)$' for the last word of a model that explains its answers before giving them; a
            prediction without a match scores as wrong. The predictions file keeps the whole prediction and the
            "scored" part. Default: the model's own (its config's answer_regex) for question rows, if it has one.
        gen: Generation options.
    """
    start = time.perf_counter()
    if data is None:
        raise VLMError("give the benchmark with --data FILE (a JSONL file or a dataset)")
    if predictions is not None and model is not None:
        raise VLMError("give --model (to generate predictions) or --predictions (to score a file), not both")
    if limit is not None and limit < 1:
        raise VLMError("limit must be at least 1")
    if batch_size < 1:
        raise VLMError("batch_size must be at least 1")
    rx = _compile_answer_regex(answer_regex) if answer_regex is not None else None
    # Inputs and outputs are checked before the model loads for nothing.
    if data.endswith(".jsonl"):
        check_input_file(data, "data file")
    if predictions is not None:
        check_input_file(predictions, "predictions file")
    if output is not None:
        check_output_file(predictions_path(check_output_file(output)))
    gen = gen or GenerationOptions()
    net = processor = None
    model_dir = None
    if predictions is None:
        from vlm.checkpoint import DEFAULT_MODEL_DIR, open_model

        model_dir = Path(model) if model else DEFAULT_MODEL_DIR
        net, processor = open_model(model, device, dtype)
        caption_prompt = processor.caption_prompt
    else:
        from vlm.config import VLMConfig

        caption_prompt = VLMConfig().caption_prompt  # prompts are not used when scoring a file
    rows = _read_data(data, caption_prompt, split, columns, limit)
    task = _resolve_task(task, rows)
    if gen.max_new_tokens is None and net is not None and task == "vqa" and net.config.answer_tokens:
        gen = dataclasses.replace(gen, max_new_tokens=net.config.answer_tokens)
    if answer_regex is None and net is not None and task == "vqa" and net.config.answer_regex:
        answer_regex = net.config.answer_regex  # the model's own answer format
        rx = _compile_answer_regex(answer_regex)
        print(
            f"vlm: scoring the last match of the model's answer_regex {answer_regex} (from its config)",
            file=sys.stderr,
        )
    loaded = time.perf_counter()
    if predictions is None:
        for _ in run_items(rows.items, net, processor, gen, batch_size):
            pass
    else:
        _apply_predictions(predictions, rows)
    generated = time.perf_counter()

    from vlm.eval.metrics import score

    scored = [it for it, ok in zip(rows.items, rows.scorable, strict=True) if ok]
    answers = [it.prediction if it.error is None else "" for it in scored]
    if rx is not None:
        answers = [extract_answer(a, rx) for a in answers]
    result = score(task, [it.row for it in scored], answers)
    done = time.perf_counter()

    failures = [
        {"row": i, "where": w, "error": it.error}
        for i, (it, w) in enumerate(zip(rows.items, rows.where, strict=True))
        if it.error
    ]
    report: dict[str, Any] = {
        "model": str(model_dir.resolve()) if model_dir is not None else None,
        "predictions_from": predictions,
        "data": rows.name,
        "task": task,
        "answer_regex": answer_regex,
        "num_rows": len(rows.items),
        "num_scored": len(scored),
        "num_failed": len(failures),
        "metrics": result["metrics"],
        "by_type": result["by_type"],
        "type_counts": result["type_counts"],
        "by_subtype": result["by_subtype"],
        "subtype_counts": result["subtype_counts"],
        "notes": result["notes"],
        "failures": failures,
        "limit": limit,
        "generation": asdict(gen) if net is not None else None,
        "batch_size": batch_size if net is not None else None,
        "device": str(next(net.parameters()).device) if net is not None else None,
        "dtype": str(next(net.parameters()).dtype).removeprefix("torch.") if net is not None else None,
        "timing": {
            "load_s": round(loaded - start, 3),
            "generate_s": round(generated - loaded, 3) if net is not None else None,
            "score_s": round(done - generated, 3),
            "total_s": round(done - start, 3),
            "rows_per_s": round(len(rows.items) / max(generated - loaded, 1e-9), 2) if net is not None else None,
        },
        "evaluated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "predictions": None,
    }
    if output is not None:
        out = Path(output)
        report["predictions"] = str(predictions_path(out))
        _write_predictions(predictions_path(out), rows.items, rx)
        write_json(out, report)
    print(summary_table(report))

    for failure in failures[:_SHOWN_FAILURES]:
        print(f"vlm: error: {failure['where']}: {failure['error']}", file=sys.stderr)
    if failures:
        where = f" (see 'failures' in {output})" if output else ""
        more = f", {len(failures) - _SHOWN_FAILURES} more not shown" if len(failures) > _SHOWN_FAILURES else ""
        print(f"vlm: {len(failures)} of {len(rows.items)} rows failed{more}{where}", file=sys.stderr)
    if output is not None:
        print(f"vlm: wrote {output} and {report['predictions']}", file=sys.stderr)
    if model_dir is not None and update_card:
        if limit is not None:
            print("vlm: --limit run: the model card is not updated", file=sys.stderr)
        else:
            _update_card(model_dir, report)
    return 2 if failures else 0


def _update_card(model_dir: Path, report: dict[str, Any]) -> None:
    from vlm.model_card import write_model_card

    try:
        card = write_model_card(model_dir, report)
    except OSError as e:  # e.g. a read-only checkpoint: the evaluation itself still stands
        print(f"vlm: warning: could not update the model card in {model_dir}: {e}", file=sys.stderr)
        return
    print(f"vlm: updated {card}", file=sys.stderr)
