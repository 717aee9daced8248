"""Where image tokens sit for the decoder's rotary position embedding: in sequence, or on their patch grid.

With `sequence` positions (LLaVA's way) the image tokens of a row-major patch grid get consecutive positions like
text, so to a RoPE decoder the patch below another is 5 (the grid's width) positions away and the patch beside it 1:
the decoder's sense of nearness is mostly vertical. A shapes model trained so names, as "the object closest to X",
the object closest in sequence (mostly the one nearest in height) more often than the one truly closest
(`eval/benchmarks/shapes_report.py`; README, The shapes benchmark).

With `grid` positions each image token's rotary angle comes in three parts, as in Qwen2-VL's multimodal RoPE (Wang et
al. 2024, "Qwen2-VL", section 2.1): the rotary frequency pairs are dealt round-robin to a sequence, a row and a
column section. Text tokens use their ordinary position p in all three, so text attends to text exactly as with
`sequence` positions. The image tokens of one image, starting at position p0, all use p0 in the sequence section,
p0 + row in the row section and p0 + column in the column section: between two patches of an image, attention sees
how many rows and columns apart they are, and nothing else. The positions given to the decoder stay p (consecutive),
so packing, masks, padding and the KV cache work as before; only the rotary angles of image tokens change.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from vlm.errors import VLMError

IMAGE_POSITIONS = ("sequence", "grid")


def grid_offsets(image_mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, T) image-token mask -> (B, T, 3) integer offsets from each token's sequence position to its sequence, row
    and column rotary positions: 0 for text, (-k, row - k, column - k) for the k-th token of an image.

    Runs of image tokens are split into images of `grid` rows x columns tokens each (row-major), so back-to-back
    images each start their own grid.
    """
    h, w = grid
    n = h * w
    run = image_mask.long().cumsum(-1)
    # Image tokens counted so far at the last text token before each position: where the current run started.
    started = torch.where(image_mask, torch.zeros_like(run), run).cummax(-1).values
    k = (run - started - 1).remainder(n)  # index of each image token inside its own image
    offsets = torch.stack((-k, k // w - k, k % w - k), dim=-1)
    return offsets * image_mask.unsqueeze(-1)


class GridRotary(nn.Module):
    """Wraps a decoder's rotary embedding: while `offsets(...)` is active, the forward pass it was made for gets
    `grid` positions (see the module docstring; text tokens get the same angles as from the wrapped module); every
    other call (a cached generation step) gets the wrapped module's own."""

    def __init__(self, rotary: nn.Module):
        super().__init__()
        self.rotary = rotary
        self._offsets: Tensor | None = None

    @contextmanager
    def offsets(self, offsets: Tensor) -> Iterator[None]:
        self._offsets = offsets
        try:
            yield
        finally:
            self._offsets = None

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        offsets = self._offsets
        if offsets is None or offsets.shape[1] != position_ids.shape[1]:
            return self.rotary(x, position_ids)
        if offsets.shape[0] != position_ids.shape[0]:  # generate() repeats each prompt for beams / samples
            offsets = offsets.repeat_interleave(position_ids.shape[0] // offsets.shape[0], dim=0)
        inv_freq = self.rotary.inv_freq.to(device=x.device, dtype=torch.float)
        section = torch.arange(inv_freq.shape[0], device=x.device) % 3  # pair i: sequence, row, column, sequence...
        positions = position_ids[..., None].float() + offsets.to(x.device).float()  # (B, T, 3)
        freqs = positions[..., section] * inv_freq  # (B, T, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.rotary.attention_scaling
        return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)


def use_grid_rotary(decoder: PreTrainedModel, on: bool) -> GridRotary | None:
    """Puts a `GridRotary` around the decoder's rotary embedding (`decoder.model.rotary_emb`) and returns it (`on`),
    or takes any off and returns None.

    Raises:
        VLMError: `on` for a decoder without one rotary-embedding module (e.g. gpt2's learned positions).
    """
    model = getattr(decoder, "model", None)
    rotary = getattr(model, "rotary_emb", None)
    if not on:
        if isinstance(rotary, GridRotary):
            model.rotary_emb = rotary.rotary
        return None
    if isinstance(rotary, GridRotary):
        return rotary
    if rotary is None or not hasattr(rotary, "inv_freq") or not hasattr(rotary, "attention_scaling"):
        raise VLMError(
            "image_positions grid needs a decoder whose rotary position embedding is one module "
            f"(model.rotary_emb: llama, qwen2, ...); a {decoder.config.model_type} decoder has none"
        )
    model.rotary_emb = GridRotary(rotary)
    return model.rotary_emb
