"""LoRA adapters on the decoder (Hu et al. 2021, via peft): added for training, merged into every saved model."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from vlm.model import VisionLanguageModel


@dataclass
class LoraSettings:
    """LoRA adapters on the decoder (Hu et al. 2021, via peft); merged into the weights of every exported model.

    Args:
        r: Adapter rank.
        alpha: Scaling numerator (the update is scaled by alpha / r).
        dropout: Dropout on the adapter input.
        target_modules: Decoder modules to adapt: module names, or "all-linear" (every linear layer but the head).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = field(default="all-linear")


def add_lora(decoder: nn.Module, lora: LoraSettings) -> nn.Module:
    """The decoder wrapped with fresh LoRA adapters (its own weights frozen)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules, bias="none"
    )
    return get_peft_model(decoder, config)


def merged_copy(model: VisionLanguageModel) -> VisionLanguageModel:
    """The model with any LoRA adapters merged into the decoder: a plain `VisionLanguageModel` again."""
    from peft import PeftModel

    if not isinstance(model.decoder, PeftModel):
        return model
    decoder = model.decoder.merge_and_unload()
    return VisionLanguageModel(model.config, model.encoder, model.projector, decoder, model.image_token_id)
