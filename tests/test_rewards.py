"""GRPO's rewards (train/rewards.py): each rule, their weighted sum, and bad rewards as one-line errors."""

from __future__ import annotations

import pytest
from vlm.train.rewards import REWARDS, Rewards, RewardSpec, Rollout

from vlm.errors import VLMError


def score(name: str, answer: str, references=("circle",), row=None, **args) -> float:
    return REWARDS[name](**args)([Rollout("What shape?", answer, list(references), row or {})])[0]


def test_correctness_rules():
    assert score("exact", " Circle ") == 1.0 and score("exact", "a circle") == 0.0
    assert score("vqa", "the circle.") == 1.0  # VQA normalisation drops articles and punctuation
    assert score("vqa", "circle", references=["circle", "circle", "square"]) == pytest.approx(2 / 3)
    assert score("last_word", "It is round, so: circle") == 1.0 and score("last_word", "circle, no, square") == 0.0
    assert score("last_word", "answer=circle;", pattern=r"answer=(\w+)") == 1.0
    assert score("last_word", "no match", pattern=r"answer=(\w+)") == 0.0


def test_format_length_and_refusal_rules():
    assert score("format", "circle") == 1.0 and score("format", "it is a circle") == 0.0
    assert score("format", "Answer: circle", pattern=r"Answer: \w+") == 1.0
    assert score("length", "circle") == 1.0 and score("length", "one two three four", max_words=2) == 0.5
    assert score("refusal", "I cannot tell.", row={"refuse": True}) == 1.0
    assert score("refusal", "circle", row={"refuse": True}) == 0.0
    assert score("refusal", "circle") == 1.0 and score("refusal", "I am not sure") == 0.0
    assert score("refusal", "nope", row={"unanswerable": 1}, field="unanswerable", pattern="nope") == 1.0


def test_rewards_are_weighted_and_a_failing_one_fails_only_its_rollouts():
    rewards = Rewards([RewardSpec("exact"), RewardSpec("format", 0.5, {"pattern": r"\w+"}), RewardSpec("format", 2)])
    rollouts = [Rollout("q", "circle", ["circle"]), Rollout("q", "a square", ["circle"])]
    scores, errors = rewards(rollouts)
    assert scores == {"exact": [1.0, 0.0], "format": [1.0, 0.0], "format_3": [1.0, 0.0], "total": [3.5, 0.0]}
    assert errors == {}
    scores, errors = Rewards([RewardSpec("exact")])([Rollout("q", "circle", []), rollouts[0]])
    assert errors == {0: "reward exact failed: the row has no reference answer to compare with"}
    assert scores["total"] == [0.0, 1.0]


def test_bad_rewards_are_one_line_errors():
    with pytest.raises(VLMError, match=r"^unknown reward 'exactly'; the rewards are exact, format, "):
        Rewards([RewardSpec("exactly")])
    with pytest.raises(VLMError, match="^reward format: .*unexpected keyword argument 'patern'"):
        Rewards([RewardSpec("format", args={"patern": "x"})])
    with pytest.raises(VLMError, match=r"^bad reward pattern '\('"):
        Rewards([RewardSpec("format", args={"pattern": "("})])
    with pytest.raises(VLMError, match="max_words must be at least 1"):
        Rewards([RewardSpec("length", args={"max_words": 0})])
    with pytest.raises(VLMError, match="no rewards"):
        Rewards([])
