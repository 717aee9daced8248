"""Tests for the model (vlm/model.py, vlm/projector.py): decoder families, encoders, projectors, loss, embedding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, build_tiny, family_config, tiny_config, training_batch

from vlm.checkpoint import load_model, save_checkpoint
from vlm.config import ProjectorConfig, VLMConfig
from vlm.errors import VLMError
from vlm.model import IGNORE_INDEX, VisionLanguageModel
from vlm.processor import tokenizer_for
from vlm.projector import MLPProjector, PixelShuffleProjector, build_projector


def _assert_trains(model, processor, images):
    model.train()
    model.zero_grad(set_to_none=True)
    batch = training_batch(processor, images)
    out = model(**batch)
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert out.logits.shape == (labelled, len(processor.tokenizer))  # the labelled positions' logits only
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()
    for part in (model.encoder, model.projector, model.decoder):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads, f"no gradient reached {type(part).__name__}"
        assert all(torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
    # The first patch-embedding weights sit behind every encoder layer: gradients flow all the way back.
    first = next(m for m in model.encoder.model.patch_embed.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_families_train(family, pil_images):
    model, processor = build_tiny(family_config(family))
    assert model.decoder.config.model_type == family.removesuffix("-grid")
    _assert_trains(model, processor, pil_images)


@pytest.mark.parametrize(
    ("encoder", "projector"),
    [
        ("vit_base_patch16_clip_224", "mlp"),
        ("vit_base_patch16_siglip_224", "pixel_shuffle"),
        ("deit_tiny_patch16_224", "mlp"),
        ("vit_small_patch16_224.dino", "pixel_shuffle"),
    ],
)
def test_encoders_and_projectors_train(encoder, projector, pil_images):
    model, processor = build_tiny(tiny_config(encoder=encoder, projector=projector))
    assert model.num_image_tokens == (4 if projector == "pixel_shuffle" else 16)
    assert isinstance(model.projector, PixelShuffleProjector if projector == "pixel_shuffle" else MLPProjector)
    _assert_trains(model, processor, pil_images)


def test_loss_is_shifted_cross_entropy_over_labelled_tokens(tiny, pil_images):
    model, processor = tiny
    batch = training_batch(processor, pil_images)
    with torch.no_grad():
        out = model(**batch)
        logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits  # every position
    labels = batch["labels"]
    keep = labels[:, 1:] != IGNORE_INDEX
    expected = F.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep])
    assert 0 < int(keep.sum()) < keep.numel() // 2
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.logits, logits[:, :-1][keep])  # with labels: the labelled positions' logits


def test_image_embeddings_fill_exactly_the_image_positions(tiny, pil_images):
    model, processor = tiny
    batch = training_batch(processor, pil_images)
    ids = batch["input_ids"]
    with torch.no_grad():
        embeds = model.embed(ids, batch["pixel_values"])
        tokens = model.decoder.get_input_embeddings()(ids)
        images = model.encode_images(batch["pixel_values"])  # (3, N, D)
    mask = ids == model.image_token_id
    assert mask.sum(1).tolist() == [model.num_image_tokens, 2 * model.num_image_tokens, 0]
    torch.testing.assert_close(embeds[~mask], tokens[~mask], rtol=0, atol=0)
    # Sample by sample, image by image, in order.
    torch.testing.assert_close(embeds[0][mask[0]], images[0])
    torch.testing.assert_close(embeds[1][mask[1]], images[1:3].flatten(0, 1))


def test_images_must_match_image_positions(tiny, pil_images):
    model, processor = tiny
    batch = training_batch(processor, pil_images)
    with pytest.raises(VLMError, match="image-token positions for 2 images"):
        model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"][:2])
    with pytest.raises(VLMError, match="for 0 images"):
        model(batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_does_not_change_logits(family, pil_images):
    model, processor = build_tiny(family_config(family))
    long_ids = processor.prompt("<image>\nWhat is the shape of the red object on the left?", 1)
    short_ids = processor.prompt("<image>\nHi", 1)
    pixels = processor.transform(pil_images[:2])
    batch = processor.pad([long_ids, short_ids], "left")
    with torch.no_grad():
        both = model(batch["input_ids"], batch["attention_mask"], pixels).logits
        alone = model(torch.tensor([short_ids]), torch.ones(1, len(short_ids), dtype=torch.long), pixels[1:]).logits
    torch.testing.assert_close(both[1, -len(short_ids) :], alone[0], atol=1e-4, rtol=1e-4)


def test_pixel_shuffle_folds_each_block_of_patches():
    proj = PixelShuffleProjector(in_dim=1, out_dim=4, grid_size=(4, 4), factor=2)
    with torch.no_grad():
        proj.proj.weight.copy_(torch.eye(4))
    patches = torch.arange(16.0).view(1, 16, 1)  # patch (row r, col c) has value 4r + c
    out = proj(patches)
    assert out.shape == (1, 4, 4)
    # Token (i, j) holds the 2x2 block with top-left patch (2i, 2j), row by row.
    expected = torch.tensor([[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]], dtype=torch.float)
    torch.testing.assert_close(out[0], expected)


def test_projector_errors():
    with pytest.raises(VLMError, match="factor 3 must divide"):
        build_projector(ProjectorConfig("pixel_shuffle", 3), 8, 8, (4, 4))
    with pytest.raises(VLMError, match="unknown projector kind"):
        build_projector(ProjectorConfig("linear"), 8, 8, (4, 4))  # type: ignore[arg-type]
    config = tiny_config(projector="pixel_shuffle", keep_prefix_tokens=True)
    with pytest.raises(VLMError, match="keep_prefix_tokens"):
        VisionLanguageModel.from_config(config, tokenizer_for(config), pretrained=False)


def test_from_config_errors():
    config = VLMConfig.from_name("tiny")
    tokenizer = tokenizer_for(config)
    config.image_token = "<img>"  # the tokenizer only holds <image>
    with pytest.raises(VLMError, match="no image token '<img>'"):
        VisionLanguageModel.from_config(config, tokenizer, pretrained=False)
    bad_decoders = [({"hidden_size": 64}, "model_type"), ({"model_type": "no_such_model"}, "hf_config")]
    for hf_config, message in bad_decoders:
        config = VLMConfig.from_name("tiny")
        config.decoder.hf_config = hf_config
        with pytest.raises(VLMError, match=message):
            VisionLanguageModel.from_config(config, tokenizer, pretrained=False)
    config = VLMConfig.from_name("tiny")
    config.encoder.name = "no_such_encoder"
    with pytest.raises(VLMError, match="unknown encoder"):
        VisionLanguageModel.from_config(config, tokenizer, pretrained=False)


def test_config_records_the_full_decoder_config():
    config = tiny_config("gpt2")
    model, processor = build_tiny(config, scrambled=False)
    hf = model.config.decoder.hf_config
    assert hf["model_type"] == "gpt2" and hf["n_positions"] == 256
    assert hf["vocab_size"] == len(processor.tokenizer) == model.decoder.get_input_embeddings().num_embeddings
    assert hf["pad_token_id"] == processor.tokenizer.pad_token_id
    assert "vocab_size" not in config.decoder.hf_config  # the caller's config is left alone
    assert model.image_token_id == processor.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")


def test_a_few_steps_teach_the_model_to_read_the_image():
    """The answer depends on the image alone (solid red or blue), so only a model that reads it can learn it."""
    import random

    from PIL import Image

    from vlm.checkpoint import build
    from vlm.config import VLMConfig
    from vlm.generation import generate_texts

    torch.manual_seed(0)
    rng = random.Random(0)
    model, processor = build(VLMConfig.from_name("tiny"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    colors = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    question = "What colour is it?"
    losses = []
    for _ in range(60):
        names = [rng.choice(list(colors)) for _ in range(16)]
        encoded = [
            processor.encode([{"role": "user", "content": question}, {"role": "assistant", "content": c}], 1)
            for c in names
        ]
        batch = processor.pad([e[0] for e in encoded], "right", [e[1] for e in encoded])
        batch["pixel_values"] = processor.transform([Image.new("RGB", (32, 32), colors[c]) for c in names])
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 / 4
    model.eval()
    images = [[Image.new("RGB", (32, 32), colors[c])] for c in ("red", "blue")]
    assert generate_texts(model, processor, [question] * 2, images) == ["red", "blue"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_expanding_the_decoder_keeps_its_outputs_and_new_layers_learn(family, pil_images, tmp_path):
    from vlm.checkpoint import load, save_checkpoint
    from vlm.generation import GenerationOptions

    model, processor = build_tiny(tiny_config(family))
    deeper, _ = build_tiny(tiny_config(family))
    assert deeper.expand_decoder(5) == [1, 3, 4]  # 2 -> 5: one new layer after layer 0, two after layer 1
    layers = deeper.decoder.model.layers
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(5))  # the KV cache is indexed by these
    assert deeper.config.decoder.hf_config["num_hidden_layers"] == deeper.decoder.config.num_hidden_layers == 5
    assert torch.count_nonzero(layers[1].self_attn.o_proj.weight) == 0
    assert torch.equal(layers[1].self_attn.q_proj.weight, layers[0].self_attn.q_proj.weight)  # copies the layer below
    batch = training_batch(processor, pil_images)
    with torch.no_grad():
        torch.testing.assert_close(deeper(**batch).logits, model(**batch).logits, atol=1e-5, rtol=1e-5)
    prompts = processor(["<image>\nWhat colour is it?", "hello there"], [[pil_images[0]], []])
    kwargs = {"options": GenerationOptions(max_new_tokens=6), "stop_token_ids": processor.stop_token_ids}
    assert torch.equal(deeper.generate(**prompts, **kwargs), model.generate(**prompts, **kwargs))  # with the cache
    # The zeroed projections get gradients, so the new layers train.
    deeper.train()
    deeper(**batch).loss.backward()
    assert (
        layers[1].self_attn.o_proj.weight.grad.abs().sum() > 0 and layers[1].mlp.down_proj.weight.grad.abs().sum() > 0
    )
    # A saved expanded model rebuilds at its new depth.
    deeper.eval()
    save_checkpoint(deeper, tmp_path / "deeper", processor)
    loaded, _ = load(tmp_path / "deeper")
    assert len(loaded.decoder.model.layers) == 5
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, deeper(**batch).logits, atol=0, rtol=0)


def test_decoder_expansion_errors():
    model, _ = build_tiny(tiny_config("gpt2"), scrambled=False)
    with pytest.raises(VLMError, match="cannot expand a gpt2 decoder"):
        model.expand_decoder(4)
    model, _ = build_tiny(scrambled=False)
    with pytest.raises(VLMError, match="to fewer"):
        model.expand_decoder(1)


@pytest.mark.parametrize("projector", ["mlp", "pixel_shuffle"])
def test_output_norm_starts_image_tokens_at_the_text_scale(projector, pil_images, tmp_path):
    config = tiny_config(
        encoder="vit_convstem",
        overrides={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
        projector=projector,
    )
    config.projector.output_norm = True
    model, processor = build_tiny(config, scrambled=False)
    text_rms = model.decoder.get_input_embeddings().weight.pow(2).mean().sqrt()
    image = model.encode_images(processor.transform(pil_images[:2]))
    assert torch.allclose(image.pow(2).mean(-1).sqrt(), text_rms.expand(image.shape[:2]), rtol=1e-3)
    _assert_trains(model, processor, pil_images)
    save_checkpoint(model, tmp_path / "m", processor)
    again = load_model(tmp_path / "m")
    assert again.config.projector.output_norm and torch.equal(again.projector.norm.weight, model.projector.norm.weight)
