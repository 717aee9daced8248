"""`vlm export-hf`: a vlm checkpoint as a transformers `LlavaForConditionalGeneration` folder.

Weights are written in the legacy LLaVA key layout (`vlm.llava.keys`), which transformers 4.5x and 5.x both read;
the folder is checked by loading it back with transformers and comparing logits before it appears under its name.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers.activations import GELU, GELUTanh, QuickGELU
from timm.models.vision_transformer import Attention, Block, Mlp, VisionTransformer
from torch import Tensor, nn

from vlm.checkpoint import load
from vlm.config import VLMConfig
from vlm.errors import VLMError
from vlm.files import atomic_folder, free_folder, read_json, write_json
from vlm.llava.keys import ACTIVATIONS, ENCODER, llava_names, to_llava
from vlm.llava.templates import for_list_content
from vlm.model import VisionLanguageModel
from vlm.processor import RESAMPLE, Processor
from vlm.reward import HEAD_FILE

# Export refuses a folder whose logits differ more than this from vlm's (fp32; they agree to ~1e-5 in practice).
EXPORT_TOLERANCE = 1e-3


def export_hf(model_dir: str, out_dir: str) -> None:
    """Exports a vlm checkpoint as a transformers LLaVA folder (model, processor, chat template).

    The folder loads with `LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained`
    and gives the same logits and greedy output as the vlm model. Needs a CLIP- or SigLIP-style timm ViT encoder
    and the mlp projector, with sequence image positions; anything else is refused, and so is a reward model (LLaVA
    has no place for its head).

    Args:
        model_dir: A vlm checkpoint folder.
        out_dir: The folder to write; must not exist yet, or be empty.
    """
    if (Path(model_dir) / HEAD_FILE).is_file():
        raise VLMError(
            f"{model_dir} is a reward model: transformers' LLaVA has no class for its scalar head, so export-hf would "
            "drop it; score with vlm reward --model DIR"
        )
    out = free_folder(out_dir)
    model, processor = load(model_dir)
    _check_projector_and_positions(model.config)
    vit = model.encoder.model
    vision_config = _vision_config(vit, model.config.encoder.name)
    has_cls = vit.cls_token is not None
    keep_tied = _keeps_tied_head(model.decoder)
    config = _llava_config(model, vision_config, has_cls, keep_tied)
    state = _llava_state(model, has_cls, keep_tied)
    with atomic_folder(out) as tmp:
        config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), {"format": "pt"})
        _save_processor(tmp, processor, config, has_cls)
        diff = _check_export(tmp, model, processor)
    print(
        f"wrote a transformers LLaVA folder to {out}: it loads with no missing, unexpected or mismatched keys, "
        f"max |logit difference| from vlm on a test input {diff:.2e} (fp32)",
        file=sys.stderr,
    )


def _check_projector_and_positions(config: VLMConfig) -> None:
    if config.projector.kind != "mlp":
        raise VLMError(
            f"export-hf supports the mlp projector only (LLaVA's multi_modal_projector); "
            f"this model uses {config.projector.kind}"
        )
    if config.projector.output_norm:
        raise VLMError("export-hf cannot export a projector with an output norm: LLaVA's projector has none")
    if config.image_positions != "sequence":
        raise VLMError(
            "export-hf supports sequence image positions only (LLaVA numbers image tokens like text); "
            f"this model uses {config.image_positions}"
        )


def _llava_config(model: VisionLanguageModel, vision_config: Any, has_cls: bool, keep_tied: bool) -> Any:
    from transformers import LlavaConfig

    text_config = model.decoder.config.to_dict()
    text_config.pop("transformers_version", None)
    text_config["tie_word_embeddings"] = keep_tied
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=model.image_token_id,
        image_seq_length=model.num_image_tokens,
        projector_hidden_act="gelu",
        # The tower keeps only the blocks up to vlm's feature layer, so the feature is its last hidden state.
        vision_feature_layer=-1,
        # "default" drops the first token (CLIP's class token); without a class token every token is a patch.
        vision_feature_select_strategy="default" if has_cls and not model.encoder.keep_prefix_tokens else "full",
        multimodal_projector_bias=True,
        tie_word_embeddings=keep_tied,
    )
    config.architectures = ["LlavaForConditionalGeneration"]  # serving stacks (vLLM) pick the class by this
    return config


def _llava_state(model: VisionLanguageModel, has_cls: bool, keep_tied: bool) -> dict[str, Tensor]:
    """The model's weights (detached, contiguous) in LLaVA's legacy layout, with what the transformers tower has and
    the ViT lacks set to what the ViT computes: zero biases, and an identity final norm (vlm pruned it: its features
    are pre-norm, and LLaVA never applies post_layernorm to the hidden state it reads)."""
    vit = model.encoder.model
    dim = vit.embed_dim
    absent = {"norm.weight": torch.ones(dim), "norm.bias": torch.zeros(dim)}
    if not has_cls:
        absent["patch_embed.proj.bias"] = torch.zeros(dim)
    for i in range(len(vit.blocks)):
        absent[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * dim)
    state = {ENCODER + k: v for k, v in absent.items()}
    state = to_llava({**state, **model.state_dict()}, model.decoder.base_model_prefix)
    head = "language_model.lm_head.weight"
    if keep_tied:
        del state[head]  # a tied head is the embedding table: transformers re-ties it on load
    elif model.decoder.get_output_embeddings().weight is model.decoder.get_input_embeddings().weight:
        state[head] = state[head].clone()  # safetensors stores no shared tensors
    return {k: v.detach().contiguous() for k, v in state.items()}


def _save_processor(folder: Path, processor: Processor, config: Any, has_cls: bool) -> None:
    """The tokenizer, image processor, chat template and generation config, readable by transformers 4.x and 5.x."""
    from transformers import CLIPImageProcessor, GenerationConfig, LlavaProcessor

    transform, tok = processor.transform, processor.tokenizer
    h, w = transform.size
    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"height": h, "width": w},
        resample=int(RESAMPLE.get(transform.interpolation, RESAMPLE["bicubic"])),
        do_center_crop=False,  # vlm resizes the whole image: a question may be about its edge
        crop_size={"height": h, "width": w},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(transform.mean),
        image_std=list(transform.std),
        do_convert_rgb=True,
    )
    chat_template = for_list_content(processor.chat_template, processor.image_token, processor.images_after_text)
    tok.chat_template = chat_template  # the tokenizer and the processor share one chat_template file
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=chat_template,
        image_token=processor.image_token,
        num_additional_image_tokens=1 if has_cls else 0,
    ).save_pretrained(folder)
    _readable_by_4x(folder, image_processor)
    GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=processor.stop_token_ids,
        pad_token_id=tok.pad_token_id,
    ).save_pretrained(folder)


def _vision_config(vit: nn.Module, name: str) -> Any:
    """The transformers CLIP (class token, pre-norm) or SigLIP (neither) vision config of a timm ViT.

    Refuses (VLMError) any structure the transformers tower would compute differently.
    """
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    def refuse(why: str) -> VLMError:
        return VLMError(f"export-hf cannot map encoder {name!r} to a transformers vision tower: {why}")

    _check_embeddings(vit, refuse)
    act, eps = _check_blocks(vit, refuse)
    sizes = {
        "hidden_size": vit.embed_dim,
        "intermediate_size": vit.blocks[0].mlp.fc1.out_features,
        "num_hidden_layers": len(vit.blocks),
        "num_attention_heads": vit.blocks[0].attn.num_heads,
        "num_channels": 3,
        "image_size": vit.patch_embed.img_size[0],
        "patch_size": vit.patch_embed.patch_size[0],
        "hidden_act": act,
        "layer_norm_eps": eps,
    }
    if vit.cls_token is not None:
        return CLIPVisionConfig(**sizes)
    # vision_use_head: LLaVA reads hidden states only, and vlm has no pooling head to export.
    return SiglipVisionConfig(**sizes, vision_use_head=False)


def _check_embeddings(vit: nn.Module, refuse) -> None:
    """Refuses a ViT whose class token, pre-norm, position or patch embedding a CLIP/SigLIP tower cannot hold."""
    if type(vit) is not VisionTransformer:
        raise refuse(f"it is a {type(vit).__name__}, not a plain timm VisionTransformer (CLIP- or SigLIP-style)")
    has_cls = vit.cls_token is not None
    if has_cls != isinstance(vit.norm_pre, nn.LayerNorm):
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


def _check_blocks(vit: nn.Module, refuse) -> tuple[str, float]:
    """Refuses blocks a CLIP/SigLIP encoder layer cannot hold; returns their transformers activation name and their
    layer norms' eps."""
    norms = [vit.norm_pre] if vit.cls_token is not None else []
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
        act = ACTIVATIONS.get(_timm_activation(mlp.act))
        if act is None or act_name not in (None, act):
            raise refuse(f"unsupported or mixed MLP activation {type(mlp.act).__name__}")
        act_name = act
    if not all(type(n) in (nn.LayerNorm, TimmLayerNorm) and n.elementwise_affine and n.bias is not None for n in norms):
        raise refuse("its norms are not affine LayerNorms")
    eps = {n.eps for n in norms}
    if len(eps) != 1:
        raise refuse(f"its layer norms use different eps {sorted(eps)}")
    return act_name, eps.pop()


def _timm_activation(act: nn.Module) -> str | None:
    """The timm name of an activation module (a key of ACTIVATIONS), or None."""
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, GELUTanh) or (isinstance(act, nn.GELU) and act.approximate == "tanh"):
        return "gelu_tanh"
    if isinstance(act, GELU) or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    return None


def _keeps_tied_head(decoder: nn.Module) -> bool:
    """Whether transformers' LLaVA can keep the decoder's head tied to its embedding table; refuses (VLMError) a
    decoder LLaVA cannot hold.

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
    for k in decoder.state_dict():
        if not llava_names("decoder." + k, decoder.base_model_prefix):
            raise VLMError(f"export-hf cannot place decoder weight {k!r} in the LLaVA layout")
    embedding = decoder.get_input_embeddings().weight
    tied = head.weight is embedding
    return tied and decoder.state_dict(keep_vars=True).get(prefix + "embed_tokens.weight") is embedding


def _readable_by_4x(folder: Path, image_processor: Any) -> None:
    """Adds what transformers 4.x needs to read a folder 5.x wrote.

    4.x reads the image processor from its own file, knows no `TokenizersBackend` class, returns token_type_ids
    (which LLaVA's generate rejects) unless told the model's inputs, and reads RoPE settings from `rope_theta` /
    `rope_scaling`, not 5.x's `rope_parameters`: without them it silently falls back to its default theta.
    """
    image_processor.save_pretrained(folder)  # preprocessor_config.json, beside 5.x's processor_config.json
    path = folder / "tokenizer_config.json"
    tok_config = read_json(path)
    if tok_config.get("tokenizer_class") == "TokenizersBackend":
        tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config["model_input_names"] = ["input_ids", "attention_mask"]
    write_json(path, tok_config)
    path = folder / "config.json"
    config = read_json(path)
    rope = config["text_config"].get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config["text_config"]["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            config["text_config"]["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        write_json(path, config)


def _check_export(folder: Path, model: VisionLanguageModel, processor: Processor) -> float:
    """Loads the written folder with transformers; refuses it if any weight is missing, left over or misshapen,
    or if its logits on a test image and prompt differ from vlm's by more than EXPORT_TOLERANCE. Returns the
    largest logit difference."""
    from PIL import Image
    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a check, not a load the user asked for
    try:
        hf, info = LlavaForConditionalGeneration.from_pretrained(
            folder, output_loading_info=True, trust_remote_code=False
        )
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
