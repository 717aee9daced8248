"""`vlm import-hf`: a transformers LLaVA folder (or hub id) as a vlm checkpoint folder with the same logits.

The CLIP or SigLIP vision tower becomes the matching timm ViT, LLaVA's projector vlm's mlp projector and its
language model vlm's decoder; the weights are read through the same key table export writes with (`vlm.llava.keys`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from vlm.checkpoint import save_checkpoint
from vlm.config import WEIGHTS_FILE, DecoderConfig, EncoderConfig, ProjectorConfig, VLMConfig
from vlm.decoder import context_length, load_tokenizer, refuse_remote_code
from vlm.errors import VLMError
from vlm.files import check_input_file, free_folder, read_json
from vlm.llava.keys import from_llava, legacy_key, timm_activation
from vlm.llava.templates import for_text_content, vlm_template
from vlm.model import VisionLanguageModel
from vlm.processor import RESAMPLE, ImageTransform, Processor

# timm model whose defaults each transformers vision tower matches; import overrides the sizes.
CLIP_TIMM = "vit_base_patch16_clip_224"  # class token, pre-norm, nn.LayerNorm (eps 1e-5)
SIGLIP_TIMM = "vit_base_patch16_siglip_224"  # no class token, no pre-norm, LayerNorm eps 1e-6
_TIMM_EPS = {"clip_vision_model": 1e-5, "siglip_vision_model": 1e-6}


def import_hf(src: str, out_dir: str) -> None:
    """Imports a transformers LLaVA model as a vlm checkpoint folder with the same logits.

    The vision tower must be CLIP or SigLIP (it becomes the matching timm ViT), the projector LLaVA's MLP.

    Args:
        src: A local LLaVA folder (config.json, safetensors weights, tokenizer, processor) or a hub id.
        out_dir: The vlm checkpoint folder to write; must not exist yet, or be empty.
    """
    from transformers import AutoConfig

    out = free_folder(out_dir)
    folder, root = _local_folder(src)
    refuse_remote_code(folder)
    weight_files = _weight_files(folder, root)
    try:
        hf = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise VLMError(f"cannot read a transformers config from {src}: {str(e).splitlines()[0]}") from e
    if hf.model_type != "llava":
        raise VLMError(f"import-hf reads LLaVA models (model_type llava), {src} is {hf.model_type!r}")
    if hf.projector_hidden_act != "gelu" or not getattr(hf, "multimodal_projector_bias", True):
        raise VLMError("import-hf needs LLaVA's Linear-GELU-Linear projector with biases")
    encoder = _encoder_config(hf)
    tokenizer = load_tokenizer(str(folder))
    image_token = tokenizer.convert_ids_to_tokens(hf.image_token_index)
    if image_token is None:
        raise VLMError(f"the tokenizer has no image token id {hf.image_token_index}")
    text = hf.text_config.to_dict()
    text.pop("transformers_version", None)
    tokenizer.chat_template, images_after_text = _chat_template(folder, tokenizer, image_token)
    config = VLMConfig(
        encoder=encoder,
        projector=ProjectorConfig(kind="mlp"),
        decoder=DecoderConfig(hf_config=text),
        image_token=image_token,
        images_after_text=images_after_text,
    )
    transform = _image_transform(folder, hf.vision_config.image_size)
    model = VisionLanguageModel.from_config(config, tokenizer, pretrained=False)
    _load_llava_weights(model, _read_weights(weight_files), src)
    processor = Processor(
        tokenizer,
        transform,
        model.num_image_tokens,
        image_token,
        config.caption_prompt,
        context_length(model.decoder),
        images_after_text,
    )
    save_checkpoint(model, out, processor)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote a vlm checkpoint of LLaVA model {src} ({n / 1e6:.2f}M parameters) to {out}", file=sys.stderr)


def _local_folder(src: str) -> tuple[Path, Path]:
    """The folder of a LLaVA model (downloaded first for a hub id), and the folder its files may resolve into: itself,
    or for a hub download the repository's cache folder (the hub links a snapshot's files to `../../blobs/`)."""
    path = Path(src)
    if path.is_dir():
        return path, path
    if path.exists() or src.startswith((".", "/", "~")) or src.count("/") != 1:
        raise VLMError(f"not a LLaVA folder or hub id: {src}")
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"])
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth: all mean "cannot fetch"
        raise VLMError(f"cannot download {src} from the hub: {str(e).splitlines()[0]}") from e
    return Path(snapshot), Path(snapshot).parent.parent


def _encoder_config(hf: Any) -> EncoderConfig:
    """The timm ViT (name + overrides) computing exactly the LLaVA vision tower's selected hidden state."""
    v = hf.vision_config
    kind = v.model_type
    if kind not in _TIMM_EPS:
        raise VLMError(f"import-hf maps CLIP and SigLIP vision towers only, this one is {kind!r}")
    if v.layer_norm_eps != _TIMM_EPS[kind]:
        raise VLMError(f"import-hf needs layer_norm_eps {_TIMM_EPS[kind]} for a {kind}, got {v.layer_norm_eps}")
    act = timm_activation(v.hidden_act)
    if act is None:
        raise VLMError(f"import-hf cannot map the vision activation {v.hidden_act!r}")
    layer = hf.vision_feature_layer
    if not isinstance(layer, int) or layer == 0 or not -v.num_hidden_layers <= layer <= v.num_hidden_layers:
        raise VLMError(f"import-hf needs one vision_feature_layer in 1..L or -L..-1, got {layer}")
    strategy = hf.vision_feature_select_strategy
    is_clip = kind == "clip_vision_model"
    if not is_clip and strategy != "full":
        raise VLMError("a SigLIP tower has no class token: vision_feature_select_strategy must be 'full'")
    if v.hidden_size % v.num_attention_heads or v.num_channels != 3:
        raise VLMError("the vision tower's heads must divide its width and it must read 3 channels")
    overrides = {
        "img_size": v.image_size,
        "patch_size": v.patch_size,
        "embed_dim": v.hidden_size,
        "depth": v.num_hidden_layers,
        "num_heads": v.num_attention_heads,
        "mlp_ratio": _mlp_ratio(v.intermediate_size, v.hidden_size),
        "act_layer": act,
    }
    return EncoderConfig(
        name=CLIP_TIMM if is_clip else SIGLIP_TIMM,
        overrides=overrides,
        feature_layer=layer,
        keep_prefix_tokens=is_clip and strategy == "full",
    )


def _mlp_ratio(hidden: int, width: int) -> float:
    """The ratio timm turns back into `hidden` (it truncates width * ratio), e.g. 4304 / 1152 for SigLIP-so400m."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


INDEX_FILE = "model.safetensors.index.json"


def _weight_files(folder: Path, root: Path) -> list[Path]:
    """The safetensors files of a LLaVA folder: `model.safetensors`, or those its index's `weight_map` names. Each
    must be a regular file that resolves inside `root` (see `_local_folder`): an index naming an absolute path, a
    `..`, a link out of the folder or a missing file is a one-line `VLMError`, and nothing outside is ever read."""
    index = folder / INDEX_FILE
    if not index.is_file():
        if not (folder / WEIGHTS_FILE).is_file():
            raise VLMError(f"no safetensors weights ({WEIGHTS_FILE} or {INDEX_FILE}) in {folder}")
        return [folder / WEIGHTS_FILE]
    weight_map = read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise VLMError(f"bad weight index {index}: weight_map must be an object of weight names to file names")
    files = []
    for name in sorted(set(weight_map.values())):
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not path.resolve().is_relative_to(root.resolve()):
            raise VLMError(f"weight index {index} names {name!r}, outside the model folder {folder}")
        try:
            files.append(check_input_file(path, "weight file"))
        except VLMError as e:
            raise VLMError(f"weight index {index} names {name!r}: {e}") from None
    return files


def _read_weights(files: list[Path]) -> dict[str, Tensor]:
    """Every tensor of the safetensors `files`, by name."""
    state = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                state[key] = f.get_tensor(key)
    return state


def _load_llava_weights(model: VisionLanguageModel, weights: dict[str, Tensor], src: str) -> None:
    """Fills a freshly built vlm model with a LLaVA checkpoint's weights; every vlm weight must be covered."""
    decoder = model.decoder
    base = decoder.base_model_prefix
    target = model.state_dict()
    state = from_llava({legacy_key(k): v for k, v in weights.items()}, list(target), base)
    if "decoder.lm_head.weight" not in state and decoder.config.tie_word_embeddings:
        embedding = decoder.get_input_embeddings().weight
        embed_key = next(
            k for k, v in decoder.state_dict(keep_vars=True).items() if v is embedding and k.startswith(base + ".")
        )
        if "decoder." + embed_key in state:
            state["decoder.lm_head.weight"] = state["decoder." + embed_key]
    missing = sorted(k for k in target if k not in state)
    if missing:
        raise VLMError(f"{src} lacks weights for {len(missing)} vlm parameters, e.g. {missing[:3]}")
    vocab = decoder.get_input_embeddings().num_embeddings
    for k, v in state.items():
        if v.shape != target[k].shape:
            # LLaVA checkpoints often pad the vocabulary past the tokenizer; vlm sizes it to the tokenizer.
            if v.ndim == 2 and v.shape[0] > vocab == target[k].shape[0] and v.shape[1] == target[k].shape[1]:
                state[k] = v[:vocab]
            else:
                raise VLMError(f"{src}: weight {k} has shape {tuple(v.shape)}, vlm expects {tuple(target[k].shape)}")
    model.load_state_dict(state, strict=True)


def _image_transform(folder: Path, image_size: int) -> ImageTransform:
    """vlm's transform from the LLaVA image processor: resize to the tower's input (no crop), normalize."""
    from transformers import AutoImageProcessor

    try:
        ip = AutoImageProcessor.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise VLMError(f"cannot load the image processor from {folder}: {str(e).splitlines()[0]}") from e
    # With a crop, the crop is the tower's input: vlm resizes the whole image to that size instead,
    # which is the same for images of the crop's aspect ratio.
    size = ip.crop_size if getattr(ip, "do_center_crop", False) else ip.size
    size = dict(size or {})
    hw = (size["height"], size["width"]) if "height" in size else (size.get("shortest_edge"),) * 2
    if hw != (image_size, image_size):
        raise VLMError(f"the image processor makes {hw} images, the vision tower reads {image_size}x{image_size}")
    names = {int(code): name for name, code in RESAMPLE.items()}
    return ImageTransform(
        size=hw,
        mean=tuple(ip.image_mean),
        std=tuple(ip.image_std),
        interpolation=names.get(int(getattr(ip, "resample", 3)), "bicubic"),
    )


def _chat_template(folder: Path, tokenizer: Any, image_token: str) -> tuple[str | None, bool]:
    """vlm's chat template (text content) for a LLaVA folder's template (list-of-parts content), and whether the
    images go after the text (`VLMConfig.images_after_text`).

    A folder exported by vlm carries vlm's own template behind a known prologue; it is taken back as it was.
    """
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text()
    elif (folder / "chat_template.json").is_file():
        template = read_json(folder / "chat_template.json").get("chat_template")
    else:
        template = tokenizer.chat_template
    if not template:
        return None, False  # vlm's processor falls back to its ChatML default
    exported = vlm_template(template, image_token)
    if exported is not None:
        return exported
    # transformers' processor tokenizes the rendered prompt with the tokenizer's special tokens (e.g. LLaVA-1.5's
    # <s>); vlm tokenizes without them, so the template must write such a BOS itself.
    bos = tokenizer.bos_token_id
    with_special, plain = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    adds_bos = bos is not None and with_special[:1] == [bos] and plain[:1] != [bos]
    if adds_bos and "bos_token" not in template:
        template = "{{ bos_token }}" + template
    return for_text_content(template, image_token), False
