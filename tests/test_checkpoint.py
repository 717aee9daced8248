"""Tests for checkpoint folders (vlm/checkpoint.py) and the configs they hold (vlm/config.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_same_weights, build_tiny, tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vlm.checkpoint as checkpoint
from vlm.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load,
    load_model,
    open_model,
    resolve_device,
    resolve_dtype,
    save_checkpoint,
)
from vlm.config import PRESETS, VLMConfig
from vlm.errors import VLMError
from vlm.generation import GenerationOptions, generate_texts
from vlm.processor import PROCESSOR_FILE

PROMPTS = ["<image>\nWhat colour is it?", "<image><image> which one?", "hello"]


def _images(pil_images):
    return [pil_images[:1], pil_images[1:3], []]


def _answers(model, processor, pil_images):
    return generate_texts(model, processor, PROMPTS, _images(pil_images), GenerationOptions(max_new_tokens=6))


@pytest.mark.parametrize(("family", "projector"), [("llama", "mlp"), ("gpt2", "pixel_shuffle")])
def test_save_load_round_trip_is_bit_exact(family, projector, tmp_path, pil_images):
    model, processor = build_tiny(tiny_config(family, projector=projector))
    save_checkpoint(model, tmp_path / "ckpt", processor)
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {CONFIG_FILE, WEIGHTS_FILE, PROCESSOR_FILE, "tokenizer.json", "tokenizer_config.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".pth"))]  # no pickle
    loaded, loaded_processor = load(tmp_path / "ckpt")
    assert not loaded.training
    assert_same_weights(model, loaded)
    assert loaded.config == model.config
    assert loaded.num_image_tokens == model.num_image_tokens
    assert loaded_processor.encode([{"role": "user", "content": "<image> hi"}], 1) == processor.encode(
        [{"role": "user", "content": "<image> hi"}], 1
    )
    assert _answers(loaded, loaded_processor, pil_images) == _answers(model, processor, pil_images)


def test_saved_config_needs_no_hub_and_no_pretrained_weights(tmp_path):
    config = tiny_config()
    config.encoder.pretrained = True  # would need the hub if loading honoured it
    model, processor = build_tiny(config, scrambled=False)
    model.config.decoder.pretrained = True
    model.config.decoder.name_or_path = "some-org/not-on-this-machine"
    checkpoint.save_checkpoint(model, tmp_path / "ckpt", processor)
    saved = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert saved["format_version"] == 1
    assert saved["encoder"]["pretrained"] is False and saved["decoder"]["pretrained"] is False
    assert saved["decoder"]["hf_config"]["model_type"] == "llama"
    assert model.config.decoder.pretrained is True  # the model's own config is left alone
    assert_same_weights(load_model(tmp_path / "ckpt"), model)


def test_overwrite_keeps_other_files_and_replaces_weights(tmp_path):
    first, processor = build_tiny(seed=0)
    second, _ = build_tiny(seed=1)
    out = tmp_path / "ckpt"
    checkpoint.save_checkpoint(first, out, processor)
    (out / "README.md").write_text("model card")
    checkpoint.save_checkpoint(second, out, processor)
    assert (out / "README.md").read_text() == "model card"
    assert_same_weights(load_model(out), second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or old folders left


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    first, processor = build_tiny(seed=0)
    second, _ = build_tiny(seed=1)
    out = tmp_path / "ckpt"
    checkpoint.save_checkpoint(first, out, processor)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_save = checkpoint.save_safetensors

    def save_then_fail(model, filename, *args, **kwargs):
        real_save(model, filename, *args, **kwargs)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])  # half-written
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_safetensors", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(second, out, processor)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert_same_weights(load_model(out), first)
    with pytest.raises(OSError):  # a first save that fails leaves nothing behind
        checkpoint.save_checkpoint(second, tmp_path / "new", processor)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_saved_without_a_processor(tmp_path, pil_images):
    model, processor = build_tiny()
    save_checkpoint(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / PROCESSOR_FILE).exists()
    loaded, loaded_processor = load(tmp_path / "ckpt")
    assert_same_weights(loaded, model)
    assert _answers(loaded, loaded_processor, pil_images) == _answers(model, processor, pil_images)


def test_load_in_another_dtype(tmp_path, tiny, pil_images):
    model, processor = tiny
    save_checkpoint(model, tmp_path / "ckpt", processor)
    half, half_processor = load(tmp_path / "ckpt", "cpu", torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    answers = generate_texts(half, half_processor, PROMPTS, _images(pil_images), GenerationOptions(max_new_tokens=3))
    assert len(answers) == 3


def test_bad_checkpoint_folders(tmp_path, tiny):
    model, processor = tiny
    with pytest.raises(VLMError, match="not a vlm checkpoint folder"):
        load(tmp_path / "missing")
    good = tmp_path / "good"
    save_checkpoint(model, good, processor)
    config = json.loads((good / CONFIG_FILE).read_text())

    def broken(name: str, edit) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for f in good.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        edit(folder)
        return folder

    cases = [
        ("truncated", lambda f: (f / WEIGHTS_FILE).write_bytes((good / WEIGHTS_FILE).read_bytes()[:1000]), "corrupt"),
        ("bad-json", lambda f: (f / CONFIG_FILE).write_text("{not json"), "bad JSON"),
        ("unknown-key", lambda f: (f / CONFIG_FILE).write_text(json.dumps({**config, "colour": 1})), "unknown config"),
        (
            "unknown-nested-key",
            lambda f: (f / CONFIG_FILE).write_text(json.dumps({**config, "encoder": {"nme": "vit"}})),
            "bad config",
        ),
        (
            "other-projector",
            lambda f: (f / CONFIG_FILE).write_text(json.dumps({**config, "projector": {"kind": "pixel_shuffle"}})),
            "does not match its config",
        ),
        (
            "other-width",
            lambda f: (f / CONFIG_FILE).write_text(
                json.dumps(
                    {
                        **config,
                        "encoder": {
                            **config["encoder"],
                            "overrides": {**config["encoder"]["overrides"], "embed_dim": 32},
                        },
                    }
                )
            ),
            "does not match its config",
        ),
    ]
    for name, edit, message in cases:
        with pytest.raises(VLMError, match=message):
            load(broken(name, edit))


def test_init_writes_a_loadable_deterministic_checkpoint(tiny_checkpoint, tmp_path):
    from vlm.commands import init

    init(str(tmp_path / "again"), preset="tiny", seed=0)
    assert_same_weights(load_model(tmp_path / "again"), load_model(tiny_checkpoint))
    init(str(tmp_path / "other"), preset="tiny", seed=1)
    a, b = load_model(tmp_path / "other").state_dict(), load_model(tiny_checkpoint).state_dict()
    assert not torch.equal(a["projector.linear_1.weight"], b["projector.linear_1.weight"])


def test_open_model_default_and_devices(monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoint, "DEFAULT_MODEL_DIR", tmp_path / "shapes-model")
    with pytest.raises(VLMError, match="no default model") as err:
        open_model(None)
    assert err.value.exit_code == 1
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(VLMError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(VLMError, match="no CUDA GPU found"):
            resolve_device("cuda")
    gpus = torch.cuda.device_count()
    if gpus:
        assert resolve_device(f"cuda:{gpus - 1}") == torch.device(f"cuda:{gpus - 1}")
    for name in ("tpu", f"cuda:{gpus}"):
        with pytest.raises(VLMError, match=f"device must be auto or a device of this machine .cpu.*got '{name}'"):
            resolve_device(name)


def test_config_round_trip_and_presets(tmp_path):
    for name in PRESETS:
        config = VLMConfig.from_name(name)
        assert VLMConfig.from_dict(config.to_dict()) == config
    config = tiny_config("gptj", encoder="vit_base_patch16_siglip_224", projector="pixel_shuffle")
    config.save(tmp_path / "config.json")
    assert VLMConfig.load(tmp_path / "config.json") == config
    first = VLMConfig.from_name("tiny")
    first.encoder.overrides["depth"] = 9
    assert VLMConfig.from_name("tiny").encoder.overrides["depth"] == 2  # presets hand out copies
    with pytest.raises(VLMError, match="unknown preset 'huge'"):
        VLMConfig.from_name("huge")


# ---- property: whatever config.json holds, loading gives a model or one VLMError -----------------------------------

_JSON_VALUES = st.none() | st.booleans() | st.integers(-3, 70) | st.floats(-2, 2) | st.text(max_size=12)
_JSON_VALUES = _JSON_VALUES | st.lists(st.integers(-2, 9), max_size=3) | st.dictionaries(st.text(max_size=4), st.none())


def _leaves(obj: dict, path: tuple = ()) -> list[tuple]:
    """The key paths of a config's values (the leaves, and the parts and dicts themselves)."""
    out = []
    for key, value in obj.items():
        out.append((*path, key))
        if isinstance(value, dict):
            out += _leaves(value, (*path, key))
    return out


def _load_or_vlm_error(folder: Path) -> None:
    try:
        load(folder)
    except VLMError as e:
        assert "\n" not in str(e) and e.exit_code == 2


@pytest.fixture(scope="module")
def fuzz_folder(tiny_checkpoint, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the tiny checkpoint whose config.json the tests rewrite, and its original config."""
    folder = tmp_path_factory.mktemp("fuzz") / "model"
    shutil.copytree(tiny_checkpoint, folder)
    return folder, json.loads((folder / CONFIG_FILE).read_text())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=200) | st.sampled_from([b"{}", b"[]", b"null", b"\xef\xbb\xbf{", b"[" * 5000]))
def test_any_bytes_as_config_load_a_model_or_fail_in_one_line(fuzz_folder, content):
    folder, _ = fuzz_folder
    (folder / CONFIG_FILE).write_bytes(content)
    _load_or_vlm_error(folder)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_value_in_any_config_field_loads_a_model_or_fails_in_one_line(fuzz_folder, data):
    folder, config = fuzz_folder
    path = data.draw(st.sampled_from(_leaves(config)))
    changed = json.loads(json.dumps(config))
    parent = changed
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = data.draw(_JSON_VALUES)
    (folder / CONFIG_FILE).write_text(json.dumps(changed))
    _load_or_vlm_error(folder)
