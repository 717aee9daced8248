"""Training on preference pairs: DPO and its variants (`vlm fit-dpo`), and reward models (`vlm fit-reward`).

Both are `VLMModule`s: the same model building (`config`, `init_from`, LoRA), per-part learning rates, optimizer,
schedule, checkpoints, resume and run folder as `vlm fit`; only the steps differ. Each batch is `PairCollator`'s: the
B chosen conversations, then the B rejected ones.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from vlm.train.losses import DPOLoss, answer_logprobs, bradley_terry_loss, dpo_loss
from vlm.train.module import VLMModule

from vlm.errors import VLMError
from vlm.model import VisionLanguageModel
from vlm.reward import last_token_scores, new_head, save_head


def _answer_logps(model: VisionLanguageModel, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Summed log-probabilities of each row's answer tokens (2B,), and the answers' lengths in tokens (2B,)."""
    logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
    logp, mask = answer_logprobs(logits, batch["labels"])
    return logp.sum(dim=1), mask.sum(dim=1)


class _PairModule(VLMModule):
    """What the methods trained on preference pairs share: a step scores each pair's chosen and rejected answer
    (`_pair_step`), and logs the loss, the mean margin and the share of pairs scored the right way round (its
    `val/accuracy` on held-out pairs)."""

    margin_name = "margin"
    accuracy_name = "accuracy"

    def _pair_step(self, batch: dict[str, Any], stage: str) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, chosen scores, rejected scores) of a batch of pairs."""
        raise NotImplementedError

    def _step(self, batch: dict[str, Any], stage: str) -> Tensor:
        loss, chosen, rejected = self._pair_step(batch, stage)
        b = batch["num_samples"]
        kw = {"batch_size": b, "sync_dist": stage == "val"}
        self.log(f"{stage}/loss", loss, prog_bar=True, **kw)
        self.log(f"{stage}/{self.margin_name}", (chosen - rejected).mean(), prog_bar=True, **kw)
        if stage == "train":
            self.log(f"train/{self.accuracy_name}", (chosen > rejected).float().mean(), **kw)
        else:
            self._correct += int((chosen > rejected).sum())
            self._answered += b
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")


class DPOModule(_PairModule):
    """Direct preference optimisation on image preference pairs (`vlm fit-dpo`).

    The reference model is the starting model, frozen: a copy of it, or, with LoRA, the same model with its adapters
    switched off (no copy). SimPO needs none. Logged: the loss, the implicit rewards of the chosen and rejected answers
    and their margin, and the preference accuracy (the share of pairs whose chosen answer has the higher reward), for
    training and validation pairs (`val/accuracy`).

    Args:
        beta: How far the policy may move from the reference (DPO's beta; SimPO's reward scale).
        loss: sigmoid (DPO), ipo or simpo (reference-free); see `vlm.train.losses.dpo_loss`.
        simpo_gamma: SimPO's target margin.
        nll_weight: Adds this times the chosen answers' mean per-token negative log-likelihood (RPO, Pang et al.
            2024): keeps the chosen answers likely while the margin grows. 0: plain DPO.
        **kwargs: `vlm fit`'s model options (`VLMModule`): `init_from`, learning rates, `lora`, ...
    """

    command = "vlm fit-dpo"
    margin_name = "reward_margin"
    accuracy_name = "preference_accuracy"
    curve_metrics = ("train/reward_margin", "train/preference_accuracy", "val/reward_margin")

    def __init__(
        self,
        beta: float = 0.1,
        loss: DPOLoss = "sigmoid",
        simpo_gamma: float = 0.5,
        nll_weight: float = 0.0,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if beta <= 0:
            raise VLMError("model.beta must be above 0")
        self.beta, self.loss, self.simpo_gamma, self.nll_weight = beta, loss, simpo_gamma, nll_weight
        self._origin["method"] = {"name": "dpo", "loss": loss, "beta": beta, "nll_weight": nll_weight}
        needs_copy = loss != "simpo" and self.lora is None
        # In the module's state: checkpoints carry it, so a resumed run compares with the same reference.
        self.reference = copy.deepcopy(self.vlm).requires_grad_(False).eval() if needs_copy else None

    @torch.no_grad()
    def _reference_logps(self, batch: dict[str, Any]) -> Tensor | None:
        if self.loss == "simpo":
            return None
        if self.reference is not None:
            return _answer_logps(self.reference, batch)[0]
        with self.vlm.decoder.disable_adapter():  # LoRA: the model without its adapters is the starting model
            return _answer_logps(self.vlm, batch)[0]

    def _pair_step(self, batch: dict[str, Any], stage: str) -> tuple[Tensor, Tensor, Tensor]:
        logps, tokens = _answer_logps(self.vlm, batch)
        ref = self._reference_logps(batch)
        b = batch["num_samples"]
        losses, chosen, rejected = dpo_loss(
            logps[:b],
            logps[b:],
            ref[:b] if ref is not None else None,
            ref[b:] if ref is not None else None,
            tokens[:b],
            tokens[b:],
            self.beta,
            self.loss,
            self.simpo_gamma,
        )
        loss = losses.mean()
        if self.nll_weight:
            loss = loss + self.nll_weight * (-logps[:b] / tokens[:b]).mean()
        kw = {"batch_size": b, "sync_dist": stage == "val"}
        self.log(f"{stage}/chosen_reward", chosen.mean(), **kw)
        self.log(f"{stage}/rejected_reward", rejected.mean(), **kw)
        return loss, chosen, rejected


class RewardModule(_PairModule):
    """A reward model trained on preference pairs with the Bradley-Terry loss (`vlm fit-reward`): a scalar head on
    the decoder's last hidden state at the answer's last token (`vlm.reward`). The run's `model/` folder is the model
    with `reward_head.safetensors` beside it, for `vlm reward` and GRPO's `reward_model` reward. Logged: the loss, the
    score margin, and the accuracy (the share of pairs whose chosen answer scores higher; `val/accuracy` on held-out
    pairs).

    Args:
        lr_head: Peak learning rate of the scalar head.
        **kwargs: `vlm fit`'s model options (`VLMModule`): `init_from`, learning rates, `lora`, ...
    """

    command = "vlm fit-reward"
    curve_metrics = ("train/margin", "val/margin")

    def __init__(self, lr_head: float = 1e-3, **kwargs: Any):
        super().__init__(**kwargs)
        if lr_head <= 0:
            raise VLMError("model.lr_head must be above 0: the head is what a reward model learns first")
        self.lrs["head"] = lr_head
        self.head = new_head(self.vlm)
        self._origin["method"] = {"name": "reward_model", "loss": "bradley_terry"}

    def param_groups(self) -> list[dict[str, Any]]:
        lr = self.lrs["head"]
        return [
            *super().param_groups(),
            {"params": [self.head.weight], "lr": lr, "weight_decay": self.weight_decay, "name": "head"},
            {"params": [self.head.bias], "lr": lr, "weight_decay": 0.0, "name": "head_no_decay"},
        ]

    def _pair_step(self, batch: dict[str, Any], stage: str) -> tuple[Tensor, Tensor, Tensor]:
        scores = last_token_scores(
            self.vlm, self.head, batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
        )
        b = batch["num_samples"]
        chosen, rejected = scores[:b], scores[b:]
        return bradley_terry_loss(chosen, rejected).mean(), chosen, rejected

    def export_model(self, state: dict[str, Tensor], out: Path) -> Path:
        folder = super().export_model(state, out)
        save_head({k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}, folder)
        return folder
