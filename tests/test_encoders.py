"""Tests for the timm encoder registry (encoders/registry.py)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn
from vlm.encoders import ImageEncoder, create_encoder, list_encoders, register_encoder
from vlm.encoders.registry import _REGISTRY

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}
# (timm name, prefix tokens: class + distillation/register tokens)
VITS = [
    ("vit_tiny_patch16_224", 1),
    ("vit_base_patch16_clip_224", 1),  # has a pre-norm
    ("vit_base_patch16_siglip_224", 0),  # no class token, attention-pool head
    ("deit_tiny_distilled_patch16_224", 2),
    ("vit_small_patch16_224.dino", 1),  # a pretrained tag in the name
    ("vit_small_patch14_reg4_dinov2", 5),  # four register tokens
]


@pytest.mark.parametrize("keep_prefix", [False, True])
@pytest.mark.parametrize(("name", "num_prefix"), VITS)
def test_vit_token_counts_match_forward(name, num_prefix, keep_prefix):
    enc = create_encoder(name, keep_prefix_tokens=keep_prefix, **SMALL)
    assert enc.grid_size == (4, 4)
    assert enc.num_features == 32
    assert enc.num_prefix_tokens == num_prefix
    assert enc.num_tokens == 16 + (num_prefix if keep_prefix else 0)
    out = enc(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, enc.num_tokens, enc.num_features)
    assert enc.data_config["input_size"] == (3, 32, 32)


@pytest.mark.parametrize(("img_size", "patch_size", "grid"), [(48, 8, (6, 6)), ((32, 64), 16, (2, 4))])
def test_grid_follows_image_and_patch_size(img_size, patch_size, grid):
    enc = create_encoder(
        "vit_tiny_patch16_224", img_size=img_size, patch_size=patch_size, embed_dim=32, depth=1, num_heads=2
    )
    assert enc.grid_size == grid
    assert enc.num_tokens == grid[0] * grid[1]
    h, w = enc.data_config["input_size"][1:]
    assert enc(torch.randn(1, 3, h, w)).shape == (1, grid[0] * grid[1], 32)


def _manual_hidden_states(model: nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
    """hidden_states[k] the LLaVA way: 0 = embeddings (after any pre-norm), k = block k-1's output; no final norm."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(pixels)))
    states = [x]
    for block in model.blocks:
        x = block(x)
        states.append(x)
    return states


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_base_patch16_clip_224", "vit_small_patch14_reg4_dinov2"])
@pytest.mark.parametrize("feature_layer", [-1, -2, 1, 3])
def test_features_are_the_chosen_blocks_output_without_final_norm(name, feature_layer):
    torch.manual_seed(0)
    full = timm.create_model(name, num_classes=0, **SMALL).eval()
    reference = copy.deepcopy(full)
    enc = ImageEncoder(full, feature_layer=feature_layer, keep_prefix_tokens=True).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = _manual_hidden_states(reference, pixels)[feature_layer]
        got = enc(pixels)
    torch.testing.assert_close(got, expected)
    # Blocks after the feature layer are gone, and so is the final norm.
    kept = 3 + feature_layer + 1 if feature_layer < 0 else feature_layer
    assert len(enc.model.blocks) == kept
    assert isinstance(enc.model.norm, nn.Identity)


def test_prefix_tokens_come_first_and_patches_are_the_same():
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, **SMALL).eval()
    with_prefix = ImageEncoder(copy.deepcopy(model), keep_prefix_tokens=True).eval()
    without = ImageEncoder(model, keep_prefix_tokens=False).eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a, b = with_prefix(pixels), without(pixels)
    torch.testing.assert_close(a[:, 5:], b)


@pytest.mark.parametrize("feature_layer", [0, 4, -4])
def test_feature_layer_out_of_range(feature_layer):
    with pytest.raises(ValueError, match="feature_layer"):
        create_encoder("vit_tiny_patch16_224", feature_layer=feature_layer, **SMALL)


def test_keep_prefix_tokens_is_a_no_op_without_prefix_tokens():
    enc = create_encoder("vit_base_patch16_siglip_224", keep_prefix_tokens=True, **SMALL)
    assert not enc.keep_prefix_tokens
    assert enc.num_tokens == 16


def test_data_config_comes_from_the_model():
    clip = create_encoder("vit_base_patch16_clip_224", **SMALL)
    assert clip.data_config["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    deit = create_encoder("deit_tiny_patch16_224", **{**SMALL, "img_size": 48})
    assert deit.data_config["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert deit.data_config["input_size"] == (3, 48, 48)
    assert set(deit.data_config) == {"input_size", "mean", "std", "interpolation"}


def test_unknown_name_and_bad_override():
    with pytest.raises(ValueError, match="unknown encoder 'no_such_vit'"):
        create_encoder("no_such_vit")
    with pytest.raises(ValueError, match="bad encoder override"):
        create_encoder("vit_tiny_patch16_224", no_such_argument=3)


def test_weights_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=0, **SMALL)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    torch.manual_seed(2)  # a different random init: only the file can make them equal
    enc = create_encoder("vit_tiny_patch16_224", weights=tmp_path / "vit.safetensors", **SMALL)
    for name, param in enc.model.state_dict().items():
        assert torch.equal(param, source.state_dict()[name]), name
    with pytest.raises(ValueError, match="not found"):
        create_encoder("vit_tiny_patch16_224", weights=tmp_path / "missing.safetensors", **SMALL)


def test_pos_embed_std_redraws_a_from_scratch_vits_position_embedding(tmp_path):
    big = {**SMALL, "img_size": 64}  # 64 positions: enough to measure a std
    torch.manual_seed(0)
    default = create_encoder("vit_base_patch16_siglip_224", **big).model.pos_embed
    torch.manual_seed(0)
    wide = create_encoder("vit_base_patch16_siglip_224", pos_embed_std=0.5, **big).model.pos_embed
    assert default.std().item() < 0.03
    assert 0.35 < wide.std().item() < 0.5  # drawn from a normal of std 0.5 truncated at 2 std
    assert wide.abs().max().item() <= 1.0
    save_file({"x": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="only for an encoder started from scratch"):
        create_encoder("vit_tiny_patch16_224", pos_embed_std=0.5, weights=tmp_path / "w.safetensors", **SMALL)
    with pytest.raises(ValueError, match="learned position embedding"):
        create_encoder("vit_tiny_patch16_224", pos_embed_std=0.5, pos_embed="none", **SMALL)


def test_registered_encoders_take_precedence():
    calls = []

    @register_encoder
    def vit_tiny_patch16_224(pretrained: bool = False, **kwargs):  # shadows timm's name
        calls.append((pretrained, kwargs))
        return timm.create_model("vit_tiny_patch16_224", **{**kwargs, **SMALL, "depth": 1})

    try:
        enc = create_encoder("vit_tiny_patch16_224", embed_dim=48)
        assert calls == [(False, {"num_classes": 0, "embed_dim": 48})]
        assert len(enc.model.blocks) == 1 and enc.num_features == 32
        assert "vit_tiny_patch16_224" in list_encoders()[: len(_REGISTRY)]  # registered names come first
        assert "vit_tiny_patch16_224" in list_encoders("vit_tiny*")
    finally:
        del _REGISTRY["vit_tiny_patch16_224"]


def test_non_vit_encoder_uses_stage_features():
    enc = create_encoder("convnext_atto", feature_layer=-2)
    assert enc.grid_size == (14, 14) and enc.num_features == 160
    out = enc(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 196, 160)


@pytest.mark.parametrize(("img_size", "patch_size", "grid"), [(75, 16, (5, 5)), (64, 16, (4, 4)), (33, 8, (5, 5))])
def test_convstem_grid_is_the_ceiling_of_size_over_patch(img_size, patch_size, grid):
    enc = create_encoder("vit_convstem", img_size=img_size, patch_size=patch_size, embed_dim=32, depth=1, num_heads=2)
    assert enc.grid_size == grid and enc.num_tokens == grid[0] * grid[1]
    assert enc.data_config["input_size"] == (3, img_size, img_size)
    assert enc(torch.randn(2, 3, img_size, img_size)).shape == (2, grid[0] * grid[1], 32)
    # log2(patch) stride-2 convolutions, then the 1x1 projection to the embedding width
    convs = [m for m in enc.model.patch_embed.proj if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * (patch_size.bit_length() - 1) + [(1, 1)]


def test_convstem_trains_its_stem_and_refuses_what_it_cannot_be():
    enc = create_encoder("vit_convstem", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    enc(torch.randn(4, 3, 32, 32)).pow(2).mean().backward()
    first = enc.model.patch_embed.proj[0]
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="power-of-two"):
        create_encoder("vit_convstem", img_size=30, patch_size=10, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="no published weights"):
        create_encoder("vit_convstem", pretrained=True, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    assert "vit_convstem" in list_encoders()
