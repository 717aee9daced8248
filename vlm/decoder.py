"""Decoder language models and tokenizers from transformers: hub ids, local folders, GGUF files or configs.

A source is a hub id, a local transformers folder, a `.gguf` file, or `package:<pkg>/<file>`: a file inside an
installed Python package, found without importing the package. A GGUF file is converted once (dequantized
weights + tokenizer) into a transformers folder under the cache (`$VLM_CACHE`, else `~/.cache/vlm`), and every
later load reads that folder, which is much faster than parsing the GGUF again.

vlm never runs code that comes with a model: every transformers load passes `trust_remote_code=False`, and a local
folder that asks for its own code is refused before transformers reads it (`refuse_remote_code`).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

from vlm.config import DecoderConfig
from vlm.errors import VLMError
from vlm.files import atomic_folder, read_json

PACKAGE_PREFIX = "package:"
# The files of a model folder where transformers finds `auto_map`, its pointer to Python files shipped in the folder.
# The JSON files of a tokenizer folder that transformers reads as objects (settings, vocabulary, special tokens).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json")
CODE_POINTER_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")


def cache_root() -> Path:
    """Where converted files live: `$VLM_CACHE`, else `~/.cache/vlm`."""
    return Path(os.environ.get("VLM_CACHE") or Path.home() / ".cache" / "vlm")


def package_file(source: str) -> Path:
    """The file (or folder) a `package:<pkg>/<relative path>` source names, located without importing the package."""
    rest = source[len(PACKAGE_PREFIX) :]
    package, _, relative = rest.partition("/")
    if not package or not relative or "." in package:
        raise VLMError(f"bad package path {source!r}: write package:<top-level package>/<file inside it>")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise VLMError(f"package {package!r} is not installed (needed for {source!r})")
    if spec.submodule_search_locations:
        roots = [Path(p) for p in spec.submodule_search_locations]
    elif spec.origin:
        roots = [Path(spec.origin).parent]
    else:
        roots = []
    for root in roots:
        if (root / relative).exists():
            return root / relative
    raise VLMError(f"no file or folder {relative!r} in package {package!r} (looked in {', '.join(map(str, roots))})")


def gguf_folder(path: str | Path) -> Path:
    """The transformers folder converted from a GGUF file: converted on first use, then reused.

    The cache entry is named after the file's name, size and modification time, so an edited file is
    converted again. It is written to a temporary sibling and renamed into place, so an interrupted
    conversion never leaves a half-written entry behind.
    """
    path = Path(path)
    if not path.is_file():
        raise VLMError(f"GGUF file not found: {path}")
    stat = path.stat()
    target = cache_root() / "gguf" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if target.is_dir():
        return target
    with atomic_folder(target, exist_ok=True) as tmp:  # another process converting it first is fine
        _convert_gguf(path, tmp)
    return target


def _convert_gguf(path: Path, out: Path) -> None:
    """Dequantizes a GGUF file into a transformers folder (config, model.safetensors, tokenizer)."""
    kwargs = {"gguf_file": path.name, "trust_remote_code": False}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), **kwargs)
    except (OSError, ValueError) as e:
        raise VLMError(f"cannot convert GGUF file {path}: {str(e).splitlines()[0]}") from e
    # The weights are dequantized now: the saved folder must not claim to be GGUF-quantized.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _remote_code_reason(name: str, settings: dict) -> str | None:
    """Why the settings of file `name` of a model folder need the folder's own code, or None."""
    if "auto_map" in settings:
        return f"auto_map in {name}"
    model_type = settings.get("model_type") if name == "config.json" else None
    if model_type is not None and model_type not in CONFIG_MAPPING:
        return f"model_type {model_type!r} in {name}, which transformers does not know"
    tokenizer_class = settings.get("tokenizer_class") if name == "tokenizer_config.json" else None
    if tokenizer_class is not None and tokenizer_class_from_name(tokenizer_class) is None:
        return f"tokenizer_class {tokenizer_class!r} in {name}, which transformers does not know"
    return None


def refuse_remote_code(folder: str | Path) -> None:
    """Raises `VLMError` for a model folder that asks to run its own code: an `auto_map` in its config files, or a
    model type or tokenizer class that transformers does not know (only code shipped with the folder could build it).
    """
    folder = Path(folder)
    for name in CODE_POINTER_FILES:
        try:
            settings = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested too deeply
            continue  # absent or unreadable: the loader that needs it says so
        reason = _remote_code_reason(name, settings) if isinstance(settings, dict) else None
        if reason is not None:
            raise VLMError(f"{folder} asks to run its own code ({reason}); vlm never runs code from a model folder")


def resolve_source(source: str) -> str:
    """What transformers' `from_pretrained` reads for a source: `package:` paths found, GGUF files converted, local
    folders checked by `refuse_remote_code`."""
    if source.startswith(PACKAGE_PREFIX):
        source = str(package_file(source))
    if source.endswith(".gguf"):
        return str(gguf_folder(source))
    if Path(source).is_dir():
        refuse_remote_code(source)
    return source


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """A tokenizer from a local folder, a GGUF file, a `package:` path or a hub id."""
    folder = resolve_source(source)
    for name in TOKENIZER_FILES if Path(folder).is_dir() else ():
        if (Path(folder) / name).is_file() and not isinstance(read_json(Path(folder) / name), dict):
            raise VLMError(f"bad tokenizer file {Path(folder) / name}: not a JSON object")
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except OSError as e:
        raise VLMError(f"cannot load a tokenizer from {source!r}: {str(e).splitlines()[0]}") from e
    except ValueError as e:  # a file that is not UTF-8 or not JSON: name it where the folder is local
        for path in sorted(Path(folder).glob("*.json")):
            read_json(path)
        raise VLMError(f"cannot load a tokenizer from {source!r}: {str(e).splitlines()[0]}") from e


def build_decoder(cfg: DecoderConfig, vocab_size: int) -> PreTrainedModel:
    """Loads pretrained weights when `cfg.pretrained`, else builds at random from `cfg.hf_config`.

    The embedding table is sized to `vocab_size` (the tokenizer with its added image token).
    """
    if cfg.pretrained:
        if not cfg.name_or_path:
            raise VLMError("decoder.pretrained needs decoder.name_or_path (a hub id, folder, .gguf or package: file)")
        try:
            model = AutoModelForCausalLM.from_pretrained(resolve_source(cfg.name_or_path), trust_remote_code=False)
        except OSError as e:
            raise VLMError(f"cannot load decoder {cfg.name_or_path!r}: {str(e).splitlines()[0]}") from e
    else:
        hf = dict(cfg.hf_config)
        if "auto_map" in hf:
            raise VLMError("decoder.hf_config asks to run its own code (auto_map); vlm never runs code from a model")
        if "model_type" not in hf:
            raise VLMError("decoder.hf_config needs a model_type (e.g. llama) to build a decoder from scratch")
        try:
            config = AutoConfig.for_model(hf.pop("model_type"), **{**hf, "vocab_size": vocab_size})
        except (ValueError, KeyError) as e:
            raise VLMError(f"bad decoder.hf_config: {e}") from e
        except StrictDataclassError as e:  # transformers' typed configs: "Validation error for field ...", then why
            reason = str(e).splitlines()[-1].strip().removeprefix("TypeError: ")
            raise VLMError(f"bad decoder.hf_config: {reason}") from None
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    if model.get_input_embeddings().num_embeddings != vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    return model


def context_length(model: PreTrainedModel) -> int | None:
    """The most positions the decoder can attend over, whatever the family calls it."""
    c = model.config
    return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)


# Decoder families whose layers end in these two projections (attention out, MLP out) and that keep their layers in
# `model.layers`: what `expand_layers` needs to make a new layer start as the identity.
EXPANDABLE_FAMILIES = ("llama", "qwen2")  # tests/test_model.py checks each


def expand_layers(model: PreTrainedModel, num_layers: int) -> list[int]:
    """Deepens a decoder to `num_layers` by block expansion (LLaMA Pro, Wu et al. 2024, arXiv:2401.02415).

    Each new layer is a copy of the layer below it with its attention output and MLP output projections zeroed, so
    its residual branches add nothing and the deeper model computes exactly what the original did; training then
    grows the new layers from there. New layers are spread evenly: 3 -> 6 puts one after each original layer.

    Returns the indices (in the new stack) of the inserted layers.
    """
    family = model.config.model_type
    if family not in EXPANDABLE_FAMILIES:
        raise VLMError(f"cannot expand a {family} decoder (expansion works with {', '.join(EXPANDABLE_FAMILIES)})")
    layers = model.model.layers
    old = len(layers)
    if num_layers < old:
        raise VLMError(f"cannot expand a decoder of {old} layers to fewer ({num_layers})")
    extra = num_layers - old
    # Original layer i is followed by floor((i+1)*extra/old) - floor(i*extra/old) new layers: spread evenly.
    stack, sources, inserted = [], [], []
    for i, layer in enumerate(layers):
        stack.append(layer)
        sources.append(i)
        for _ in range((i + 1) * extra // old - i * extra // old):
            new = copy.deepcopy(layer)
            for proj in (new.self_attn.o_proj, new.mlp.down_proj):
                torch.nn.init.zeros_(proj.weight)
                if proj.bias is not None:
                    torch.nn.init.zeros_(proj.bias)
            inserted.append(len(stack))
            stack.append(new)
            sources.append(i)
    for idx, layer in enumerate(stack):
        layer.self_attn.layer_idx = idx  # the KV cache is indexed by it
    model.model.layers = torch.nn.ModuleList(stack)
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None) is not None:  # e.g. sliding-window layers: a copy keeps its kind
        model.config.layer_types = [model.config.layer_types[s] for s in sources]
    return inserted
