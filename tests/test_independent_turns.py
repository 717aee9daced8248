"""Independent turns (vlm/collate.py `encode_sample(..., independent_turns=True)`, `data.independent_turns`): a
conversation's answers trained as one-question samples sharing one row give every answer token exactly the logits, and
the row exactly the loss, that the separate one-question samples give; no turn sees another's tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny, solid, tiny_config

from vlm.collate import Collator, encode_sample, split_turns, tree_mask
from vlm.errors import VLMError
from vlm.processor import IGNORE_INDEX

TURNS = [
    ("What is the shape of the red object?", "circle"),
    ("Is the red object on the left or on the right?", "left"),
    ("What is the shape of the object closest to the blue object?", "a small square"),
]


def conversation(turns=TURNS) -> list[dict[str, str]]:
    return [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


def answer_logits(model, batch) -> list[torch.Tensor]:
    """Logits at the positions that predict a labelled token, row by row, in order."""
    logits = model(
        batch["input_ids"], batch.get("attention_mask"), batch["pixel_values"], position_ids=batch.get("position_ids")
    ).logits
    targets = batch["labels"][:, 1:] != IGNORE_INDEX
    return [logits[r, :-1][targets[r]] for r in range(len(logits))]


def test_split_turns_keeps_the_system_message_and_each_question_with_its_answer():
    system = {"role": "system", "content": "Be brief."}
    turns = split_turns([system, *conversation()])
    assert [[m["content"] for m in t] for t in turns] == [["Be brief.", q, a] for q, a in TURNS]
    with pytest.raises(VLMError, match="follow a question"):
        split_turns([{"role": "assistant", "content": "hi"}])


@pytest.mark.parametrize("images_after_text", [False, True])
def test_tree_row_gives_each_answer_the_logits_of_its_own_sample(images_after_text):
    config = tiny_config()
    config.images_after_text = images_after_text
    model, processor = build_tiny(config)
    image = solid((200, 40, 40))
    tree = encode_sample(processor, conversation(), [image], "conversation", [], independent_turns=True)
    shared, lengths = tree["segments"]
    assert len(lengths) == 3 and shared + sum(lengths) == len(tree["input_ids"])
    # The image is encoded once when the shared start holds it, once per turn when each question comes first.
    assert tree["pixel_values"].shape[0] == (3 if images_after_text else 1)
    single = [
        encode_sample(processor, conversation([t]), [image], "conversation", [], independent_turns=True) for t in TURNS
    ]
    other = encode_sample(processor, conversation(TURNS[:1]), [solid((10, 10, 250))], "vqa", [])
    collate = Collator(processor)
    with torch.no_grad():
        tree_logits = answer_logits(model, collate([tree, other]))
        alone = [answer_logits(model, collate([s]))[0] for s in single]
    torch.testing.assert_close(tree_logits[0], torch.cat(alone), atol=1e-5, rtol=1e-4)
    # A one-turn row in the same batch is unchanged by the tree beside it.
    torch.testing.assert_close(tree_logits[1], answer_logits(model, collate([other]))[0], atol=1e-5, rtol=1e-4)


def test_tree_loss_is_the_mean_over_every_answer_token():
    model, processor = build_tiny()
    image = solid((30, 200, 30))
    tree = encode_sample(processor, conversation(), [image], "conversation", [], independent_turns=True)
    batch = Collator(processor)([tree])
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    loss = model(*args, batch["labels"], batch["position_ids"]).loss
    logits = model(*args, position_ids=batch["position_ids"]).logits
    targets = batch["labels"][0, 1:]
    labelled = targets != IGNORE_INDEX
    torch.testing.assert_close(loss, F.cross_entropy(logits[0, :-1][labelled], targets[labelled]))
    # Every answer token of every turn is a target (each turn's end of turn included), and nothing else is.
    assert int(labelled.sum()) == sum(label != IGNORE_INDEX for label in tree["labels"]) > 3 * len(TURNS)


def test_tree_mask_lets_a_turn_see_the_shared_start_and_itself_only():
    positions, mask = tree_mask([(2, [2, 1]), (3, [])], width=5)
    assert positions.tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 0, 0]]
    row = mask[0, 0].int().tolist()
    assert row == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # turn 2 skips turn 1
    ]
    assert mask[1, 0, 4].int().tolist() == [0, 0, 0, 0, 1]  # padding sees only itself


def test_placeholders_cannot_be_split(tiny):
    _, processor = tiny
    messages = conversation()
    messages[2] = {"role": "user", "content": "And here <image>?"}
    with pytest.raises(VLMError, match="independent_turns"):
        encode_sample(processor, messages, [solid((1, 2, 3))], "conversation", [], independent_turns=True)


def test_data_module_refuses_packing_with_independent_turns():
    from vlm.train.data import VLMDataModule

    with pytest.raises(VLMError, match="cannot be combined"):
        VLMDataModule(train="x.jsonl", pack_tokens=64, independent_turns=True)
