"""Grid image positions (vlm/positions.py): the rotary offsets, what attention can see of them, and that a model using
them builds, saves, loads, trains and refuses what it cannot do. Caching, left padding and packing are checked with
the other decoders in test_generation.py, test_model.py and test_packing.py."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny, tiny_config

from vlm.checkpoint import load, save_checkpoint
from vlm.errors import VLMError
from vlm.generation import generate_texts
from vlm.llava import export_hf
from vlm.positions import GridRotary, grid_offsets


def test_grid_offsets_give_each_image_token_its_row_and_column():
    # text, a 2x2 image, text, two 2x2 images back to back, text
    mask = torch.tensor([[0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    offsets = grid_offsets(mask, (2, 2))[0]
    positions = torch.arange(mask.shape[1])[:, None] + offsets  # (sequence, row, column) rotary positions
    assert positions[[0, 5, 14]].tolist() == [[0, 0, 0], [5, 5, 5], [14, 14, 14]]  # text: its own position thrice
    assert positions[1:5].tolist() == [[1, 1, 1], [1, 1, 2], [1, 2, 1], [1, 2, 2]]
    assert positions[6:10].tolist() == [[6, 6, 6], [6, 6, 7], [6, 7, 6], [6, 7, 7]]
    assert positions[10:14].tolist() == [[10, 10, 10], [10, 10, 11], [10, 11, 10], [10, 11, 11]]
    # A 1x4 grid reads the same tokens as one row.
    assert (torch.arange(15)[:, None] + grid_offsets(mask, (1, 4))[0])[6:10, 2].tolist() == [6, 7, 8, 9]


def _scores(rotary, mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Attention logits between every pair of tokens carrying the same query and key content: what rotary
    positions alone make of their distance."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    dim = rotary.rotary.inv_freq.shape[0] * 2
    q = torch.randn(dim).expand(1, 1, mask.shape[1], dim)
    k = torch.randn(dim).expand(1, 1, mask.shape[1], dim)
    positions = torch.arange(mask.shape[1])[None]
    with rotary.offsets(grid_offsets(mask, grid)):
        cos, sin = rotary(q, positions)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return (q[0, 0] @ k[0, 0].T).detach()


def test_attention_between_patches_sees_rows_and_columns_apart():
    model, _ = build_tiny(tiny_config(image_positions="grid"))
    rotary = model.decoder.model.rotary_emb
    assert isinstance(rotary, GridRotary)
    mask = torch.tensor([[0, 0] + [1] * 16 + [0, 0]], dtype=torch.bool)  # a 4x4 image between text
    s = _scores(rotary, mask, (4, 4))
    patch = {(r, c): 2 + 4 * r + c for r in range(4) for c in range(4)}
    # The same rows and columns apart, anywhere on the grid: the same score.
    torch.testing.assert_close(s[patch[0, 0], patch[1, 2]], s[patch[2, 1], patch[3, 3]])
    torch.testing.assert_close(s[patch[0, 3], patch[0, 0]], s[patch[3, 3], patch[3, 0]])
    torch.testing.assert_close(s[patch[1, 1], patch[0, 1]], s[patch[2, 2], patch[1, 2]])
    # One position apart in sequence: one patch beside another, and one a row down and 3 columns back. Sequence
    # positions (the same tokens with no image mask) score the two pairs alike; grid positions tell them apart.
    plain = _scores(GridRotary(rotary.rotary), torch.zeros_like(mask), (4, 4))
    beside, wrapped = (patch[0, 1], patch[0, 0]), (patch[1, 0], patch[0, 3])
    torch.testing.assert_close(plain[beside], plain[wrapped])
    assert not torch.isclose(s[beside], s[wrapped], atol=1e-3)
    # Text to text is plain RoPE.
    torch.testing.assert_close(s[18:, :2], plain[18:, :2])
    torch.testing.assert_close(s[:2, :2], plain[:2, :2])


def test_grid_positions_change_image_tokens_only(pil_images):
    model, processor = build_tiny()
    text = processor(["Tell me a story about a cat"], [[]])
    image = processor(["<image>\nWhat colour is it?"], [[pil_images[2]]])
    with torch.no_grad():
        before = model(**text).logits, model(**image).logits
        model.set_image_positions("grid")
        after = model(**text).logits, model(**image).logits
    assert model.config.image_positions == "grid"
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)  # a text-only prompt is unchanged
    first = int((image["input_ids"][0] == model.image_token_id).nonzero()[0])
    torch.testing.assert_close(after[1][:, : first + 1], before[1][:, : first + 1])  # so is text before the image
    assert (after[1][:, first + 1 :] - before[1][:, first + 1 :]).abs().max() > 1e-2
    model.set_image_positions("sequence")
    with torch.no_grad():
        torch.testing.assert_close(model(**image).logits, before[1], rtol=0, atol=0)


def test_pixel_shuffle_tokens_take_the_folded_grid(pil_images):
    model, processor = build_tiny(tiny_config(projector="pixel_shuffle", image_positions="grid"))
    assert model.image_grid == (2, 2) and model.num_image_tokens == 4  # the 4x4 patch grid folded 2x2
    answers = generate_texts(model, processor, ["<image>\nWhat colour?"] * 2, [[pil_images[0]], [pil_images[1]]])
    assert answers[0] != answers[1]


def test_grid_positions_survive_saving_and_loading(tmp_path, pil_images):
    model, processor = build_tiny(tiny_config(image_positions="grid"))
    save_checkpoint(model, tmp_path / "m", processor)
    loaded, processor = load(tmp_path / "m")
    assert loaded.config.image_positions == "grid"
    assert isinstance(loaded.decoder.model.rotary_emb, GridRotary)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    batch = processor(["<image>\nWhat colour is it?"], [[pil_images[0]]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_what_grid_positions_refuse(tmp_path):
    with pytest.raises(VLMError, match="image_positions must be one of sequence, grid, not 'diagonal'"):
        build_tiny(tiny_config(image_positions="diagonal"))
    with pytest.raises(VLMError, match="a gpt2 decoder has none"):
        build_tiny(tiny_config("gpt2", image_positions="grid"))
    with_class_token = tiny_config(encoder="vit_tiny_patch16_224", keep_prefix_tokens=True, image_positions="grid")
    with pytest.raises(VLMError, match="needs a patch grid"):
        build_tiny(with_class_token)
    model, processor = build_tiny(tiny_config(image_positions="grid"))
    save_checkpoint(model, tmp_path / "m", processor)
    with pytest.raises(VLMError, match="export-hf supports sequence image positions only"):
        export_hf(str(tmp_path / "m"), str(tmp_path / "hf"))


def test_training_switches_a_model_to_grid_positions(tmp_path):
    from vlm.train.module import VLMModule

    model, processor = build_tiny()
    save_checkpoint(model, tmp_path / "m", processor)
    module = VLMModule(init_from=str(tmp_path / "m"), pretrained=False, image_positions="grid")
    assert module.vlm.config.image_positions == "grid"
    assert module.export_meta()["config"]["image_positions"] == "grid"
    with pytest.raises(VLMError, match="image_positions must be one of"):
        VLMModule(init_from=str(tmp_path / "m"), pretrained=False, image_positions="2d")
