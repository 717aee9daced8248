"""Tests for `vlm eval` (eval/evaluate.py): reports, predictions files, scoring other systems' predictions, failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import vlm.eval.metrics
from PIL import Image
from vlm.eval.benchmarks.shapes import generate_shapes
from vlm.eval.evaluate import evaluate, predictions_path
from vlm.eval.metrics import caption_metrics, exact_match, score, vqa_accuracy

from vlm.errors import VLMError
from vlm.generation import GenerationOptions, generate_texts
from vlm.images import load_image

GEN = GenerationOptions(max_new_tokens=4)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def ckpt(varied_checkpoint: Path) -> Path:
    """A tiny checkpoint whose answers are non-empty and depend on the question and the image (tests/conftest.py).

    Shared with other test files: evaluations here leave its model card alone (update_card=False or a limit).
    """
    return varied_checkpoint


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(out, train=0, val=0, test=2, seed=3)
    return out


@pytest.fixture(autouse=True)
def no_java(monkeypatch: pytest.MonkeyPatch) -> None:
    """Caption scoring without METEOR's Java start-up (5-25 s); the metrics module then says so in its notes."""
    monkeypatch.setattr(vlm.eval.metrics, "_java_available", lambda: False)


def test_evaluate_report_matches_its_predictions(ckpt: Path, shapes: Path, tmp_path: Path) -> None:
    data = shapes / "test.jsonl"
    out = tmp_path / "report.json"
    code = evaluate(model=str(ckpt), data=str(data), output=str(out), batch_size=8, gen=GEN, update_card=False)
    assert code == 0
    report = json.loads(out.read_text())
    preds_file = predictions_path(out)
    assert preds_file == tmp_path / "report.predictions.jsonl" and report["predictions"] == str(preds_file)

    rows, predicted = _read_jsonl(data), _read_jsonl(preds_file)
    assert len(predicted) == len(rows) == 40
    for row, pred in zip(rows, predicted, strict=True):  # each data row, in data order, plus its prediction
        assert {k: v for k, v in pred.items() if k != "prediction"} == row
        assert isinstance(pred["prediction"], str)
    answers = [p["prediction"] for p in predicted]
    assert any(answers), "the test model should say something"

    # The predictions are the model's answers to their own rows: batches of 8 in data order, as `vlm ask` does.
    from vlm.checkpoint import load

    model, processor = load(ckpt)
    for start in (0, 8):
        batch = rows[start : start + 8]
        images = [[load_image(data.parent / r["image"])] for r in batch]
        questions = [r["question"] for r in batch]
        assert generate_texts(model, processor, questions, images, GEN) == answers[start : start + 8]

    # The report's numbers are those of the predictions file.
    expected = score("vqa", rows, answers)
    assert report["metrics"] == expected["metrics"] and report["by_type"] == expected["by_type"]
    assert report["by_subtype"] == expected["by_subtype"]
    assert report["metrics"]["vqa_accuracy"] == pytest.approx(
        sum(vqa_accuracy(a, [r["answer"]]) for a, r in zip(answers, rows, strict=True)) / 40
    )
    assert set(report["metrics"]) == {"vqa_accuracy", "exact_match"}
    assert set(report["by_type"]) == {"non_relational", "relational"}
    assert report["type_counts"] == {"non_relational": 20, "relational": 20}
    subtypes = [r["subtype"] for r in rows]
    assert report["subtype_counts"] == {s: subtypes.count(s) for s in sorted(set(subtypes))}
    assert set(report["by_subtype"]) == set(subtypes) and len(set(subtypes)) == 6
    assert (report["task"], report["num_rows"], report["num_scored"], report["num_failed"]) == ("vqa", 40, 40, 0)
    assert report["model"] == str(ckpt.resolve()) and report["data"] == str(data.resolve())
    assert report["generation"]["max_new_tokens"] == 4 and report["batch_size"] == 8
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["timing"]["total_s"] >= report["timing"]["generate_s"] > 0


def _hand_made_predictions(rows: list[dict]) -> list[dict]:
    """Per row i: the answer (i % 4 == 0), a VQA-equivalent spelling (1), a wrong answer (2), no prediction (3)."""
    out = []
    for i, row in enumerate(rows):
        kind = i % 4
        pred = [row["answer"], f"The {row['answer'].upper()}.", "wrong", None][kind]
        out.append({"question": row["question"], "prediction": pred})
    return out


def test_predictions_mode_gives_the_hand_computed_metrics(shapes: Path, tmp_path: Path) -> None:
    data = shapes / "test.jsonl"
    rows = _read_jsonl(data)
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(p) + "\n" for p in _hand_made_predictions(rows)))
    out = tmp_path / "scored.json"
    code = evaluate(data=str(data), predictions=str(preds), output=str(out))
    report = json.loads(out.read_text())
    # 10 exact answers and 10 differently spelled ones are right for VQA accuracy; only the 10 exact ones for exact
    # match; the 10 null predictions are failed rows, scored as wrong.
    assert report["metrics"] == {"vqa_accuracy": 0.5, "exact_match": 0.25}
    for t in ("relational", "non_relational"):
        idx = [i for i, r in enumerate(rows) if r["type"] == t]
        assert report["by_type"][t]["vqa_accuracy"] == pytest.approx(sum(i % 4 in (0, 1) for i in idx) / len(idx))
        assert report["by_type"][t]["exact_match"] == pytest.approx(sum(i % 4 == 0 for i in idx) / len(idx))
    for sub in {r["subtype"] for r in rows}:
        idx = [i for i, r in enumerate(rows) if r["subtype"] == sub]
        assert report["by_subtype"][sub]["exact_match"] == pytest.approx(sum(i % 4 == 0 for i in idx) / len(idx))
    assert report["num_failed"] == 10 and [f["row"] for f in report["failures"]] == list(range(3, 40, 4))
    assert code == 2  # failed rows make the exit code say so; the report is still complete
    assert report["model"] is None and report["predictions_from"] == str(preds) and report["generation"] is None


def test_answer_regex_scores_the_last_match(shapes: Path, tmp_path: Path) -> None:
    data = shapes / "test.jsonl"
    rows = _read_jsonl(data)
    # Explained answers end in the right one; every 5th row's final word is wrong; every 7th has no word at all.
    preds = []
    for i, r in enumerate(rows):
        final = "wrong" if i % 5 == 0 else r["answer"]
        preds.append({"prediction": "..." if i % 7 == 0 else f"the gray {final}"})
    file = tmp_path / "preds.jsonl"
    file.write_text("".join(json.dumps(p) + "\n" for p in preds))
    right = sum(i % 5 != 0 and i % 7 != 0 for i in range(len(rows))) / len(rows)

    out = tmp_path / "last_word.json"
    assert evaluate(data=str(data), predictions=str(file), output=str(out), answer_regex=r"(\w+)$") == 0
    report = json.loads(out.read_text())
    assert report["metrics"]["exact_match"] == pytest.approx(right) and report["answer_regex"] == r"(\w+)$"
    scored = [p["scored"] for p in _read_jsonl(predictions_path(out))]
    assert scored[1] == rows[1]["answer"] and scored[5] == "wrong" and scored[7] == ""
    # Without a group the whole match is scored; without the regex the whole prediction is (and nothing is right).
    assert evaluate(data=str(data), predictions=str(file), output=str(out), answer_regex=r"\w+$") == 0
    assert json.loads(out.read_text())["metrics"]["exact_match"] == pytest.approx(right)
    assert evaluate(data=str(data), predictions=str(file), output=str(out)) == 0
    report = json.loads(out.read_text())
    assert report["metrics"]["exact_match"] == 0.0 and report["answer_regex"] is None
    assert "scored" not in _read_jsonl(predictions_path(out))[0]


def test_answer_regex_results_are_kept_apart_in_the_model_card(ckpt: Path, shapes: Path, tmp_path: Path) -> None:
    import shutil

    from vlm.model_card import read_eval_results

    model = tmp_path / "model"
    shutil.copytree(ckpt, model)
    data = str(shapes / "test.jsonl")
    before = sorted(p.name for p in model.iterdir())
    assert evaluate(model=str(model), data=data, gen=GEN) == 0
    assert sorted(p.name for p in model.iterdir()) == before  # plain `vlm eval` writes nothing into the model folder
    assert evaluate(model=str(model), data=data, gen=GEN, update_card=True) == 0
    assert evaluate(model=str(model), data=data, gen=GEN, answer_regex=r"(\S+)$", update_card=True) == 0
    results = read_eval_results(model)
    assert set(results) == {data, data + r" | answer_regex (\S+)$"}
    assert results[data + r" | answer_regex (\S+)$"]["answer_regex"] == r"(\S+)$"
    assert r"Scored on the last match of `(\S+)$`" in (model / "README.md").read_text()


def test_a_model_scores_with_its_own_answer_regex(ckpt: Path, shapes: Path, tmp_path: Path, capsys) -> None:
    """A model whose config carries answer_regex is scored on the last match by plain `vlm eval`: the same report
    as with --answer_regex given, unless another one is given."""
    import shutil

    from vlm.config import VLMConfig

    model = tmp_path / "model"
    shutil.copytree(ckpt, model)
    config = VLMConfig.load(model / "config.json")
    config.answer_regex = r"(\w)\w*$"  # the first letter of the last word: differs from scoring the whole answer
    config.save(model / "config.json")
    data = str(shapes / "test.jsonl")
    reports = []
    for regex in (None, r"(\w)\w*$", r"(\S+)$"):
        out = tmp_path / f"r{len(reports)}.json"
        assert evaluate(model=str(model), data=data, gen=GEN, output=str(out), answer_regex=regex) == 0
        reports.append(json.loads(out.read_text()))
    assert reports[0]["answer_regex"] == reports[1]["answer_regex"] == r"(\w)\w*$"
    assert reports[0]["metrics"] == reports[1]["metrics"]
    assert reports[2]["answer_regex"] == r"(\S+)$"
    assert "from its config" in capsys.readouterr().err


def test_data_under_the_working_directory_is_named_relative_to_it(
    shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = _read_jsonl(shapes / "test.jsonl")
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"prediction": r["answer"]}) + "\n" for r in rows))
    out = tmp_path / "report.json"
    monkeypatch.chdir(shapes.parent)
    assert evaluate(data=str(shapes / "test.jsonl"), predictions=str(preds), output=str(out)) == 0
    assert json.loads(out.read_text())["data"] == f"{shapes.name}/test.jsonl"  # the same on any machine
    monkeypatch.chdir(tmp_path)  # outside it: the absolute path
    assert evaluate(data=str(shapes / "test.jsonl"), predictions=str(preds), output=str(out)) == 0
    assert json.loads(out.read_text())["data"] == str((shapes / "test.jsonl").resolve())


def test_predictions_row_count_must_match(shapes: Path, tmp_path: Path) -> None:
    preds = tmp_path / "short.jsonl"
    preds.write_text(json.dumps({"prediction": "square"}) + "\n")
    with pytest.raises(VLMError, match="1 predictions for the 40 rows"):
        evaluate(data=str(shapes / "test.jsonl"), predictions=str(preds))


def test_predictions_out_of_order_are_refused(shapes: Path, tmp_path: Path) -> None:
    rows = _read_jsonl(shapes / "test.jsonl")
    hand = _hand_made_predictions(rows)
    k = next(i for i in range(1, 40) if rows[i]["question"] != rows[0]["question"])
    hand[0], hand[k] = hand[k], hand[0]
    preds = tmp_path / "shuffled.jsonl"
    preds.write_text("".join(json.dumps(p) + "\n" for p in hand))
    with pytest.raises(VLMError, match="data order"):
        evaluate(data=str(shapes / "test.jsonl"), predictions=str(preds))


def test_caption_task(ckpt: Path, shapes: Path, tmp_path: Path) -> None:
    data = shapes / "test_captions.jsonl"
    out = tmp_path / "captions.json"
    assert evaluate(model=str(ckpt), data=str(data), output=str(out), gen=GEN, update_card=False) == 0
    report = json.loads(out.read_text())
    assert report["task"] == "caption" and report["num_rows"] == 2
    predicted = _read_jsonl(predictions_path(out))
    expected = caption_metrics([p["prediction"] for p in predicted], [[p["caption"]] for p in predicted], meteor=False)
    assert report["metrics"] == expected
    assert list(report["metrics"]) == ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "meteor"]
    assert report["metrics"]["meteor"] is None and any("METEOR" in n for n in report["notes"])

    # Perfect predictions: every BLEU and ROUGE-L is 1.
    preds = tmp_path / "perfect.jsonl"
    preds.write_text("".join(json.dumps({"prediction": p["caption"]}) + "\n" for p in predicted))
    out2 = tmp_path / "perfect.json"
    assert evaluate(data=str(data), predictions=str(preds), output=str(out2), task="caption") == 0
    metrics = json.loads(out2.read_text())["metrics"]
    assert [metrics[k] for k in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l")] == pytest.approx([1.0] * 5)


def test_broken_rows_are_counted_and_reported(
    ckpt: Path, shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _read_jsonl(shapes / "test.jsonl")[:4]
    for row in good:
        row["image"] = str(shapes / row["image"])
    lines = [json.dumps(r) for r in good[:2]]
    lines.append(
        json.dumps({"image": "missing.png", "question": "What is the shape of the red object?", "answer": "x"})
    )
    lines.append("{not json")
    lines += [json.dumps(r) for r in good[2:]]
    lines.append(json.dumps({"image": good[0]["image"], "question": "No answer?"}))
    data = tmp_path / "broken.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "broken_report.json"

    code = evaluate(model=str(ckpt), data=str(data), output=str(out), gen=GEN, update_card=False)

    assert code == 2
    report = json.loads(out.read_text())
    assert (report["num_rows"], report["num_scored"], report["num_failed"]) == (7, 5, 3)
    assert [(f["row"], f["where"]) for f in report["failures"]] == [
        (2, f"{data}:3"),
        (3, f"{data}:4"),
        (6, f"{data}:7"),
    ]
    assert "image not found" in report["failures"][0]["error"]
    assert "bad JSON" in report["failures"][1]["error"] and "no answer" in report["failures"][2]["error"]
    predicted = _read_jsonl(predictions_path(out))
    assert len(predicted) == 7  # one line per data row, so the file can be rescored with --predictions
    assert [p["prediction"] is None for p in predicted] == [False, False, True, True, False, False, True]
    assert predicted[3] == {"line": 4, "prediction": None, "error": report["failures"][1]["error"]}
    # The unanswerable row is scored as wrong; the unparseable rows have no reference and are not scored.
    answered = [predicted[i] for i in (0, 1, 4, 5)]
    assert report["metrics"]["exact_match"] == pytest.approx(
        sum(exact_match(p["prediction"], [p["answer"]]) for p in answered) / 5
    )
    err = capsys.readouterr().err
    assert f"{data}:4: bad JSON" in err and "3 of 7 rows failed" in err

    # Rescoring the predictions file gives the same numbers.
    assert evaluate(data=str(data), predictions=str(predictions_path(out)), output=str(tmp_path / "again.json")) == 2
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["metrics"] == report["metrics"] and again["num_failed"] == 3


def test_hf_datasets_match_the_jsonl(ckpt: Path, shapes: Path, tmp_path: Path) -> None:
    import datasets

    rows = _read_jsonl(shapes / "test.jsonl")[:6]
    features = datasets.Features(
        {"img": datasets.Image(), "query": datasets.Value("string"), "label": datasets.Value("string")}
    )
    ds = datasets.Dataset.from_dict(
        {
            "img": [Image.open(shapes / r["image"]) for r in rows],
            "query": [r["question"] for r in rows],
            "label": [r["answer"] for r in rows],
        },
        features=features,
    )
    ds.to_parquet(str(tmp_path / "six.parquet"))
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "six_dict"))
    columns = {"image": "img", "question": "query", "answer": "label"}
    run = dict(model=str(ckpt), gen=GEN, batch_size=6, update_card=False)

    assert evaluate(data=str(shapes / "test.jsonl"), limit=6, output=str(tmp_path / "j.json"), **run) == 0
    expected = [p["prediction"] for p in _read_jsonl(tmp_path / "j.predictions.jsonl")]
    assert evaluate(data=str(tmp_path / "six.parquet"), columns=columns, output=str(tmp_path / "p.json"), **run) == 0
    assert [p["prediction"] for p in _read_jsonl(tmp_path / "p.predictions.jsonl")] == expected
    code = evaluate(
        data=str(tmp_path / "six_dict"), split="validation", columns=columns, output=str(tmp_path / "d.json"), **run
    )
    assert code == 0
    predicted = _read_jsonl(tmp_path / "d.predictions.jsonl")
    assert [p["prediction"] for p in predicted] == expected
    assert predicted[0] == {"question": rows[0]["question"], "answer": rows[0]["answer"], "prediction": expected[0]}
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["data"] == f"{(tmp_path / 'six_dict').resolve()}[validation]"

    with pytest.raises(VLMError, match="no split 'test'"):
        evaluate(data=str(tmp_path / "six_dict"), columns=columns, **run)


def test_reading_a_dataset_does_not_import_lightning(shapes: Path, tmp_path: Path) -> None:
    """Evaluation reads datasets with `vlm.data`, as training does, without pulling in the training stack."""
    import subprocess
    import sys

    import datasets

    rows = _read_jsonl(shapes / "test.jsonl")[:2]
    ds = datasets.Dataset.from_dict(
        {"img": [str(shapes / r["image"]) for r in rows], "q": [r["question"] for r in rows], "a": ["x", None]}
    )
    ds.save_to_disk(str(tmp_path / "two"))
    code = f"""
import sys
from vlm.eval.evaluate import _read_data
columns = {{"image": "img", "question": "q", "answer": "a"}}
data = _read_data({str(tmp_path / "two")!r}, "Describe.", "train", columns, None)
assert data.scorable == [True, False] and "'answer' must be" in data.items[1].error, data.items[1].error
assert [im.size for im in data.items[0].source()] == [{Image.open(shapes / rows[0]["image"]).size!r}]
assert "lightning" not in sys.modules and "vlm.train.data" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_requests_are_one_line_errors(ckpt: Path, shapes: Path) -> None:
    data = str(shapes / "test.jsonl")
    with pytest.raises(VLMError, match="'caption' of each row"):
        evaluate(model=str(ckpt), data=data, task="caption")
    with pytest.raises(VLMError, match="not both"):
        evaluate(model=str(ckpt), data=data, predictions=data)
    with pytest.raises(VLMError, match="--data"):
        evaluate(model=str(ckpt))
    with pytest.raises(VLMError, match="data file not found"):
        evaluate(model=str(ckpt), data="nope.jsonl")
    with pytest.raises(VLMError, match="--columns is for datasets"):
        evaluate(model=str(ckpt), data=data, columns={"image": "img"})
    with pytest.raises(VLMError, match="not a regular expression"):
        evaluate(model=str(ckpt), data=data, answer_regex="(")
    with pytest.raises(VLMError, match="at most one"):
        evaluate(model=str(ckpt), data=data, answer_regex=r"(\w+) (\w+)")


def test_model_defaults_to_the_default_checkpoint(
    ckpt: Path, shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vlm.checkpoint

    monkeypatch.setattr(vlm.checkpoint, "DEFAULT_MODEL_DIR", ckpt)
    out = tmp_path / "r.json"
    assert evaluate(data=str(shapes / "test.jsonl"), limit=2, output=str(out), gen=GEN) == 0
    assert json.loads(out.read_text())["model"] == str(ckpt.resolve())
    monkeypatch.setattr(vlm.checkpoint, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(VLMError, match="no default model") as e:
        evaluate(data=str(shapes / "test.jsonl"))
    assert e.value.exit_code == 1


def test_vlm_eval_command_line(ckpt: Path, shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vlm.cli import main

    out = tmp_path / "cli.json"
    args = ["eval", "--model", str(ckpt), "--data", str(shapes / "test.jsonl"), "--output", str(out)]
    with pytest.raises(SystemExit) as e:
        main([*args, "--limit", "5", "--max-new-tokens", "3", "--batch_size", "2"])
    assert e.value.code == 0
    report = json.loads(out.read_text())
    assert report["num_rows"] == 5 and report["generation"]["max_new_tokens"] == 3 and report["batch_size"] == 2
    shown = capsys.readouterr().out
    assert "vqa_accuracy" in shown and "overall (5)" in shown and f"{report['metrics']['vqa_accuracy']:.4f}" in shown

    with pytest.raises(SystemExit) as e:
        main(["eval", "--data", str(shapes / "test.jsonl"), "--predictions", str(predictions_path(out))])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vlm: error: {predictions_path(out)} has 5 predictions for the 40 rows of "
                   f"{(shapes / 'test.jsonl').resolve()}; it needs one row with a 'prediction' per data row, "
                   "in data order"]  # fmt: skip


def test_empty_data_and_unwritable_outputs_are_refused_before_the_model_loads(shapes: Path, tmp_path: Path) -> None:
    data = str(shapes / "test.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(VLMError, match=rf"^no rows in {empty}$"):
        evaluate(data=str(empty), predictions=data)
    (tmp_path / "folder").mkdir()
    with pytest.raises(VLMError, match=rf"^output {tmp_path / 'folder'} is a folder; give a file name$"):
        evaluate(model="not read: the output is checked first", data=data, output=str(tmp_path / "folder"))
    # The predictions file beside the report has the longer name: report.predictions.jsonl.
    long = tmp_path / ("r" * 250 + ".json")
    with pytest.raises(VLMError, match=r"^output name too long \(268 bytes; the limit is 255\): "):
        evaluate(model="not read", data=data, output=str(long))


def test_output_in_folders_that_do_not_exist_yet(shapes: Path, tmp_path: Path) -> None:
    data = shapes / "test.jsonl"
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(p) + "\n" for p in _hand_made_predictions(_read_jsonl(data))))
    out = tmp_path / "new" / "deeper" / "scored.json"
    evaluate(data=str(data), predictions=str(preds), output=str(out))
    assert json.loads(out.read_text())["num_rows"] == 40
    assert len(_read_jsonl(predictions_path(out))) == 40


def test_a_predictions_file_with_a_bom_and_crlf_is_read(shapes: Path, tmp_path: Path) -> None:
    data = shapes / "test.jsonl"
    preds = tmp_path / "preds.jsonl"
    rows = _hand_made_predictions(_read_jsonl(data))
    preds.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(p) + "\r\n" for p in rows).encode())
    out = tmp_path / "scored.json"
    evaluate(data=str(data), predictions=str(preds), output=str(out))
    assert json.loads(out.read_text())["metrics"] == {"vqa_accuracy": 0.5, "exact_match": 0.25}
