"""Tests for the transformers LLaVA export and import (vlm/llava/).

Tiny random models (CLIP- and SigLIP-style timm towers, the `tiny` llama decoder) are exported, loaded back with
transformers and compared with the vlm model: weights complete, logits equal, processor ids and pixels equal,
greedy generations equal. Weights are re-drawn with a large spread so generations differ from token to token and a
wrong mapping cannot hide behind near-uniform logits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers.processors import TemplateProcessing
from transformers import (
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    pipeline,
)

from vlm.checkpoint import build, load, save_checkpoint
from vlm.config import TINY_TOKENIZER, VLMConfig
from vlm.decoder import load_tokenizer
from vlm.errors import VLMError
from vlm.generation import GenerationOptions
from vlm.llava import export_hf, import_hf

TOWER = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 3, "num_heads": 2}
VARIANTS = {
    # name: (timm encoder, feature_layer, keep_prefix_tokens)
    "clip": ("vit_base_patch16_clip_224", -2, False),  # drops the class token: LLaVA's "default"
    "clip-quickgelu-cls": ("vit_base_patch16_clip_quickgelu_224", -1, True),  # keeps it: "full"
    "siglip": ("vit_base_patch16_siglip_224", -2, False),
}
PROMPT = "What is in the picture?"
ROPE_THETA = 50000.0  # not transformers' default: a reader that ignores the setting gets other logits


def _image(seed: int, size: tuple[int, int] = (45, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _spread_weights(model: torch.nn.Module, seed: int) -> None:
    """Random weights with a large spread: sharp, input-dependent logits (the default init gives near-uniform ones)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(scale + 0.3 * torch.randn(p.shape, generator=gen))


def _build(variant: str, seed: int = 0):
    name, layer, keep = VARIANTS[variant]
    config = VLMConfig.from_name("tiny")
    config.encoder.name, config.encoder.overrides = name, dict(TOWER)
    config.encoder.feature_layer, config.encoder.keep_prefix_tokens = layer, keep
    config.decoder.hf_config["rope_theta"] = ROPE_THETA
    model, processor = build(config)
    _spread_weights(model, seed)
    return model.eval(), processor


def _hf_messages(num_images: int, text: str = PROMPT, image: Image.Image | None = None) -> list[dict]:
    parts = [{"type": "image", **({"image": image} if image is not None else {})} for _ in range(num_images)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory):
    """(variant, vlm model, vlm processor, LLaVA folder, vlm checkpoint folder)."""
    root = tmp_path_factory.mktemp(request.param)
    model, processor = _build(request.param)
    save_checkpoint(model, root / "vlm", processor)
    export_hf(str(root / "vlm"), str(root / "hf"))
    return request.param, model, processor, root / "hf", root / "vlm"


@pytest.fixture(scope="module")
def hf_model(exported):
    model, info = LlavaForConditionalGeneration.from_pretrained(
        exported[3], output_loading_info=True, trust_remote_code=False
    )
    return model.eval(), info


def test_export_loads_without_missing_or_unexpected_weights(exported, hf_model):
    variant, model, _, folder, _ = exported
    hf, info = hf_model
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    assert hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()  # tied embeddings survive
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["image_token_index"] == model.image_token_id
    assert config["vision_feature_select_strategy"] == ("default" if variant == "clip" else "full")
    assert config["vision_config"]["model_type"] == (
        "siglip_vision_model" if variant == "siglip" else "clip_vision_model"
    )
    # The tower keeps only the blocks vlm reads: depth 3 with feature layer -2 leaves 2.
    assert config["vision_config"]["num_hidden_layers"] == len(model.encoder.model.blocks)
    expected_act = "quick_gelu" if "quickgelu" in variant else "gelu"
    assert config["vision_config"]["hidden_act"] == expected_act
    # transformers 5 reads rope_parameters, 4.x rope_theta: both must carry the decoder's value.
    assert config["text_config"]["rope_parameters"]["rope_theta"] == config["text_config"]["rope_theta"] == ROPE_THETA


def test_export_logits_match(exported, hf_model):
    _, model, processor, _, _ = exported
    hf, _ = hf_model
    batch = processor([PROMPT], [[_image(1)]])
    other = processor([PROMPT], [[_image(2)]])
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = hf(**batch).logits
        ours_other = model(**other).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours - ours_other).abs().max().item() > 1e-2  # the image matters, so the vision path is compared too


@pytest.mark.parametrize("num_images", [1, 2])
def test_hf_processor_matches_vlm_processor(exported, num_images):
    _, _, processor, folder, _ = exported
    images = [_image(3 + i) for i in range(num_images)]
    ours = processor([PROMPT], [images])
    hf_processor = AutoProcessor.from_pretrained(folder, backend="pil", trust_remote_code=False)
    text = hf_processor.apply_chat_template(_hf_messages(num_images), add_generation_prompt=True)
    theirs = hf_processor(images=images, text=text, return_tensors="pt")
    assert theirs["input_ids"].tolist() == ours["input_ids"].tolist()
    assert torch.equal(theirs["pixel_values"], ours["pixel_values"])
    # transformers' default (torchvision) backend resizes slightly differently: within about one grey level.
    fast = AutoProcessor.from_pretrained(folder, trust_remote_code=False)(images=images, text=text, return_tensors="pt")
    assert fast["input_ids"].tolist() == ours["input_ids"].tolist()
    assert (fast["pixel_values"] - ours["pixel_values"]).abs().max().item() < 0.02


def test_export_greedy_generation_matches(exported, hf_model):
    _, model, processor, folder, _ = exported
    hf, _ = hf_model
    image = _image(5)
    ours = processor([PROMPT], [[image]])
    new = model.generate(
        ours["input_ids"], ours["attention_mask"], ours["pixel_values"], GenerationOptions(max_new_tokens=8)
    )
    hf_processor = AutoProcessor.from_pretrained(folder, backend="pil", trust_remote_code=False)
    text = hf_processor.apply_chat_template(_hf_messages(1), add_generation_prompt=True)
    inputs = hf_processor(images=[image], text=text, return_tensors="pt")
    theirs = hf.generate(**inputs, max_new_tokens=8, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    assert theirs.tolist() == new.tolist()
    assert len(set(new[0].tolist())) > 1  # a degenerate repeat of one token would prove little


def test_pipeline_runs_and_agrees(exported):
    _, model, processor, folder, _ = exported
    image = _image(6)
    pipe = pipeline(
        "image-text-to-text",
        model=str(folder),
        trust_remote_code=False,
        processor=AutoProcessor.from_pretrained(folder, backend="pil", trust_remote_code=False),
    )
    out = pipe(text=_hf_messages(1, image=image), max_new_tokens=6, do_sample=False)
    answer = out[0]["generated_text"][-1]
    assert answer["role"] == "assistant" and isinstance(answer["content"], str)
    batch = processor([PROMPT], [[image]])
    new = model.generate(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], GenerationOptions(max_new_tokens=6)
    )
    assert answer["content"].strip() == processor.decode(new[0])


def test_import_round_trip(exported, tmp_path):
    _, model, processor, folder, _ = exported
    import_hf(str(folder), str(tmp_path / "back"))
    back, back_processor = load(tmp_path / "back")
    assert back_processor.chat_template == processor.chat_template
    assert back_processor.stop_token_ids == processor.stop_token_ids
    images = [_image(7), _image(8)]
    ours = processor([PROMPT, "Hi"], [images[:1], images[1:]])
    again = back_processor([PROMPT, "Hi"], [images[:1], images[1:]])
    assert again["input_ids"].tolist() == ours["input_ids"].tolist()
    assert torch.equal(again["pixel_values"], ours["pixel_values"])
    with torch.no_grad():
        diff = (back(**again).logits - model(**ours).logits).abs().max().item()
    assert diff <= 1e-4


def test_images_after_text_survives_export_and_import(tmp_path):
    model, processor = _build("siglip")
    model.config.images_after_text = processor.images_after_text = True
    save_checkpoint(model, tmp_path / "vlm", processor)
    export_hf(str(tmp_path / "vlm"), str(tmp_path / "hf"))
    hf_processor = AutoProcessor.from_pretrained(tmp_path / "hf", backend="pil", trust_remote_code=False)
    text = hf_processor.apply_chat_template(_hf_messages(1), add_generation_prompt=True)
    assert text.index(PROMPT) < text.index("<image>")  # transformers lays the prompt out as vlm does
    ours = processor([PROMPT], [[_image(3)]])
    assert hf_processor(images=[_image(3)], text=text, return_tensors="pt")["input_ids"].tolist() == (
        ours["input_ids"].tolist()
    )
    import_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
    back, back_processor = load(tmp_path / "back")
    assert back.config.images_after_text and back_processor.images_after_text
    assert back_processor([PROMPT], [[_image(3)]])["input_ids"].tolist() == ours["input_ids"].tolist()


def _foreign_llava(folder, bos: bool, vocab_pad: int = 13):
    """A LLaVA folder as transformers writes it: CLIP tower (feature layer -2, class token dropped), untied head,
    a vocabulary padded past the tokenizer, a center-crop image processor and a list-content chat template;
    with `bos`, a tokenizer that adds a BOS token (as LLaVA-1.5's does) which the template does not write."""
    tokenizer = load_tokenizer(TINY_TOKENIZER)
    if bos:
        tokenizer.bos_token = "<|endoftext|>"
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tokenizer.bos_token_id)]
        )
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8
    )
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=len(tokenizer) + vocab_pad,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id, vision_feature_layer=-2
    )
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(config)
    _spread_weights(hf, 1)
    hf.save_pretrained(folder)
    template = (
        "{% for message in messages %}{{ message['role'].upper() + ': ' }}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
        "{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=template,
        num_additional_image_tokens=1,
    ).save_pretrained(folder)
    return hf.eval(), len(tokenizer)


@pytest.mark.parametrize("bos", [False, True])
def test_import_foreign_llava_folder(tmp_path, bos):
    hf, vocab = _foreign_llava(tmp_path / "llava", bos)
    import_hf(str(tmp_path / "llava"), str(tmp_path / "vlm"))
    model, processor = load(tmp_path / "vlm")
    # Feature layer -2 of 3 blocks: vlm keeps 2; the class token is dropped as LLaVA's "default" does.
    assert len(model.encoder.model.blocks) == 2 and not model.encoder.keep_prefix_tokens
    image = _image(9, (32, 32))  # square: LLaVA's crop and vlm's resize agree
    hf_processor = AutoProcessor.from_pretrained(tmp_path / "llava", backend="pil", trust_remote_code=False)
    text = hf_processor.apply_chat_template(_hf_messages(1), add_generation_prompt=True)
    theirs = hf_processor(images=[image], text=text, return_tensors="pt")
    ours = processor([PROMPT], [[image]])
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()  # the wrapped chat template renders alike
    assert (ours["input_ids"][0, 0].item() == hf_processor.tokenizer.bos_token_id) == bos
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    with torch.no_grad():
        diff = (model(**ours).logits - hf(**theirs).logits[..., :vocab]).abs().max().item()
    assert diff <= 1e-4


def test_small_presets_export_or_say_why_not(tmp_path):
    model, processor = build(VLMConfig.from_name("tiny"))
    save_checkpoint(model, tmp_path / "tiny", processor)
    export_hf(str(tmp_path / "tiny"), str(tmp_path / "tiny-hf"))
    assert (tmp_path / "tiny-hf" / "config.json").is_file()
    # The from-scratch presets have what LLaVA has not: a projector output norm and a convolutional stem.
    for name in ("scratch", "shapes"):
        model, processor = build(VLMConfig.from_name(name))
        save_checkpoint(model, tmp_path / name, processor)
        with pytest.raises(VLMError, match="projector with an output norm"):
            export_hf(str(tmp_path / name), str(tmp_path / f"{name}-hf"))
    config = VLMConfig.from_name("shapes")
    config.projector.output_norm = False
    model, processor = build(config)
    save_checkpoint(model, tmp_path / "stem", processor)
    with pytest.raises(VLMError, match="convolutional stem"):
        export_hf(str(tmp_path / "stem"), str(tmp_path / "stem-hf"))


def test_export_refuses_unmappable_models(tmp_path):
    config = VLMConfig.from_name("tiny")
    config.encoder.name = "vit_tiny_patch16_224"  # a class token but no pre-norm: neither CLIP nor SigLIP
    model, processor = build(config)
    save_checkpoint(model, tmp_path / "vit", processor)
    with pytest.raises(VLMError, match="cannot map encoder 'vit_tiny_patch16_224'.*class token and a pre-norm"):
        export_hf(str(tmp_path / "vit"), str(tmp_path / "out"))

    config.encoder.name, config.encoder.overrides = "resnet10t", {}
    model, processor = build(config)
    save_checkpoint(model, tmp_path / "cnn", processor)
    with pytest.raises(VLMError, match="ResNet, not a plain timm VisionTransformer"):
        export_hf(str(tmp_path / "cnn"), str(tmp_path / "out"))

    config = VLMConfig.from_name("tiny")
    config.encoder.name, config.encoder.overrides = VARIANTS["siglip"][0], dict(TOWER)
    config.projector.kind = "pixel_shuffle"
    model, processor = build(config)
    save_checkpoint(model, tmp_path / "shuffle", processor)
    with pytest.raises(VLMError, match="mlp projector only.*pixel_shuffle"):
        export_hf(str(tmp_path / "shuffle"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_export_other_decoder_families(tmp_path):
    # GPT-2: its tied table is `wte`, which transformers' LLaVA cannot re-tie by name, so the head is written out.
    config = VLMConfig.from_name("tiny")
    config.encoder.name, config.encoder.overrides = VARIANTS["clip"][0], dict(TOWER)
    config.decoder.hf_config = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 256}
    model, processor = build(config)
    _spread_weights(model, 0)
    save_checkpoint(model.eval(), tmp_path / "gpt2", processor)
    export_hf(str(tmp_path / "gpt2"), str(tmp_path / "gpt2-hf"))
    hf, info = LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "gpt2-hf", output_loading_info=True, trust_remote_code=False
    )
    assert not any(info.values())
    batch = processor([PROMPT], [[_image(1)]])
    with torch.no_grad():
        assert (model(**batch).logits - hf.eval()(**batch).logits).abs().max().item() <= 1e-4
    # GPT-J's lm_head has a bias, LLaVA's cannot.
    config.decoder.hf_config = {"model_type": "gptj", "n_embd": 64, "n_layer": 2, "n_head": 2, "rotary_dim": 16}
    model, processor = build(config)
    save_checkpoint(model, tmp_path / "gptj", processor)
    with pytest.raises(VLMError, match="lm_head has a bias"):
        export_hf(str(tmp_path / "gptj"), str(tmp_path / "gptj-hf"))


def test_export_and_import_refuse_bad_folders(exported, tmp_path):
    _, _, _, folder, vlm_folder = exported
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(VLMError, match="already exists and is not empty"):
        export_hf(str(vlm_folder), str(tmp_path / "full"))
    with pytest.raises(VLMError, match="not a vlm checkpoint folder"):
        export_hf(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(VLMError, match="cannot read a transformers config"):
        import_hf(str(vlm_folder), str(tmp_path / "out"))
    with pytest.raises(VLMError, match="not a LLaVA folder or hub id"):
        import_hf(str(tmp_path / "missing" / "dir"), str(tmp_path / "out"))
