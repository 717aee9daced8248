"""Training on preference pairs: DPO and its variants (`vlm fit-dpo`), and reward models (`vlm fit-reward`).

Both are `VLMModule`s: the same model building (`config`, `init_from`, LoRA), per-part learning rates, optimizer,
schedule, checkpoints, resume and run folder as `vlm fit`; only the steps differ. Each batch is `PairCollator`'s: the
B chosen conversations, then the B rejected ones.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from vlm.train.losses import DPOLoss, answer_logprobs, bradley_terry_loss, dpo_loss
from vlm.train.module import VLMModule, eval_mode

from vlm.errors import VLMError
from vlm.model import VisionLanguageModel
from vlm.reward import last_token_scores, new_head


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
    switched off (no copy). SimPO needs none. With `precompute_ref_log_probs`, the starting model scores every
    training and validation pair once when fit starts, and those log-probabilities stand in for the reference (no
    copy, and no reference forward per step; as TRL's `precompute_ref_log_probs`). Logged: the loss, the implicit
    rewards of the chosen and rejected answers and their margin, and the preference accuracy (the share of pairs
    whose chosen answer has the higher reward), for training and validation pairs (`val/accuracy`).

    Args:
        beta: How far the policy may move from the reference (DPO's beta; SimPO's reward scale).
        loss: sigmoid (DPO), ipo or simpo (reference-free); see `vlm.train.losses.dpo_loss`.
        simpo_gamma: SimPO's target margin.
        nll_weight: Adds this times the chosen answers' mean per-token negative log-likelihood (RPO, Pang et al.
            2024): keeps the chosen answers likely while the margin grows. 0: plain DPO.
        precompute_ref_log_probs: Score the pairs with the reference once, before training, instead of at every
            step: no copy of the model, one forward pass per step fewer. The scores are saved in checkpoints, so a
            resumed run reads them rather than recomputing them with the trained model. (SimPO has no reference.)
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
        precompute_ref_log_probs: bool = False,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if beta <= 0:
            raise VLMError("model.beta must be above 0")
        self.beta, self.loss, self.simpo_gamma, self.nll_weight = beta, loss, simpo_gamma, nll_weight
        self.precompute = precompute_ref_log_probs and loss != "simpo"
        self._origin["method"] = {"name": "dpo", "loss": loss, "beta": beta, "nll_weight": nll_weight}
        if self.precompute:
            self._origin["method"]["precompute_ref_log_probs"] = True
        needs_copy = loss != "simpo" and self.lora is None and not self.precompute
        # In the module's state: checkpoints carry it, so a resumed run compares with the same reference.
        self.reference = copy.deepcopy(self.vlm).requires_grad_(False).eval() if needs_copy else None
        # Precomputed: split (train, val) -> (pairs in the file, 2): each pair's chosen and rejected log-probability.
        self.reference_table: dict[str, Tensor] = {}

    @torch.no_grad()
    def _live_reference_logps(self, batch: dict[str, Any]) -> Tensor:
        if self.reference is not None:
            return _answer_logps(self.reference, batch)[0]
        with eval_mode(self.vlm), self._starting_model():
            return _answer_logps(self.vlm, batch)[0]

    def _starting_model(self) -> contextlib.AbstractContextManager:
        """LoRA: the model without its adapters is the starting model. Full tuning: the model itself, before its first
        step (when the reference log-probabilities are precomputed)."""
        return self.vlm.decoder.disable_adapter() if self.lora is not None else contextlib.nullcontext()

    def _reference_logps(self, batch: dict[str, Any], stage: str) -> Tensor | None:
        """The reference's summed answer log-probabilities (2B,): the chosen answers', then the rejected ones'."""
        if self.loss == "simpo":
            return None
        if not self.precompute:
            return self._live_reference_logps(batch)
        table = self.reference_table[stage][batch["index"].cpu()]  # (B, 2)
        return torch.cat([table[:, 0], table[:, 1]]).to(self.device)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.precompute:
            for split in ("train", "val"):
                self._precompute(split)

    def on_validation_start(self) -> None:
        if self.precompute and "val" not in self.reference_table:
            if self.trainer.global_step > 0:
                raise VLMError(
                    "no precomputed reference log-probabilities for the validation pairs, and the model has trained "
                    "since it was the reference: give data.val when the run starts"
                )
            self._precompute("val")

    def _precompute(self, split: str) -> None:
        """Scores every pair of `split` with the reference once (unless a resumed checkpoint brought the scores)."""
        loader = self.trainer.datamodule.in_order(split)
        if loader is None:
            return
        size = len(loader.dataset)
        if split in self.reference_table:
            if len(self.reference_table[split]) != size:
                raise VLMError(
                    f"the checkpoint's reference log-probabilities are for {len(self.reference_table[split])} {split} "
                    f"pairs, but data has {size}: resume with the data the run started with"
                )
            return
        if self.trainer.ckpt_path is not None:  # resumed: the model is no longer the reference
            raise VLMError(
                f"the checkpoint has no precomputed reference log-probabilities of {split} pairs: resume with the data "
                "and model.precompute_ref_log_probs the run started with"
            )
        rank_zero_info(f"precomputing the reference's log-probabilities of {size} {split} pairs")
        table = torch.full((size, 2), float("nan"))
        for batch in loader:
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            logps = self._live_reference_logps(batch).float().cpu()
            b = batch["num_samples"]
            table[batch["index"].cpu()] = torch.stack([logps[:b], logps[b:]], dim=1)
        self.reference_table[split] = table  # rows left NaN are broken pairs, which no batch carries

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.precompute:
            checkpoint["reference_log_probs"] = dict(self.reference_table)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.precompute:  # checked against the data when fit starts (`_precompute`)
            self.reference_table = dict(checkpoint.get("reference_log_probs", {}))

    def _pair_step(self, batch: dict[str, Any], stage: str) -> tuple[Tensor, Tensor, Tensor]:
        logps, tokens = _answer_logps(self.vlm, batch)
        ref = self._reference_logps(batch, stage)
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
