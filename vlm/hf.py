"""Interop with transformers' LLaVA: export a vlm checkpoint as a `LlavaForConditionalGeneration` folder and
import one back, so vlm models can be served with transformers, vLLM and friends, and LLaVA models fine-tuned here.

The mapping is exact, not approximate: a timm ViT with a class token and a pre-norm is a CLIP vision tower, one
with neither is a SigLIP tower (qkv split into q/k/v, same norms, activations and position embeddings); vlm's
features (block output before the final norm, later blocks pruned) are LLaVA's `hidden_states[vision_feature_layer]`;
the MLP projector is LLaVA's `multi_modal_projector`; the decoder is LLaVA's `language_model`. Anything that does not
map exactly (other encoders, the pixel-shuffle projector) is refused.

Weights are written in the "legacy" LLaVA key layout (`language_model.model.*`, `language_model.lm_head.*`,
`vision_tower.vision_model.*`, `multi_modal_projector.*`), which transformers 4.5x and 5.x both read.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers.activations import GELU, GELUTanh, QuickGELU
from timm.models.vision_transformer import Attention, Block, Mlp, VisionTransformer
from torch import Tensor, nn

from vlm.config import DecoderConfig, EncoderConfig, ProjectorConfig, VLMConfig
from vlm.errors import VLMError

# timm model whose defaults each transformers vision tower matches; import overrides the sizes.
CLIP_TIMM = "vit_base_patch16_clip_224"  # class token, pre-norm, nn.LayerNorm (eps 1e-5)
SIGLIP_TIMM = "vit_base_patch16_siglip_224"  # no class token, no pre-norm, LayerNorm eps 1e-6
_TIMM_EPS = {"clip_vision_model": 1e-5, "siglip_vision_model": 1e-6}
_HF_TO_TIMM_ACT = {
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}
_PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}

# The exported chat template turns transformers' list-of-parts message content (what pipelines and
# `apply_chat_template` pass) into the plain text vlm's template expects: one "<image>\n" per image, then the
# text, which is where vlm's processor puts image placeholders (`_list_to_text` swaps the order for a model with
# `images_after_text`). One line: it must render nothing itself.
_LIST_TO_TEXT = (
    "{%- set vlm_ns = namespace(messages=[]) -%}{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set vlm_ns.messages = vlm_ns.messages + [m] -%}"
    "{%- else -%}{%- set vlm_parts = namespace(images='', text='') -%}"
    "{%- for c in m['content'] -%}{%- if c['type'] == 'image' -%}"
    "{%- set vlm_parts.images = vlm_parts.images + IMAGE_TOKEN + '\\n' -%}{%- elif c['type'] == 'text' -%}"
    "{%- set vlm_parts.text = vlm_parts.text + c['text'] -%}{%- endif -%}{%- endfor -%}"
    "{%- set vlm_ns.messages = vlm_ns.messages + [{'role': m['role'], 'content': vlm_parts.images + vlm_parts.text}] "
    "-%}{%- endif -%}{%- endfor -%}{%- set messages = vlm_ns.messages %}"
)
# The reverse, for importing a LLaVA template that expects list content: vlm's "<image>\n" + text becomes parts.
_TEXT_TO_LIST = (
    "{%- set vlm_ns = namespace(messages=[]) -%}{%- for m in messages -%}{%- if m['content'] is string -%}"
    "{%- set vlm_parts = namespace(items=[]) -%}{%- for part in m['content'].split(IMAGE_TOKEN) -%}"
    "{%- if not loop.first -%}{%- set vlm_parts.items = vlm_parts.items + [{'type': 'image'}] -%}"
    "{%- endif -%}{%- set vlm_text = part[1:] if (not loop.first and part.startswith('\\n')) else part -%}"
    "{%- if vlm_text -%}{%- set vlm_parts.items = vlm_parts.items + [{'type': 'text', 'text': vlm_text}] -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- set vlm_ns.messages = vlm_ns.messages + [{'role': m['role'], 'content': vlm_parts.items}] -%}"
    "{%- else -%}{%- set vlm_ns.messages = vlm_ns.messages + [m] -%}{%- endif -%}{%- endfor -%}"
    "{%- set messages = vlm_ns.messages %}"
)


def _prologue(template: str, image_token: str) -> str:
    return template.replace("IMAGE_TOKEN", json.dumps(image_token))


def _list_to_text(image_token: str, images_after_text: bool) -> str:
    """The export prologue for vlm's layout: "<image>\\n" per image then the text, or (`images_after_text`) the text
    then "\\n<image>" per image."""
    template = _LIST_TO_TEXT
    if images_after_text:
        template = template.replace("IMAGE_TOKEN + '\\n'", "'\\n' + IMAGE_TOKEN")
        template = template.replace("vlm_parts.images + vlm_parts.text", "vlm_parts.text + vlm_parts.images")
    return _prologue(template, image_token)


# ---- export -------------------------------------------------------------------------------------------------


def export_hf(model_dir: str, out_dir: str) -> None:
    """Exports a vlm checkpoint as a transformers LLaVA folder (model, processor, chat template).

    The folder loads with `LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained`
    and gives the same logits and greedy output as the vlm model. Needs a CLIP- or SigLIP-style timm ViT encoder
    and the mlp projector, with sequence image positions; anything else is refused.

    Args:
        model_dir: A vlm checkpoint folder.
        out_dir: The folder to write; must not exist yet, or be empty.
    """
    from transformers import CLIPImageProcessor, GenerationConfig, LlavaConfig, LlavaProcessor

    from vlm.checkpoint import load

    out = _fresh_target(out_dir)
    model, processor = load(model_dir)
    if model.config.projector.kind != "mlp":
        raise VLMError(
            f"export-hf supports the mlp projector only (LLaVA's multi_modal_projector); "
            f"this model uses {model.config.projector.kind}"
        )
    if model.config.projector.output_norm:
        raise VLMError("export-hf cannot export a projector with an output norm: LLaVA's projector has none")
    if model.config.image_positions != "sequence":
        raise VLMError(
            "export-hf supports sequence image positions only (LLaVA numbers image tokens like text); "
            f"this model uses {model.config.image_positions}"
        )
    vision_config, vision_state, has_cls = _vision_to_hf(model.encoder.model, model.config.encoder.name)
    keep_cls = model.encoder.keep_prefix_tokens
    decoder = model.decoder
    decoder_state, tied = _decoder_to_legacy(decoder)
    text_config = decoder.config.to_dict()
    text_config.pop("transformers_version", None)
    text_config["tie_word_embeddings"] = tied
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=model.image_token_id,
        image_seq_length=model.num_image_tokens,
        projector_hidden_act="gelu",
        # The tower keeps only the blocks up to vlm's feature layer, so the feature is its last hidden state.
        vision_feature_layer=-1,
        # "default" drops the first token (CLIP's class token); without a class token every token is a patch.
        vision_feature_select_strategy="default" if has_cls and not keep_cls else "full",
        multimodal_projector_bias=True,
        tie_word_embeddings=tied,
    )
    config.architectures = ["LlavaForConditionalGeneration"]  # serving stacks (vLLM) pick the class by this
    state = {f"vision_tower.vision_model.{k}": v for k, v in vision_state.items()}
    state.update({f"multi_modal_projector.{k}": v for k, v in model.projector.state_dict().items()})
    state.update(decoder_state)

    tok = processor.tokenizer
    h, w = processor.transform.size
    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"height": h, "width": w},
        resample=_PIL_RESAMPLE.get(processor.transform.interpolation, 3),
        do_center_crop=False,  # vlm resizes the whole image: a question may be about its edge
        crop_size={"height": h, "width": w},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(processor.transform.mean),
        image_std=list(processor.transform.std),
        do_convert_rgb=True,
    )
    chat_template = _list_to_text(processor.image_token, processor.images_after_text) + processor.chat_template
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        config.save_pretrained(tmp)
        save_file(
            {k: v.detach().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), {"format": "pt"}
        )
        tok.chat_template = chat_template  # the tokenizer and the processor share one chat_template file
        hf_processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            patch_size=vision_config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=processor.image_token,
            num_additional_image_tokens=1 if has_cls else 0,
        )
        hf_processor.save_pretrained(tmp)
        _readable_by_4x(tmp, image_processor)
        GenerationConfig(
            bos_token_id=tok.bos_token_id,
            eos_token_id=processor.stop_token_ids,
            pad_token_id=tok.pad_token_id,
        ).save_pretrained(tmp)
        diff = _check_export(tmp, model, processor)
        _publish(tmp, out)
        print(
            f"export-hf: {out} loads in transformers with no missing, unexpected or mismatched keys; "
            f"max |logit difference| from vlm on a test input: {diff:.2e} (fp32)",
            file=sys.stderr,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _vision_to_hf(vit: nn.Module, name: str) -> tuple[Any, dict[str, Tensor], bool]:
    """A timm ViT -> (transformers CLIP/SigLIP vision config, its state dict, has a class token).

    Refuses (VLMError) any structure the transformers tower would compute differently.
    """
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    def refuse(why: str) -> VLMError:
        return VLMError(f"export-hf cannot map encoder {name!r} to a transformers vision tower: {why}")

    if type(vit) is not VisionTransformer:
        raise refuse(f"it is a {type(vit).__name__}, not a plain timm VisionTransformer (CLIP- or SigLIP-style)")
    has_cls = vit.cls_token is not None
    pre_norm = isinstance(vit.norm_pre, nn.LayerNorm)
    if has_cls != pre_norm:
        raise refuse("CLIP towers have a class token and a pre-norm, SigLIP towers neither; this one has only one")
    if not has_cls and not isinstance(vit.norm_pre, nn.Identity):
        raise refuse(f"unsupported pre-norm {type(vit.norm_pre).__name__}")
    if vit.num_reg_tokens or vit.no_embed_class or vit.dynamic_img_size or vit.pos_embed is None:
        raise refuse("register tokens, no_embed_class, dynamic image size and missing position embeddings don't map")
    pe = vit.patch_embed
    if not isinstance(pe.proj, nn.Conv2d):
        raise refuse("its patch embedding is a convolutional stem, not one patchify convolution")
    if not isinstance(pe.norm, nn.Identity) or pe.dynamic_img_pad or not pe.flatten or pe.proj.in_channels != 3:
        raise refuse("the patch embedding has a norm, dynamic padding or not 3 input channels")
    (ih, iw), (ph, pw) = pe.img_size, pe.patch_size
    if ih != iw or ph != pw:
        raise refuse(f"transformers towers need square images and patches, got {ih}x{iw} / {ph}x{pw}")
    if has_cls and pe.proj.bias is not None:
        raise refuse("CLIP's patch embedding has no bias, this one has")

    norms = [vit.norm_pre] if has_cls else []
    act_name = None
    for i, block in enumerate(vit.blocks):
        if type(block) is not Block or type(block.attn) is not Attention or type(block.mlp) is not Mlp:
            raise refuse(f"block {i} is not timm's plain Block/Attention/Mlp")
        attn, mlp = block.attn, block.mlp
        if not all(
            isinstance(m, nn.Identity) for m in (block.ls1, block.ls2, attn.q_norm, attn.k_norm, attn.norm, mlp.norm)
        ):
            raise refuse(f"block {i} has layer scale or extra norms")
        if attn.proj.bias is None or mlp.fc1.bias is None or mlp.fc2.bias is None:
            raise refuse(f"block {i} has linear layers without bias")
        norms += [block.norm1, block.norm2]
        act = _hf_activation(mlp.act)
        if act is None or act_name not in (None, act):
            raise refuse(f"unsupported or mixed MLP activation {type(mlp.act).__name__}")
        act_name = act
    if not all(type(n) in (nn.LayerNorm, TimmLayerNorm) and n.elementwise_affine and n.bias is not None for n in norms):
        raise refuse("its norms are not affine LayerNorms")
    eps = {n.eps for n in norms}
    if len(eps) != 1:
        raise refuse(f"its layer norms use different eps {sorted(eps)}")

    dim = vit.embed_dim
    sizes = {
        "hidden_size": dim,
        "intermediate_size": vit.blocks[0].mlp.fc1.out_features,
        "num_hidden_layers": len(vit.blocks),
        "num_attention_heads": vit.blocks[0].attn.num_heads,
        "num_channels": 3,
        "image_size": ih,
        "patch_size": ph,
        "hidden_act": act_name,
        "layer_norm_eps": eps.pop(),
    }
    sd = vit.state_dict()
    state: dict[str, Tensor] = {"embeddings.patch_embedding.weight": sd["patch_embed.proj.weight"]}
    pos = sd["pos_embed"][0]  # (prefix + patches, D), the class position first
    if has_cls:
        config = CLIPVisionConfig(**sizes)
        state["embeddings.class_embedding"] = sd["cls_token"].reshape(dim)
        state["pre_layrnorm.weight"], state["pre_layrnorm.bias"] = sd["norm_pre.weight"], sd["norm_pre.bias"]
    else:
        # vision_use_head: LLaVA reads hidden states only, and vlm has no pooling head to export.
        config = SiglipVisionConfig(**sizes, vision_use_head=False)
        bias = sd.get("patch_embed.proj.bias")
        state["embeddings.patch_embedding.bias"] = bias if bias is not None else torch.zeros(dim)
    state["embeddings.position_embedding.weight"] = pos
    for i in range(len(vit.blocks)):
        b, o = f"blocks.{i}.", f"encoder.layers.{i}."
        q, k, v = sd[b + "attn.qkv.weight"].chunk(3, dim=0)  # timm fuses q, k, v in one Linear
        qkv_bias = sd.get(b + "attn.qkv.bias")
        qb, kb, vb = qkv_bias.chunk(3) if qkv_bias is not None else (torch.zeros(dim),) * 3
        for proj, weight, bias in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            state[f"{o}self_attn.{proj}.weight"], state[f"{o}self_attn.{proj}.bias"] = weight, bias
        for src, dst in (
            ("attn.proj", "self_attn.out_proj"),
            ("norm1", "layer_norm1"),
            ("norm2", "layer_norm2"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ):
            state[f"{o}{dst}.weight"], state[f"{o}{dst}.bias"] = sd[f"{b}{src}.weight"], sd[f"{b}{src}.bias"]
    # vlm pruned the final norm (its features are pre-norm); LLaVA never applies post_layernorm to the
    # hidden state it reads, but the tower has one: an identity norm keeps the checkpoint complete.
    state["post_layernorm.weight"], state["post_layernorm.bias"] = torch.ones(dim), torch.zeros(dim)
    return config, state, has_cls


def _hf_activation(act: nn.Module) -> str | None:
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, GELUTanh) or (isinstance(act, nn.GELU) and act.approximate == "tanh"):
        return "gelu_pytorch_tanh"
    if isinstance(act, GELU) or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    return None


def _decoder_to_legacy(decoder: nn.Module) -> tuple[dict[str, Tensor], bool]:
    """The decoder's weights under `language_model.model.*` (its base model) and `language_model.lm_head.*`, and
    whether transformers' LLaVA can keep the head tied to the embedding table.

    transformers 5 ties LLaVA's head to `embed_tokens` by name: a tied decoder whose table has another name
    (GPT-2's `wte`) is written untied, with the head's (equal) weights spelled out.
    """
    prefix = decoder.base_model_prefix + "."
    head = decoder.get_output_embeddings()
    head_names = {f"{n}." for n, m in decoder.named_children() if m is head}
    if head_names != {"lm_head."}:
        raise VLMError(f"export-hf needs a decoder whose output layer is named lm_head, got {sorted(head_names)}")
    if head.bias is not None:
        raise VLMError("export-hf cannot export a decoder whose lm_head has a bias: LLaVA's has none")
    embedding = decoder.get_input_embeddings().weight
    params = decoder.state_dict(keep_vars=True)
    tied = head.weight is embedding
    keep_tied = tied and params.get(prefix + "embed_tokens.weight") is embedding
    state = {}
    for k, v in decoder.state_dict().items():
        if k.startswith(prefix):
            state["language_model.model." + k[len(prefix) :]] = v
        elif k.startswith("lm_head."):
            if not keep_tied:  # a tied head is the embedding table: transformers re-ties it on load
                state["language_model." + k] = v.clone() if tied else v  # safetensors stores no shared tensors
        else:
            raise VLMError(f"export-hf cannot place decoder weight {k!r} in the LLaVA layout")
    return state, keep_tied


def _readable_by_4x(folder: Path, image_processor: Any) -> None:
    """Adds what transformers 4.x needs to read a folder 5.x wrote.

    4.x reads the image processor from its own file, knows no `TokenizersBackend` class, returns token_type_ids
    (which LLaVA's generate rejects) unless told the model's inputs, and reads RoPE settings from `rope_theta` /
    `rope_scaling`, not 5.x's `rope_parameters`: without them it silently falls back to its default theta.
    """
    image_processor.save_pretrained(folder)  # preprocessor_config.json, beside 5.x's processor_config.json
    path = folder / "tokenizer_config.json"
    tok_config = json.loads(path.read_text())
    if tok_config.get("tokenizer_class") == "TokenizersBackend":
        tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config["model_input_names"] = ["input_ids", "attention_mask"]
    path.write_text(json.dumps(tok_config, indent=2) + "\n")
    path = folder / "config.json"
    config = json.loads(path.read_text())
    rope = config["text_config"].get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config["text_config"]["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            config["text_config"]["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# Export refuses a folder whose logits differ more than this from vlm's (fp32; they agree to ~1e-5 in practice).
EXPORT_TOLERANCE = 1e-3


def _check_export(folder: Path, model, processor) -> float:
    """Loads the written folder with transformers; refuses it if any weight is missing, left over or misshapen,
    or if its logits on a test image and prompt differ from vlm's by more than EXPORT_TOLERANCE. Returns the
    largest logit difference."""
    from PIL import Image
    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a check, not a load the user asked for
    try:
        hf, info = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    if problems:
        raise VLMError(f"the exported model does not load cleanly in transformers: {problems}")
    gradient = Image.linear_gradient("L").convert("RGB")  # any image with structure will do
    batch = processor(["Describe the image."], [[gradient]])
    model, hf = model.float().eval(), hf.float().eval()
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = hf(**batch).logits[..., : ours.shape[-1]]
    diff = (ours - theirs).abs().max().item()
    if not diff <= EXPORT_TOLERANCE:
        raise VLMError(f"the exported model's logits differ from vlm's by {diff:.2e} (> {EXPORT_TOLERANCE})")
    return diff


# ---- import -------------------------------------------------------------------------------------------------


def import_hf(src: str, out_dir: str) -> None:
    """Imports a transformers LLaVA model as a vlm checkpoint folder with the same logits.

    The vision tower must be CLIP or SigLIP (it becomes the matching timm ViT), the projector LLaVA's MLP.

    Args:
        src: A local LLaVA folder (config.json, safetensors weights, tokenizer, processor) or a hub id.
        out_dir: The vlm checkpoint folder to write; must not exist yet, or be empty.
    """
    from transformers import AutoConfig

    from vlm.checkpoint import save_checkpoint
    from vlm.decoder import context_length, load_tokenizer
    from vlm.model import VisionLanguageModel
    from vlm.processor import Processor

    out = _fresh_target(out_dir)
    folder = _local_folder(src)
    try:
        hf = AutoConfig.from_pretrained(folder)
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
    _load_llava_weights(model, _read_weights(folder), src)
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


def _local_folder(src: str) -> Path:
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists() or src.startswith((".", "/", "~")) or src.count("/") != 1:
        raise VLMError(f"not a LLaVA folder or hub id: {src}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth: all mean "cannot fetch"
        raise VLMError(f"cannot download {src} from the hub: {str(e).splitlines()[0]}") from e


def _encoder_config(hf: Any) -> EncoderConfig:
    """The timm ViT (name + overrides) computing exactly the LLaVA vision tower's selected hidden state."""
    v = hf.vision_config
    kind = v.model_type
    if kind not in _TIMM_EPS:
        raise VLMError(f"import-hf maps CLIP and SigLIP vision towers only, this one is {kind!r}")
    if v.layer_norm_eps != _TIMM_EPS[kind]:
        raise VLMError(f"import-hf needs layer_norm_eps {_TIMM_EPS[kind]} for a {kind}, got {v.layer_norm_eps}")
    if v.hidden_act not in _HF_TO_TIMM_ACT:
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
        "act_layer": _HF_TO_TIMM_ACT[v.hidden_act],
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


def _read_weights(folder: Path) -> dict[str, Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise VLMError(f"no safetensors weights (model.safetensors or its index) in {folder}")
    state = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                state[key] = f.get_tensor(key)
    return state


def _legacy_key(key: str) -> str:
    """Any LLaVA key layout (transformers 4.4x, 4.5x legacy, 5.x) -> the legacy one."""
    for new, old in (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.vision_tower.", "vision_tower."),
    ):
        if key.startswith(new):
            key = old + key[len(new) :]
            break
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        key = "vision_tower.vision_model." + key[len("vision_tower.") :]
    return key


def _load_llava_weights(model: nn.Module, weights: dict[str, Tensor], src: str) -> None:
    """Fills a freshly built vlm model with a LLaVA checkpoint's weights; every vlm weight must be covered."""
    weights = {_legacy_key(k): v for k, v in weights.items()}
    vit = model.encoder.model
    target = model.state_dict()
    state: dict[str, Tensor] = {}
    tower = {k[len("vision_tower.vision_model.") :]: v for k, v in weights.items() if k.startswith("vision_tower.")}
    for k, v in _vision_from_hf(tower, vit).items():
        state["encoder.model." + k] = v
    for k in ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"):
        state["projector." + k] = weights.get("multi_modal_projector." + k)
    decoder = model.decoder
    prefix = decoder.base_model_prefix + "."
    embedding = decoder.get_input_embeddings().weight
    embed_key = next(
        k for k, v in decoder.state_dict(keep_vars=True).items() if v is embedding and k.startswith(prefix)
    )
    for k in target:
        if k.startswith("decoder." + prefix):
            state[k] = weights.get("language_model.model." + k[len("decoder." + prefix) :])
        elif k.startswith("decoder.lm_head."):
            state[k] = weights.get("language_model." + k[len("decoder.") :])
            if state[k] is None and decoder.config.tie_word_embeddings:
                state[k] = weights.get("language_model.model." + embed_key[len(prefix) :])
    vocab = decoder.get_input_embeddings().num_embeddings
    missing = sorted(k for k in target if state.get(k) is None)
    if missing:
        raise VLMError(f"{src} lacks weights for {len(missing)} vlm parameters, e.g. {missing[:3]}")
    for k, v in state.items():
        if v.shape != target[k].shape:
            # LLaVA checkpoints often pad the vocabulary past the tokenizer; vlm sizes it to the tokenizer.
            if v.ndim == 2 and v.shape[0] > vocab == target[k].shape[0] and v.shape[1] == target[k].shape[1]:
                state[k] = v[:vocab]
            else:
                raise VLMError(f"{src}: weight {k} has shape {tuple(v.shape)}, vlm expects {tuple(target[k].shape)}")
    model.load_state_dict(state, strict=True)


def _vision_from_hf(tower: dict[str, Tensor], vit: VisionTransformer) -> dict[str, Tensor]:
    """A CLIP/SigLIP tower's weights -> timm ViT keys, for the blocks vlm keeps."""
    dim = vit.embed_dim
    state = {"patch_embed.proj.weight": tower["embeddings.patch_embedding.weight"]}
    pos = tower["embeddings.position_embedding.weight"]
    state["pos_embed"] = pos.unsqueeze(0)
    if vit.cls_token is not None:
        state["cls_token"] = tower["embeddings.class_embedding"].reshape(1, 1, dim)
        state["norm_pre.weight"], state["norm_pre.bias"] = tower["pre_layrnorm.weight"], tower["pre_layrnorm.bias"]
    else:
        state["patch_embed.proj.bias"] = tower["embeddings.patch_embedding.bias"]
    for i in range(len(vit.blocks)):
        b, o = f"blocks.{i}.", f"encoder.layers.{i}."
        qkv = [tower[f"{o}self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")]
        state[b + "attn.qkv.weight"] = torch.cat(qkv, dim=0)
        state[b + "attn.qkv.bias"] = torch.cat(
            [tower[f"{o}self_attn.{p}.bias"] for p in ("q_proj", "k_proj", "v_proj")]
        )
        for dst, src in (
            ("attn.proj", "self_attn.out_proj"),
            ("norm1", "layer_norm1"),
            ("norm2", "layer_norm2"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ):
            state[f"{b}{dst}.weight"], state[f"{b}{dst}.bias"] = tower[f"{o}{src}.weight"], tower[f"{o}{src}.bias"]
    return state


def _image_transform(folder: Path, image_size: int):
    """vlm's transform from the LLaVA image processor: resize to the tower's input (no crop), normalize."""
    from transformers import AutoImageProcessor

    from vlm.processor import ImageTransform

    try:
        ip = AutoImageProcessor.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise VLMError(f"cannot load the image processor from {folder}: {str(e).splitlines()[0]}") from e
    # With a crop, the crop is the tower's input: vlm resizes the whole image to that size instead,
    # which is the same for images of the crop's aspect ratio.
    size = ip.crop_size if getattr(ip, "do_center_crop", False) else ip.size
    size = dict(size or {})
    hw = (size["height"], size["width"]) if "height" in size else (size.get("shortest_edge"),) * 2
    if hw != (image_size, image_size):
        raise VLMError(f"the image processor makes {hw} images, the vision tower reads {image_size}x{image_size}")
    names = {v: k for k, v in _PIL_RESAMPLE.items()}
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
        template = json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    else:
        template = tokenizer.chat_template
    if not template:
        return None, False  # vlm's processor falls back to its ChatML default
    for after in (False, True):
        exported = _list_to_text(image_token, after)
        if template.startswith(exported):
            return template[len(exported) :], after
    # transformers' processor tokenizes the rendered prompt with the tokenizer's special tokens (e.g. LLaVA-1.5's
    # <s>); vlm tokenizes without them, so the template must write such a BOS itself.
    bos = tokenizer.bos_token_id
    with_special, plain = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    adds_bos = bos is not None and with_special[:1] == [bos] and plain[:1] != [bos]
    if adds_bos and "bos_token" not in template:
        template = "{{ bos_token }}" + template
    return _prologue(_TEXT_TO_LIST, image_token) + template, False


# ---- folders ------------------------------------------------------------------------------------------------


def _fresh_target(out_dir: str) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VLMError(f"output folder {out} already exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Moves a finished folder into place in one rename (an empty target folder is replaced)."""
    if out.is_dir():
        out.rmdir()
    os.replace(tmp, out)
