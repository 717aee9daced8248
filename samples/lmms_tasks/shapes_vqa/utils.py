"""Functions the shapes_vqa tasks' YAML files name (`!function utils.NAME`); lmms-eval imports this file by path.

The data is 60 Sort-of-CLEVR questions about 3 images (vlm.eval.benchmarks.shapes.generate_shapes(out, 0, 0, 3,
seed=0), test split), stored beside this file in the project's JSONL format, so the tasks need no download.
"""

from __future__ import annotations

import ast
from pathlib import Path

from vlm.eval.benchmarks.shapes import SHAPES
from vlm.eval.evaluate import LAST_WORD, extract_answer
from vlm.eval.metrics import exact_match, vqa_accuracy

from vlm.images import load_image

DATA = Path(__file__).resolve().parent / "data"
# The possible answers of each question subtype (see vlm.eval.benchmarks.shapes.answer_question).
CHOICES = {
    "shape": list(SHAPES),
    "closest_shape": list(SHAPES),
    "furthest_shape": list(SHAPES),
    "horizontal": ["left", "right"],
    "vertical": ["top", "bottom"],
    "count": [str(n) for n in range(1, 7)],
}


def doc_to_visual(doc: dict) -> list:
    return [load_image(DATA / doc["image"])]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def doc_to_target(doc: dict) -> str:
    return doc["answer"]


def doc_to_choice(doc: dict) -> list[str]:
    return CHOICES[doc["subtype"]]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """VQA accuracy and exact match of the generated answer's last word (the whole answer of a one-word model, the
    answer of one that explains first: the default model says "squares: 3"), as `vlm eval --answer_regex '(\\S+)$'`
    scores them."""
    prediction, refs = extract_answer(results[0], LAST_WORD), [doc["answer"]]
    return {"vqa_accuracy": vqa_accuracy(prediction, refs), "exact_match": exact_match(prediction, refs)}


def _loglikelihood(result) -> float:
    # lmms-eval 0.7.3 passes each (loglikelihood, is_greedy) response through `unwrap_generation_output`, which
    # turns it into its str(); accept both forms.
    return float((ast.literal_eval(result) if isinstance(result, str) else result)[0])


def process_results_mc(doc: dict, results: list) -> dict[str, float]:
    """Accuracy of the most likely choice. lmms-eval's built-in multiple-choice scoring takes the argmin (it expects
    losses); the vlm adapter returns log-likelihoods, so the answer is the argmax."""
    choices = doc_to_choice(doc)
    lls = [_loglikelihood(r) for r in results]
    best = max(range(len(choices)), key=lambda i: lls[i])
    return {"acc": float(choices[best] == doc["answer"])}
