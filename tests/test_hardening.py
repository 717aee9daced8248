"""Bad and hostile inputs end in one line naming the file, field or option (issues #27 and #28): model-folder files
with wrong types or absurd sizes, weight indexes that point outside their folder, tokenizer, processor and chat
template files that cannot be used, bad training inputs, and checkpoints left behind by a killed run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vlm.checkpoint import load
from vlm.config import CONFIG_FILE
from vlm.errors import VLMError


def _edited_copy(src: Path, dst: Path, name: str, edit) -> Path:
    """A copy of the folder `src` at `dst` whose JSON file `name` went through `edit` (a function of the parsed
    document that changes it in place or returns a new one)."""
    shutil.copytree(src, dst)
    doc = json.loads((dst / name).read_text())
    doc = edit(doc) or doc
    (dst / name).write_text(json.dumps(doc))
    return dst


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["encoder"].update(name=5), "encoder.name must be a string, got 5"),
        (lambda c: c["encoder"].update(overrides="big"), 'encoder.overrides must be an object, got "big"'),
        (lambda c: c["decoder"]["hf_config"].update(hidden_size="sixty-four"), "hidden_size.* expected int, got str"),
        (lambda c: c["decoder"].update(hf_config=[1, 2]), r"decoder.hf_config must be an object, got \[1, 2\]"),
        (lambda c: c.update(image_token=7), "image_token must be a string, got 7"),
        (lambda c: c["encoder"].update(feature_layer=True), "encoder.feature_layer must be an integer, got true"),
        (lambda c: c["projector"].update(kind="conv"), 'projector.kind must be one of "mlp", "pixel_shuffle"'),
        (lambda c: c.update(projector="mlp"), 'projector must be an object, got "mlp"'),
    ],
)
def test_config_field_of_the_wrong_type_is_one_line_naming_file_and_field(tiny_checkpoint, tmp_path, edit, message):
    folder = _edited_copy(tiny_checkpoint, tmp_path / "m", CONFIG_FILE, edit)
    with pytest.raises(VLMError, match=message) as err:
        load(folder)
    assert str(folder / CONFIG_FILE) in str(err.value) and "\n" not in str(err.value)


def test_config_too_big_for_memory_is_refused_before_allocating(tiny_checkpoint, tmp_path, monkeypatch):
    # A ViT 65536 wide: 412B parameters, 1.6 TB. Built for real it dies in the allocator (or the OOM killer).
    huge = _edited_copy(
        tiny_checkpoint, tmp_path / "huge", CONFIG_FILE,
        lambda c: c["encoder"]["overrides"].update(embed_dim=65536, depth=8, num_heads=64),
    )  # fmt: skip
    with pytest.raises(VLMError, match=r"the model .*huge/config.json describes needs 1649.4 GB \(412.34B param"):
        load(huge)
    # The tiny model (0.26M parameters, 1.0 MB) is judged against the memory free on this machine.
    import psutil

    class Free:
        available = 1_000_000

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Free)
    with pytest.raises(VLMError, match=r"needs 1.0 MB \(0.26M parameters\), more than the 1.0 MB of memory free"):
        load(tiny_checkpoint)
    Free.available = 2_000_000
    load(tiny_checkpoint)


@pytest.fixture(scope="module")
def llava_folder(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint as a transformers LLaVA folder (what `vlm import-hf` reads)."""
    from vlm.llava import export_hf

    folder = tmp_path_factory.mktemp("llava") / "hf"
    export_hf(str(tiny_checkpoint), str(folder))
    return folder


def _sharded(llava_folder: Path, dst: Path, file_name: str) -> Path:
    """A copy of the LLaVA folder whose weights an index maps, every one, to `file_name`."""
    from safetensors import safe_open

    shutil.copytree(llava_folder, dst)
    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())  # noqa: SIM118 - safe_open is not a dict
    (dst / "model.safetensors").rename(dst / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {k: file_name for k in keys}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_import_hf_reads_weights_only_inside_the_model_folder(llava_folder, tmp_path):
    from vlm.llava import import_hf

    # A valid shard, as the index names it: the import works.
    import_hf(str(_sharded(llava_folder, tmp_path / "ok", "model-00001-of-00001.safetensors")), str(tmp_path / "out"))
    assert load(tmp_path / "out")[0] is not None
    # The same weights, readable, beside the folder, behind `..`, an absolute path and a link: never read.
    outside = tmp_path / "outside.safetensors"
    shutil.copy(tmp_path / "ok" / "model-00001-of-00001.safetensors", outside)
    cases = {
        "dotdot": "../outside.safetensors",
        "absolute": str(outside),
        "link": "shard.safetensors",
        "missing": "model-00002-of-00002.safetensors",
    }
    for case, name in cases.items():
        folder = _sharded(llava_folder, tmp_path / case, name)
        if case == "link":
            (folder / name).symlink_to(outside)
        expected = "weight file not found" if case == "missing" else "outside the model folder"
        with pytest.raises(VLMError, match=f"weight index {folder}/model.safetensors.index.json names .*{expected}"):
            import_hf(str(folder), str(tmp_path / f"out-{case}"))
        assert not (tmp_path / f"out-{case}").exists()


@pytest.mark.parametrize(
    "name, edit, message",
    [
        ("tokenizer_config.json", lambda c: [c], "bad tokenizer file {file}: not a JSON object"),
        ("processor_config.json", lambda c: c.pop("num_image_tokens") and None, "{file}: num_image_tokens is missing"),
        ("processor_config.json", lambda c: c["transform"].pop("size") and None, "{file}: transform.size is missing"),
        (
            "processor_config.json",
            lambda c: c.update(caption_prompt=["Describe."]),
            '{file}: caption_prompt must be a string, got ["Describe."]',
        ),
        (
            "processor_config.json",  # jinja's sandbox refuses it: reaching Python internals from a template
            lambda c: c.update(chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}"),
            "{file}: chat_template: the chat template cannot be used (SecurityError: access to attribute '__class__'",
        ),
        (
            "processor_config.json",
            lambda c: c.update(chat_template="{% for m in messages %}{{ m.content }"),
            "{file}: chat_template: the chat template cannot be used (TemplateSyntaxError: unexpected '}'",
        ),
    ],
)
def test_tokenizer_and_processor_files_that_cannot_be_used_are_one_line(tiny_checkpoint, tmp_path, name, edit, message):
    folder = _edited_copy(tiny_checkpoint, tmp_path / "m", name, edit)
    with pytest.raises(VLMError) as err:
        load(folder)
    assert str(err.value).startswith(message.replace("{file}", str(folder / name)))
    assert "\n" not in str(err.value)
