"""The preference and RL losses (train/losses.py) against values computed by hand, and answer log-probabilities
against a plain forward pass."""

from __future__ import annotations

import math

import pytest
import torch
from vlm.train.losses import (
    answer_logprobs,
    bradley_terry_loss,
    dpo_loss,
    group_advantages,
    grpo_loss,
    kl_estimate,
)

from vlm.processor import IGNORE_INDEX

# Summed answer log-probs of one pair: policy chosen -1, rejected -3; reference -2 and -2; answers of 2 and 4 tokens.
PAIR = [torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0, 2.0, 4.0)]


def test_dpo_sigmoid_loss():
    # beta (( -1 + 2) - (-3 + 2)) = 0.5 * 2 = 1 -> -log sigmoid(1) = log(1 + e^-1)
    loss, chosen, rejected = dpo_loss(*PAIR, beta=0.5, kind="sigmoid")
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert (chosen.item(), rejected.item()) == pytest.approx((0.5, -0.5))


def test_ipo_loss_uses_per_token_averages():
    # (1/2 - (-1)/4 - 1/(2 * 0.5))^2 = (0.75 - 1)^2
    loss, chosen, rejected = dpo_loss(*PAIR, beta=0.5, kind="ipo")
    assert loss.item() == pytest.approx(0.0625)
    assert (chosen.item(), rejected.item()) == pytest.approx((0.5, -0.5))


def test_simpo_loss_needs_no_reference():
    pc, pr, _, _, nc, nr = PAIR
    # beta 2: rewards 2 * -1/2 = -1 and 2 * -3/4 = -1.5; -log sigmoid(-1 + 1.5 - 0.5) = log 2
    loss, chosen, rejected = dpo_loss(pc, pr, None, None, nc, nr, beta=2.0, kind="simpo", simpo_gamma=0.5)
    assert loss.item() == pytest.approx(math.log(2))
    assert (chosen.item(), rejected.item()) == pytest.approx((-1.0, -1.5))
    with pytest.raises(ValueError, match="needs the reference"):
        dpo_loss(pc, pr, None, None, nc, nr, kind="sigmoid")


def test_bradley_terry_loss():
    assert bradley_terry_loss(torch.tensor(2.0), torch.tensor(0.0)).item() == pytest.approx(math.log(1 + math.exp(-2)))


def test_group_advantages():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5]), group_size=2)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)  # 0.5 from the mean, over the unbiased standard deviation of (1, 0)
    assert adv.tolist() == pytest.approx([a, -a, -a, a, 0, 0])


def test_kl_estimate():
    # policy p = 1, reference 0.5 on the sampled token: exp(log .5) - log .5 - 1
    k = kl_estimate(torch.tensor([0.0, -1.0]), torch.tensor([math.log(0.5), -1.0]))
    assert k.tolist() == pytest.approx([0.5 + math.log(2) - 1, 0.0])


def test_grpo_loss_clips_the_ratio_and_adds_the_kl():
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    logp = old + torch.tensor([[math.log(1.5), 0.0, 5.0]])  # ratios 1.5 and 1; the third token is masked out
    mask = torch.tensor([[True, True, False]])
    # A = 1: -min(1.5, 1.2) and -min(1, 1): mean -1.1; the first token is clipped.
    loss, stats = grpo_loss(logp, old, None, torch.tensor([1.0]), mask, clip=0.2, beta=0.0)
    assert loss.item() == pytest.approx(-1.1) and stats["clip_fraction"].item() == pytest.approx(0.5)
    # A = -1: -min(-1.5, -1.2) = 1.5 (never clipped when it hurts) and 1: mean 1.25.
    loss, stats = grpo_loss(logp, old, None, torch.tensor([-1.0]), mask, clip=0.2, beta=0.0)
    assert loss.item() == pytest.approx(1.25) and stats["clip_fraction"].item() == 0
    # With a reference, beta x the mean KL of the answer's tokens is added.
    ref = logp + torch.tensor([[math.log(0.5), 0.0, 0.0]])
    loss, stats = grpo_loss(logp, old, ref, torch.tensor([-1.0]), mask, clip=0.2, beta=0.1)
    kl = (0.5 + math.log(2) - 1) / 2
    assert stats["kl"].item() == pytest.approx(kl) and loss.item() == pytest.approx(1.25 + 0.1 * kl)


def test_answer_logprobs_of_a_padded_batch_equal_a_plain_forward(tiny, pil_images):
    """The log-probs of an answer given (image, prompt) are those of a plain forward pass of that row alone, and
    padding it in a batch beside a longer row does not change them."""
    model, processor = tiny
    rows = []
    for answer in ("circle", "a red square above a blue circle"):
        messages = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": answer}]
        rows.append(processor.encode(messages, 1))
    pixels = processor.transform([pil_images[0]])
    with torch.no_grad():
        ids, labels = (torch.tensor([x]) for x in rows[0])
        logits = model(ids, torch.ones_like(ids), pixels).logits
        by_hand = torch.log_softmax(logits[0, :-1], -1)[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
        answer = labels[0, 1:] != IGNORE_INDEX
        alone, mask = answer_logprobs(logits, labels)
        assert torch.equal(mask[0], answer) and torch.allclose(alone[0][answer], by_hand[answer])
        batch = processor.pad([r[0] for r in rows], "right", [r[1] for r in rows])
        padded, pmask = answer_logprobs(
            model(batch["input_ids"], batch["attention_mask"], torch.cat([pixels, pixels])).logits, batch["labels"]
        )
    n = ids.shape[1] - 1
    assert torch.equal(pmask[0, :n], answer) and not pmask[0, n:].any()
    assert torch.allclose(padded[0, :n], alone[0], atol=1e-5)
