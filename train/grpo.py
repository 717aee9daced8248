"""GRPO (Shao et al. 2024, DeepSeekMath) with rule-based rewards (`vlm fit-grpo`), as TRL's `GRPOTrainer` does it
(read to learn, written anew).

Each training batch is B question rows (`PromptDataModule`). For each, the current policy samples `group_size`
answers with the model's own `generate`; the rewards (`vlm.train.rewards`) score them; each answer's advantage is its
reward normalised within its group; then `num_iterations` optimizer steps each minimise the clipped-ratio objective
with a KL penalty to the frozen reference (`vlm.train.losses.grpo_loss`) on that same batch of answers.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor
from vlm.train.losses import answer_logprobs, group_advantages, grpo_loss
from vlm.train.module import VLMModule, eval_mode
from vlm.train.rewards import Rewards, RewardSpec, Rollout

from vlm.errors import VLMError
from vlm.generation import GenerationOptions
from vlm.model import VisionLanguageModel
from vlm.processor import IGNORE_INDEX


def answer_mask(new: Tensor, stop_ids: list[int]) -> Tensor:
    """(N, T) bool: each generated row's tokens up to and including its first stop token (all, if it has none)."""
    is_stop = torch.isin(new, torch.tensor(stop_ids, device=new.device)).long()
    return (is_stop.cumsum(dim=1) - is_stop) == 0


class GRPOModule(VLMModule):
    """Group relative policy optimisation with rule-based rewards (`vlm fit-grpo`).

    Logged: the reward's mean and standard deviation (and each named reward's mean), the KL estimate to the
    reference, the clipped fraction of tokens, the answers' length; validation adds `val/reward`, the reward of the
    greedy answers, to `vlm fit`'s loss and exact-match accuracy. `trainer.max_steps` counts optimizer steps, which
    are `num_iterations` per batch (choose checkpoint intervals that are multiples of it).

    Args:
        rewards: The rewards and their weights (`vlm.train.rewards`), e.g. `[{name: last_word}, {name: format,
            weight: 0.5, args: {pattern: '\\w+'}}]`.
        group_size: Answers sampled per question (G).
        temperature: Sampling temperature of the answers.
        top_k: Sample only among the k most likely tokens (0: no limit).
        num_iterations: Optimizer steps on each batch of sampled answers (mu).
        clip: The ratio is clipped to [1 - clip, 1 + clip].
        kl_beta: Weight of the KL penalty to the reference (the starting model); 0 needs no reference.
        max_grad_norm: Gradients are clipped to this norm before each step.
        **kwargs: `vlm fit`'s model options (`VLMModule`): `init_from`, learning rates, `lora`, `max_new_tokens`
            (the longest sampled answer), ...
    """

    command = "vlm fit-grpo"
    curve_metrics = ("train/reward", "val/reward", "train/kl", "train/clip_fraction")

    def __init__(
        self,
        rewards: list[RewardSpec] | None = None,
        group_size: int = 8,
        temperature: float = 1.0,
        top_k: int = 0,
        num_iterations: int = 2,
        clip: float = 0.2,
        kl_beta: float = 0.04,
        max_grad_norm: float = 1.0,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if group_size < 2:
            raise VLMError("model.group_size must be at least 2: advantages compare answers within a group")
        if num_iterations < 1 or temperature <= 0 or clip <= 0 or kl_beta < 0:
            raise VLMError("model.num_iterations >= 1, model.temperature > 0, model.clip > 0 and model.kl_beta >= 0")
        self.rewards = Rewards(list(rewards or []))
        self.group_size, self.temperature, self.top_k = group_size, temperature, top_k
        self.num_iterations, self.clip, self.kl_beta, self.max_grad_norm = num_iterations, clip, kl_beta, max_grad_norm
        self.automatic_optimization = False  # several optimizer steps per batch of answers
        self._origin["method"] = {
            "name": "grpo",
            "rewards": [{"name": s.name, "weight": s.weight, "args": s.args} for s in self.rewards.specs],
            "group_size": group_size,
            "num_iterations": num_iterations,
            "kl_beta": kl_beta,
        }
        needs_copy = kl_beta > 0 and self.lora is None
        self.reference = copy.deepcopy(self.vlm).requires_grad_(False).eval() if needs_copy else None
        self._val_reward = [0.0, 0]

    # ---- rollouts ----

    def _sample(self, gen: dict[str, Any]) -> tuple[dict[str, Tensor], list[str]]:
        """G answers per prompt: the (prompt + answer) rows, their labels (answer tokens only) and pixels, and the
        answers' text."""
        g = self.group_size
        counts = [len(r["images"]) for r in gen["rollouts"]]
        pixels = gen["pixel_values"]
        if pixels is not None:  # every image of each prompt, G times, prompt by prompt
            pixels = torch.cat([p.repeat(g, 1, 1, 1) for p in pixels.split(counts)])
        ids, mask = gen["input_ids"].repeat_interleave(g, 0), gen["attention_mask"].repeat_interleave(g, 0)
        with eval_mode(self.vlm):
            new = self.vlm.generate(
                ids,
                mask,
                pixels,
                GenerationOptions(
                    max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k or 0
                ),
                self.processor.stop_token_ids,
                self.processor.tokenizer.pad_token_id,
                # An image token in an answer would ask for an image when the answer is read back.
                suppress_token_ids=[self.vlm.image_token_id],
            )
        keep = answer_mask(new, self.processor.stop_token_ids)
        answers = [self.processor.decode(row[k]) for row, k in zip(new, keep)]
        labels = torch.full_like(ids, IGNORE_INDEX)
        batch = {
            "input_ids": torch.cat([ids, new], dim=1),
            "attention_mask": torch.cat([mask, keep.long()], dim=1),
            "labels": torch.cat([labels, new.masked_fill(~keep, IGNORE_INDEX)], dim=1),
            "pixel_values": pixels,
        }
        return batch, answers

    def _token_logps(self, model: VisionLanguageModel, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
        return answer_logprobs(logits, batch["labels"])

    @torch.no_grad()
    def _reference_logps(self, batch: dict[str, Tensor]) -> Tensor | None:
        if self.kl_beta == 0:
            return None
        if self.reference is not None:
            return self._token_logps(self.reference, batch)[0]
        with self.vlm.decoder.disable_adapter():  # LoRA: the model without its adapters is the starting model
            return self._token_logps(self.vlm, batch)[0]

    def _rollouts(self, gen: dict[str, Any], answers: list[str], repeat: int) -> list[Rollout]:
        return [
            Rollout(r["prompt"], answer, refs, r["row"], r["images"])
            for (r, refs), answer in zip(
                ((r, refs) for r, refs in zip(gen["rollouts"], gen["references"]) for _ in range(repeat)), answers
            )
        ]

    # ---- training ----

    def clips_gradients(self) -> bool:
        return self.max_grad_norm > 0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        gen = batch["generate"]
        rollouts, answers = self._sample(gen)
        scores, errors = self.rewards(self._rollouts(gen, answers, self.group_size))
        rewards = torch.tensor(scores["total"], device=self.device)
        advantages = group_advantages(rewards, self.group_size)
        for i, message in errors.items():  # the whole group of a failed answer is left out, its row counted broken
            p = i // self.group_size
            advantages[p * self.group_size : (p + 1) * self.group_size] = 0
            key = gen["rollouts"][p]["key"]
            if all(k != key for k, _ in batch["bad"]):
                batch["bad"].append((key, f"{key}: {message}"))
        ref = self._reference_logps(rollouts)
        with torch.no_grad():
            old = self._token_logps(self.vlm, rollouts)[0] if self.num_iterations > 1 else None
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        for _ in range(self.num_iterations):
            logp, mask = self._token_logps(self.vlm, rollouts)
            loss, stats = grpo_loss(
                logp, old if old is not None else logp.detach(), ref, advantages, mask, self.clip, self.kl_beta
            )
            optimizer.zero_grad()
            self.manual_backward(loss)
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
            optimizer.step()
            schedule.step()
        b = batch["num_samples"]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/reward", rewards.mean(), prog_bar=True, batch_size=b)
        self.log("train/reward_std", rewards.std(), batch_size=b)
        for name, values in scores.items():
            if name != "total":
                self.log(f"train/reward/{name}", sum(values) / len(values), batch_size=b)
        self.log("train/kl", stats["kl"], batch_size=b)
        self.log("train/clip_fraction", stats["clip_fraction"], batch_size=b)
        self.log("train/answer_tokens", mask.sum(dim=1).float().mean(), batch_size=b)

    # ---- validation: vlm fit's, and the reward of the greedy answers ----

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val_reward = [0.0, 0]

    def score_answers(self, answers: list[str], gen: dict[str, Any]) -> None:
        scores, errors = self.rewards(self._rollouts(gen, answers, 1))
        self._val_reward[0] += sum(s for i, s in enumerate(scores["total"]) if i not in errors)
        self._val_reward[1] += len(answers) - len(errors)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        totals = torch.tensor(self._val_reward, dtype=torch.float64, device=self.device)
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        if totals[1] > 0:
            self.log("val/reward", totals[0] / totals[1], prog_bar=True)
