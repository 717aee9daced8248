"""Tests for the lmms-eval adapter (eval/lmms_adapter.py) and the shipped task (samples/lmms_tasks/shapes_vqa).

Skipped when lmms-eval is not installed (`pip install 'vlm[lmms]'`), except the check that the adapter then says how
to install it. Importing lmms-eval takes ~20 s on a small machine; the tests share one import.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from vlm.checkpoint import load
from vlm.errors import VLMError
from vlm.generation import GenerationOptions, generate_texts
from vlm.images import load_image

TASKS = Path(__file__).resolve().parent.parent / "samples" / "lmms_tasks"
DATA = TASKS / "shapes_vqa" / "data"


def test_adapter_without_lmms_eval_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # makes `import lmms_eval...` fail
    monkeypatch.delitem(sys.modules, "vlm.eval.lmms_adapter", raising=False)
    with pytest.raises(VLMError, match=r"pip install 'vlm\[lmms\]'"):
        importlib.import_module("vlm.eval.lmms_adapter")


def test_the_generation_task_scores_the_last_word() -> None:
    """The shapes_vqa task's scoring (its utils.py, which lmms-eval imports by path) needs no lmms-eval to check."""
    spec = importlib.util.spec_from_file_location("shapes_vqa_utils", TASKS / "shapes_vqa" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    doc = {"answer": "3", "subtype": "count"}
    assert utils.process_results(doc, ["squares: 3"]) == {"vqa_accuracy": 1.0, "exact_match": 1.0}
    assert utils.process_results(doc, ["3"]) == {"vqa_accuracy": 1.0, "exact_match": 1.0}
    assert utils.process_results(doc, ["3 squares"]) == {"vqa_accuracy": 0.0, "exact_match": 0.0}
    assert utils.process_results(doc, [""]) == {"vqa_accuracy": 0.0, "exact_match": 0.0}


@pytest.fixture(scope="module")
def adapter_module():
    pytest.importorskip("lmms_eval")
    return importlib.import_module("vlm.eval.lmms_adapter")


@pytest.fixture(scope="module")
def ckpt(varied_checkpoint: Path) -> Path:
    """A tiny checkpoint whose answers are non-empty and input-dependent (tests/conftest.py)."""
    return varied_checkpoint


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    rows = [json.loads(line) for line in (DATA / "test.jsonl").read_text().splitlines()]
    return [{**r, "picture": load_image(DATA / r["image"])} for r in rows[:20:5]]


def _visual(doc: dict) -> list:
    return [doc["picture"]]


def _adapter(adapter_module, ckpt: Path, docs: list[dict], batch_size: int):
    lm = adapter_module.VLMForLmmsEval(pretrained=str(ckpt), device="cpu", batch_size=batch_size)
    lm.task_dict = {"t": {"test": docs}}
    return lm


def _instance(kind: str, args: tuple):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "t", "doc_id": args[-3], "repeats": 1})


def _reference_loglikelihood(ckpt: Path, context: str, continuation: str, image) -> float:
    """log P(continuation | context) from the model's own training loss over the continuation's tokens."""
    model, processor = load(ckpt)
    ctx, _ = processor.encode([{"role": "user", "content": context}], 1, add_generation_prompt=True)
    cont = processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    labels = torch.tensor([[-100] * len(ctx) + cont])
    with torch.no_grad():
        loss = model(ids, pixel_values=processor.transform([image]), labels=labels).loss
    return -loss.item() * len(cont)


def test_loglikelihood_is_the_sum_of_continuation_logprobs(adapter_module, ckpt: Path, docs: list[dict]) -> None:
    pairs = [(0, "bottom"), (1, "square"), (2, "a much longer continuation"), (3, "3")]
    requests = [_instance("loglikelihood", (docs[i]["question"], c, _visual, i, "t", "test")) for i, c in pairs]
    batched = _adapter(adapter_module, ckpt, docs, batch_size=4).loglikelihood(requests)
    single = _adapter(adapter_module, ckpt, docs, batch_size=1).loglikelihood(requests)
    for (i, cont), (ll, greedy), (ll_one, greedy_one) in zip(pairs, batched, single, strict=True):
        expected = _reference_loglikelihood(ckpt, docs[i]["question"], cont, docs[i]["picture"])
        assert ll == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert ll_one == pytest.approx(ll, rel=1e-4, abs=1e-4) and greedy_one == greedy  # padding changes nothing
        assert ll < 0 and greedy is False

    # The model's own greedy first token is a greedy continuation.
    model, processor = load(ckpt)
    doc = docs[0]
    first = model.generate(
        **processor([doc["question"]], [[doc["picture"]]]), options=GenerationOptions(max_new_tokens=1)
    )[0]
    text = processor.tokenizer.decode(first)
    assert processor.tokenizer(text, add_special_tokens=False)["input_ids"] == first.tolist()
    [(ll, greedy)] = _adapter(adapter_module, ckpt, docs, 1).loglikelihood(
        [_instance("loglikelihood", (doc["question"], text, _visual, 0, "t", "test"))]
    )
    assert greedy is True and ll == pytest.approx(_reference_loglikelihood(ckpt, doc["question"], text, doc["picture"]))


def test_generate_until_answers_like_vlm(adapter_module, ckpt: Path, docs: list[dict]) -> None:
    model, processor = load(ckpt)
    lm = _adapter(adapter_module, ckpt, docs, batch_size=3)
    questions = [d["question"] for d in docs]
    pictures = [[d["picture"]] for d in docs]
    expected = generate_texts(model, processor, questions[1:], pictures[1:], GenerationOptions(max_new_tokens=4))
    short = generate_texts(model, processor, questions[:1], pictures[:1], GenerationOptions(max_new_tokens=2))
    assert all(expected) and short[0]

    kwargs = [{"max_new_tokens": 2}] + [{"max_new_tokens": 4, "until": ["\n\n"], "temperature": 0}] * 3
    requests = [
        _instance("generate_until", (q, kw, _visual, i, "t", "test"))
        for i, (q, kw) in enumerate(zip(questions, kwargs, strict=True))
    ]
    # Requests with different options run in separate batches; answers come back in request order.
    assert lm.generate_until(requests) == short + expected

    stop = expected[0][len(expected[0]) // 2 :]
    [answer] = lm.generate_until([_instance("generate_until", (questions[1], {"max_new_tokens": 4, "until": [stop]},
                                                               _visual, 1, "t", "test"))])  # fmt: skip
    assert answer == expected[0][: expected[0].index(stop)] and len(answer) < len(expected[0])


def test_lmms_eval_runs_the_shipped_tasks(
    adapter_module, ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lmms_eval import evaluator
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    assert get_model("vlm") is adapter_module.VLMForLmmsEval  # found through the entry point in pyproject.toml
    out = evaluator.simple_evaluate(
        model="vlm",
        model_args=f"pretrained={ckpt}",
        tasks=["shapes_vqa", "shapes_vqa_mc"],
        limit=3,
        batch_size=2,
        device="cpu",
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        log_samples=True,
    )
    results, samples = out["results"], out["samples"]
    from vlm.eval.evaluate import LAST_WORD, extract_answer
    from vlm.eval.metrics import vqa_accuracy

    answers = [s["filtered_resps"] for s in samples["shapes_vqa"]]
    answers = [a[0] if isinstance(a, list) else a for a in answers]
    targets = [s["target"] for s in samples["shapes_vqa"]]
    assert len(answers) == 3
    last_words = [extract_answer(a, LAST_WORD) for a in answers]  # what the task scores
    assert results["shapes_vqa"]["vqa_accuracy,none"] == pytest.approx(
        sum(vqa_accuracy(a, [t]) for a, t in zip(last_words, targets, strict=True)) / 3
    )

    # Multiple choice: every choice's log-likelihood is the adapter's, and the most likely choice is the answer.
    rows = [json.loads(line) for line in (DATA / "test.jsonl").read_text().splitlines()]
    choices = {"vertical": ["top", "bottom"], "horizontal": ["left", "right"], "count": [str(n) for n in range(1, 7)]}
    correct = 0
    for s in samples["shapes_vqa_mc"]:
        row = rows[s["doc_id"]]
        options = choices.get(row["subtype"], ["square", "circle"])
        lls = [ast.literal_eval(r)[0] if isinstance(r, str) else r[0] for r in s["filtered_resps"]]
        image = load_image(DATA / row["image"])
        assert lls[0] == pytest.approx(_reference_loglikelihood(ckpt, row["question"], options[0], image), rel=1e-4)
        correct += options[max(range(len(options)), key=lambda k: lls[k])] == row["answer"]
    assert results["shapes_vqa_mc"]["acc,none"] == pytest.approx(correct / 3)
