"""The losses of preference and reinforcement tuning, as plain functions of tensors (tests check each against hand
computed values).

- `answer_logprobs`: per-token log-probabilities of the labelled (answer) tokens, from logits and labels.
- `dpo_loss`: DPO (Rafailov et al. 2023, sigmoid), IPO (Azar et al. 2023) and SimPO (Meng et al. 2024), as in
  TRL's `DPOTrainer`/`CPOTrainer` (read to learn, written anew).
- `bradley_terry_loss`: the reward model's pairwise loss (Ouyang et al. 2022).
- `group_advantages`, `kl_estimate`, `grpo_loss`: GRPO (Shao et al. 2024, DeepSeekMath), as in TRL's `GRPOTrainer`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vlm.processor import IGNORE_INDEX

DPOLoss = Literal["sigmoid", "ipo", "simpo"]


def answer_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(per-token log-probabilities (B, T-1), mask (B, T-1)) of each labelled token given the tokens before it: the
    logits at position t predict the label at t+1; positions whose label is `IGNORE_INDEX` are 0 and masked out."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def dpo_loss(
    chosen: Tensor,
    rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float = 0.1,
    kind: DPOLoss = "sigmoid",
    simpo_gamma: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses (B,) and the implicit rewards of the chosen and rejected answers (B,) each.

    `chosen`/`rejected` are summed answer log-probabilities under the policy, `ref_*` under the frozen reference
    (unused by SimPO), `*_tokens` the answers' lengths in tokens.
    - sigmoid (DPO): -log sigmoid(beta * ((pc - rc) - (pr - rr))); rewards beta * (p - r).
    - ipo: ((pc - rc)/nc - (pr - rr)/nr - 1/(2 beta))^2, on per-token averages as TRL does; rewards as DPO's.
    - simpo: -log sigmoid(beta * (pc/nc - pr/nr) - gamma), reference-free; rewards beta * p/n.
    """
    if kind == "simpo":
        chosen_rewards, rejected_rewards = beta * chosen / chosen_tokens, beta * rejected / rejected_tokens
        return -F.logsigmoid(chosen_rewards - rejected_rewards - simpo_gamma), chosen_rewards, rejected_rewards
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"the {kind} loss needs the reference log-probabilities")
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif kind == "ipo":
        losses = (chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r}; choose sigmoid, ipo or simpo")
    return losses, beta * chosen_ratio, beta * rejected_ratio


def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Per-pair loss -log sigmoid(r_chosen - r_rejected): the chosen answer should score higher."""
    return -F.logsigmoid(chosen - rejected)


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """Each reward minus its group's mean, over the group's standard deviation (unbiased, + `eps`); `rewards` holds
    consecutive groups of `group_size` answers to one prompt. A group whose answers all score alike gets 0."""
    groups = rewards.view(-1, group_size)
    mean, std = groups.mean(dim=1, keepdim=True), groups.std(dim=1, keepdim=True)
    return ((groups - mean) / (std + eps)).flatten()


def kl_estimate(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy: exp(r - p) - (r - p) - 1 (Schulman's
    k3: unbiased, never negative)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    clip: float = 0.2,
    beta: float = 0.04,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO objective to minimise, and its statistics (`kl`, `clip_fraction`).

    Per token: -min(ratio * A, clip(ratio, 1 - clip, 1 + clip) * A) + beta * KL, with ratio = exp(logp - old_logp)
    and A the answer's advantage; averaged over each answer's tokens (`mask`), then over the answers.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    kl = kl_estimate(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    if beta:
        per_token = per_token + beta * kl
    mask = mask.float()
    tokens = mask.sum(dim=1).clamp(min=1)
    loss = ((per_token * mask).sum(dim=1) / tokens).mean()
    clipped = ((ratio < 1 - clip) & (adv < 0)) | ((ratio > 1 + clip) & (adv > 0))
    stats = {
        "kl": ((kl * mask).sum(dim=1) / tokens).mean().detach(),
        "clip_fraction": ((clipped.float() * mask).sum() / mask.sum().clamp(min=1)).detach(),
    }
    return loss, stats
