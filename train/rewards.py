"""Rewards for GRPO: small named functions in a registry, chosen and weighted in the recipe.

    model:
      rewards:
        - {name: last_word, weight: 1.0}
        - {name: format, weight: 0.5, args: {pattern: '\\w+'}}

Each reward scores a batch of `Rollout`s (a prompt, one sampled answer, the row's reference answers and fields) with
one float each; the total is the weighted sum. Rule rewards (`@rule`) score one answer at a time from its text; the
learned reward model (`reward_model`, a `vlm.reward` checkpoint) scores (image, prompt, answer) in batches.

| name | score |
|---|---|
| exact | 1 if the answer equals a reference (case and spaces aside), else 0 |
| vqa | VQA accuracy against the references (`vlm.answers.vqa_accuracy`) |
| last_word | exact match of the last match of `pattern` (default: the last word) in the answer |
| format | 1 if the whole answer matches `pattern`, else 0 |
| length | 1 up to `max_words` words, then max_words / words |
| refusal | rows whose field `field` is true must refuse (match `pattern`), other rows must not: 1 if so, else 0 |
| reward_model | the score of a `vlm.reward` checkpoint at `path` |
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vlm.answers import exact_match, vqa_accuracy
from vlm.errors import VLMError

# A reward: rollouts -> one score each.
RewardFn = Callable[[list["Rollout"]], list[float]]
REWARDS: dict[str, Callable[..., RewardFn]] = {}
REFUSAL = r"(?i)\b(cannot|can't|can not|unable to|not sure|don't know)\b"


@dataclass
class Rollout:
    """One sampled answer to one prompt: what a reward sees."""

    prompt: str
    answer: str
    references: list[str]
    row: dict[str, Any] = field(default_factory=dict)
    images: list[Any] = field(default_factory=list)  # paths or PIL images, as the data row gives them


@dataclass
class RewardSpec:
    """One reward of a recipe.

    Args:
        name: A registered reward (exact, vqa, last_word, format, length, refusal, reward_model).
        weight: Its weight in the total reward.
        args: Its settings, e.g. `{pattern: '\\w+'}` for format.
    """

    name: str
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)


def register(name: str) -> Callable[[Callable[..., RewardFn]], Callable[..., RewardFn]]:
    """Registers a reward factory: `factory(**args) -> RewardFn`."""

    def add(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        REWARDS[name] = factory
        return factory

    return add


def rule(name: str):
    """Registers a per-answer rule `fn(rollout, **args) -> float` as a reward."""

    def add(fn: Callable[..., float]) -> Callable[..., float]:
        def factory(**args: Any) -> RewardFn:
            fn(Rollout("", "", ["x"]), **args)  # refuses unknown or bad settings now, not at the first rollout
            return lambda rollouts: [float(fn(r, **args)) for r in rollouts]

        REWARDS[name] = factory
        return fn

    return add


def _regex(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise VLMError(f"bad reward pattern {pattern!r}: {e}") from None


def _references(r: Rollout) -> list[str]:
    if not r.references:
        raise VLMError("the row has no reference answer to compare with")
    return r.references


@rule("exact")
def exact(r: Rollout) -> float:
    return exact_match(r.answer, _references(r))


@rule("vqa")
def vqa(r: Rollout) -> float:
    return vqa_accuracy(r.answer, _references(r))


@rule("last_word")
def last_word(r: Rollout, pattern: str = r"(\S+)\s*$") -> float:
    found = [m.group(m.lastindex or 0) for m in _regex(pattern).finditer(r.answer)]
    return exact_match(found[-1], _references(r)) if found else 0.0


@rule("format")
def format_(r: Rollout, pattern: str = r"\S+") -> float:
    return float(_regex(pattern).fullmatch(r.answer.strip()) is not None)


@rule("length")
def length(r: Rollout, max_words: int = 1) -> float:
    if max_words < 1:
        raise VLMError("the length reward's max_words must be at least 1")
    words = len(r.answer.split())
    return 1.0 if words <= max_words else max_words / words


@rule("refusal")
def refusal(r: Rollout, field: str = "refuse", pattern: str = REFUSAL) -> float:
    refuses = _regex(pattern).search(r.answer) is not None
    return float(refuses == bool(r.row.get(field, False)))


@register("reward_model")
def reward_model(path: str, batch_size: int = 16) -> RewardFn:
    import torch

    from vlm.data import load_row_images
    from vlm.reward import load_reward_model

    model, processor = load_reward_model(path, "cuda" if torch.cuda.is_available() else "cpu")

    def score(rollouts: list[Rollout]) -> list[float]:
        prompts, answers = [r.prompt for r in rollouts], [r.answer for r in rollouts]
        return model.score(processor, prompts, answers, [load_row_images(r.images) for r in rollouts], batch_size)

    return score


class Rewards:
    """The weighted sum of a recipe's rewards; refuses an unknown name or bad settings when built."""

    def __init__(self, specs: list[RewardSpec]):
        if not specs:
            raise VLMError("no rewards: list at least one under model.rewards")
        self.specs, self.fns = specs, []
        for spec in specs:
            if spec.name not in REWARDS:
                raise VLMError(f"unknown reward {spec.name!r}; the rewards are {', '.join(sorted(REWARDS))}")
            try:
                self.fns.append(REWARDS[spec.name](**spec.args))
            except TypeError as e:
                raise VLMError(f"reward {spec.name}: {e}") from None

    def __call__(self, rollouts: list[Rollout]) -> tuple[dict[str, list[float]], dict[int, str]]:
        """Each reward's scores by name (a name used twice gets its place appended: format_2), their weighted sum as
        "total", and the rollouts a reward failed on (index -> a one-line message naming the reward); those score 0.

        A reward that raises on a batch is run again one rollout at a time, so one bad row fails alone."""
        scores: dict[str, list[float]] = {}
        errors: dict[int, str] = {}
        total = [0.0] * len(rollouts)
        for k, (spec, fn) in enumerate(zip(self.specs, self.fns)):
            try:
                values = fn(rollouts)
            except Exception:  # noqa: BLE001 -- found again below, per rollout, with its message
                values = []
                for i, r in enumerate(rollouts):
                    try:
                        values += fn([r])
                    except Exception as e:  # a user's reward may raise anything: one line naming it
                        errors.setdefault(i, f"reward {spec.name} failed: {_one_line(e)}")
                        values.append(0.0)
            name = spec.name if spec.name not in scores else f"{spec.name}_{k + 1}"
            scores[name] = values
            total = [t + spec.weight * v for t, v in zip(total, values)]
        scores["total"] = [0.0 if i in errors else t for i, t in enumerate(total)]
        return scores, errors


def _one_line(e: Exception) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return text if isinstance(e, VLMError) else f"{type(e).__name__}: {text}"
