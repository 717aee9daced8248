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
