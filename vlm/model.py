"""The vision-language model: image encoder -> projector -> decoder language model.

The decoder reads one sequence in which each image placeholder has been expanded to `num_image_tokens`
image-token ids; the projected patch embeddings are written into exactly those positions.

Training rows are either right-padded (one sample a row, with an `attention_mask`) or packed (several samples one
after another in a row, with `position_ids` that restart at 0 at each sample and no `attention_mask`). For packed
rows, transformers' mask builder (`masking_utils.find_packed_sequence_indices`) reads the restarts as sample
boundaries and makes attention block-diagonal causal, so each sample sees only itself, as if padded.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vlm import decode
from vlm.config import VLMConfig
from vlm.decoder import PACKAGE_PREFIX, build_decoder, expand_layers, package_file
from vlm.encoders import ImageEncoder, create_encoder
from vlm.errors import VLMError
from vlm.generation import GenerationOptions
from vlm.positions import IMAGE_POSITIONS, grid_offsets, use_grid_rotary
from vlm.processor import IGNORE_INDEX
from vlm.projector import build_projector, num_output_tokens, output_grid

# Decoder families that build their attention mask with transformers' `create_causal_mask` from `position_ids`,
# and attention implementations whose masks honour the packed boundaries it finds; tests/test_packing.py checks each
# family. Other families may attend across packed samples: bloom and mpt (ALiBi) and opt take positions from the
# attention mask, and flash attention finds packed samples only in a batch of one row.
PACKING_FAMILIES = ("llama", "qwen2", "gpt2", "gptj")
PACKING_ATTENTION = ("sdpa", "eager", "flex_attention")


@dataclass
class VLMOutput:
    """`forward`'s result: without labels, logits (B, T, vocab); with labels, the loss and the logits of the labelled
    positions only (number of labelled tokens, vocab)."""

    loss: Tensor | None
    logits: Tensor
    hidden_states: Tensor | None = None  # the decoder's last hidden states (B, T, D), when asked for
    attentions: tuple[Tensor, ...] | None = None  # every decoder layer's attention weights (B, heads, T, T), when asked for


def build_encoder(config: VLMConfig, pretrained: bool) -> ImageEncoder:
    """The encoder `config.encoder` describes; with `pretrained`, its published or local weights loaded (a weights
    path may name a file inside an installed package: `package:<pkg>/<file>`, as decoder sources do)."""
    e = config.encoder
    weights = e.weights if pretrained else None
    if weights is not None and weights.startswith(PACKAGE_PREFIX):
        weights = str(package_file(weights))
    try:
        return create_encoder(
            e.name,
            pretrained=pretrained and e.pretrained,
            weights=weights,
            feature_layer=e.feature_layer,
            keep_prefix_tokens=e.keep_prefix_tokens,
            pos_embed_std=e.pos_embed_std,
            input_size=e.input_size,
            **e.overrides,
        )
    except ValueError as err:
        raise VLMError(str(err)) from err


class VisionLanguageModel(nn.Module):
    """A plain `nn.Module`: build it with `from_config` (fresh) or `from_pretrained` (a checkpoint folder)."""

    def __init__(
        self,
        config: VLMConfig,
        encoder: ImageEncoder,
        projector: nn.Module,
        decoder: PreTrainedModel,
        image_token_id: int,
    ):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.projector = projector
        self.decoder = decoder
        self.image_token_id = image_token_id
        self.num_image_tokens = num_output_tokens(config.projector, encoder.num_tokens)
        self.set_image_positions(config.image_positions)

    @classmethod
    def from_config(cls, config: VLMConfig, tokenizer: PreTrainedTokenizerBase, pretrained: bool = True):
        """Builds a model for `tokenizer`, which must already hold the image token (see `Processor`).

        With `pretrained`, parts whose config asks for pretrained weights load them (hub or local files).
        The returned model's config records the decoder's full transformers config, so a saved
        checkpoint rebuilds it offline.
        """
        config = copy.deepcopy(config)
        image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise VLMError(f"the tokenizer has no image token {config.image_token!r}")
        if config.projector.kind == "pixel_shuffle" and config.encoder.keep_prefix_tokens:
            raise VLMError("the pixel_shuffle projector needs a patch grid: set encoder.keep_prefix_tokens false")
        encoder = build_encoder(config, pretrained)
        decoder = build_decoder(config.decoder if pretrained else _random(config.decoder), len(tokenizer))
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            setattr(decoder.config, name, getattr(tokenizer, name))
            if decoder.generation_config is not None:
                setattr(decoder.generation_config, name, getattr(tokenizer, name))
        config.decoder.hf_config = decoder.config.to_diff_dict()
        config.decoder.hf_config.pop("transformers_version", None)
        embeddings = decoder.get_input_embeddings()
        projector = build_projector(config.projector, encoder.num_features, embeddings.embedding_dim, encoder.grid_size)
        if getattr(projector, "norm", None) is not None:  # image tokens start at the text tokens' scale
            with torch.no_grad():
                projector.norm.weight.copy_(embeddings.weight.float().pow(2).mean().sqrt())  # no .item(): meta-safe
        return cls(config, encoder, projector, decoder, image_token_id)

    def expand_decoder(self, num_layers: int) -> list[int]:
        """Deepens the decoder to `num_layers` without changing what the model computes (`decoder.expand_layers`),
        and records the new depth in the config so a saved checkpoint rebuilds it. Returns the new layers' indices."""
        inserted = expand_layers(self.decoder, num_layers)
        self.config.decoder.hf_config["num_hidden_layers"] = num_layers
        if "layer_types" in self.config.decoder.hf_config:
            self.config.decoder.hf_config["layer_types"] = list(self.decoder.config.layer_types)
        return inserted

    @property
    def image_grid(self) -> tuple[int, int] | None:
        """Rows and columns of the image tokens the projector writes, or None if they are not a patch grid (the
        encoder's class/register tokens kept)."""
        if self.encoder.keep_prefix_tokens:
            return None
        return output_grid(self.config.projector, self.encoder.grid_size)

    def set_image_positions(self, kind: str) -> None:
        """Switches the decoder's rotary positions for image tokens (`VLMConfig.image_positions`, `vlm.positions`)
        and records the choice in the config. The weights are unchanged; a model trained with one kind answers
        differently with the other until trained with it."""
        if kind not in IMAGE_POSITIONS:
            raise VLMError(f"image_positions must be one of {', '.join(IMAGE_POSITIONS)}, not {kind!r}")
        if kind == "grid" and self.image_grid is None:
            raise VLMError("image_positions grid needs a patch grid: set encoder.keep_prefix_tokens false")
        self._grid_rotary = use_grid_rotary(self.decoder, kind == "grid")
        self.config.image_positions = kind

    def _positioned(self, input_ids: Tensor):
        """A context for one decoder call on `input_ids`: with `grid` image positions, their rotary offsets."""
        if self._grid_rotary is None:
            return contextlib.nullcontext()
        return self._grid_rotary.offsets(grid_offsets(input_ids == self.image_token_id, self.image_grid))

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(num_images, 3, H, W) -> (num_images, num_image_tokens, D) decoder embeddings."""
        feats = self.encoder(pixel_values.to(self.encoder_dtype))
        return self.projector(feats.to(self.projector_dtype))

    @property
    def encoder_dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None = None) -> Tensor:
        """Token embeddings with the image embeddings written into the image-token positions.

        `pixel_values` holds every image of the batch in order: sample 0's images, then sample 1's, ...
        """
        embeds = self.decoder.get_input_embeddings()(input_ids)  # (B, T, D)
        image_mask = input_ids == self.image_token_id
        num_slots = int(image_mask.sum())
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        if num_slots != num_images * self.num_image_tokens:
            raise VLMError(
                f"{num_slots} image-token positions for {num_images} images of {self.num_image_tokens} tokens each"
            )
        if num_images == 0:
            return embeds
        image_embeds = self.encode_images(pixel_values)  # (num_images, N, D)
        # masked_scatter fills positions in row-major order, i.e. sample by sample, image by image.
        return embeds.masked_scatter(image_mask.unsqueeze(-1), image_embeds.to(embeds.dtype))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> VLMOutput:
        """Logits, and with `labels` the mean cross-entropy over the labelled tokens; with `output_hidden_states`, the
        decoder's last hidden states too (what a reward head reads); with `output_attentions`, every layer's attention
        weights (what `vlm explain` reads; the decoder must run eager attention to return them).

        Without `labels`: logits (B, T, vocab). With `labels`: logits only where a token is predicted for a label,
        (number of labelled tokens, vocab) in row-major order, and the loss from those. A batch's whole fp32 logits
        (B x T x vocab) would be several GB for a 49k vocabulary, mostly for image and prompt positions no label
        reads; decoders that cannot select positions (`decode.FAMILIES` can) still compute them all.

        Padded rows pass `attention_mask` (positions then count real tokens only). Packed rows pass `position_ids`
        restarting at 0 at each sample and no `attention_mask`: attention stays inside each sample, and a token at
        position 0 is never a target, so no sample predicts the next one's first token. Explicit positions win.
        Rows of independent turns pass `position_ids` and a boolean (B, 1, T, T) mask of what each token may see.
        """
        embeds = self.embed(input_ids, pixel_values)
        if attention_mask is not None and attention_mask.dim() == 4:  # a tree of turns (vlm.collate.tree_mask)
            attention_mask = torch.zeros(attention_mask.shape, dtype=embeds.dtype, device=embeds.device).masked_fill(
                ~attention_mask.to(embeds.device), torch.finfo(embeds.dtype).min
            )
        elif position_ids is None and attention_mask is not None:  # count real tokens only: left padding is no token
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if position_ids is not None and attention_mask is None:
            check_packing(self.decoder)
        targets = keep = None
        if labels is not None:  # predict token t+1 from position t; only labelled positions count
            targets = labels[:, 1:]
            if position_ids is not None:  # position 0 starts a sample: the sample before it does not predict it
                targets = targets.masked_fill(position_ids[:, 1:] == 0, IGNORE_INDEX)
            keep = F.pad(targets != IGNORE_INDEX, (0, 1))  # (B, T): the positions whose logits the loss reads
        selects = keep is not None and decode.causal_lm(self.decoder).config.model_type in decode.FAMILIES
        # No cache: the mask builder only looks for packed samples without one, and nothing here reuses it.
        with self._positioned(input_ids):
            out = self.decoder(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                output_hidden_states=output_hidden_states,
                output_attentions=output_attentions,
                **({"logits_to_keep": keep} if selects else {}),
            )
        logits, hidden = out.logits, out.hidden_states[-1] if output_hidden_states else None
        attentions = out.attentions if output_attentions else None
        if keep is None:
            return VLMOutput(None, logits, hidden, attentions)
        if not selects:
            logits = logits[keep]
        loss = F.cross_entropy(logits.float(), targets[keep[:, :-1]])
        return VLMOutput(loss, logits, hidden, attentions)

    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor | None = None,
        options: GenerationOptions | None = None,
        stop_token_ids: Sequence[int] = (),
        pad_token_id: int = 0,
        streamer=None,
        on_tokens=None,
        suppress_token_ids: Sequence[int] = (),
    ) -> Tensor:
        """New token ids (B, T_new) for left-padded prompts, by the own decode loop (`vlm.decode.generate`: KV cache,
        greedy / sampling, stop tokens per row, streaming; beam search on transformers' `generate`)."""
        return decode.generate(
            self,
            input_ids,
            attention_mask,
            pixel_values,
            options or GenerationOptions(),
            stop_token_ids,
            pad_token_id,
            streamer,
            on_tokens,
            suppress_token_ids,
        )


def packing_problem(decoder: PreTrainedModel) -> str | None:
    """Why `decoder` would let the samples of a packed row attend to each other, or None if it keeps them apart."""
    family, attention = decoder.config.model_type, decoder.config._attn_implementation
    if family not in PACKING_FAMILIES:
        return f"a {family} decoder cannot keep packed samples apart (packing works with {', '.join(PACKING_FAMILIES)})"
    if attention not in PACKING_ATTENTION:
        return f"{attention} attention cannot keep packed samples apart (use {', '.join(PACKING_ATTENTION)})"
    return None


def check_packing(decoder: PreTrainedModel) -> None:
    """Raises `VLMError` unless `decoder` keeps each sample of a packed row to itself (see `PACKING_FAMILIES`)."""
    problem = packing_problem(decoder)
    if problem is not None:
        raise VLMError(f"data.pack_tokens: {problem}; leave data.pack_tokens unset to pad instead")


def _random(decoder_cfg):
    """The decoder config without pretrained weights (checkpoint loading fills the weights)."""
    d = copy.deepcopy(decoder_cfg)
    d.pretrained = False
    return d
