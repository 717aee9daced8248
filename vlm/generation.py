"""Text generation from images and prompts: options, batching, the context check, streaming.

Decoding itself is `VisionLanguageModel.generate`, the own decode loop in `vlm/decode.py` (prefill, then a one-token
step over a preallocated KV cache; beam search on transformers' `generate`); this module turns prompts and images into
its inputs and its token ids back into text. It imports torch and transformers only when it generates, so the command
line can read `GenerationOptions` (and check its values) before paying for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from PIL import Image

from vlm.errors import OptionError, VLMError

DEFAULT_MAX_NEW_TOKENS = 64


@dataclass
class GenerationOptions:
    """How to pick tokens.

    Args:
        max_new_tokens: Stop after this many new tokens (or at the end-of-turn token). Unset: 64, except that `vlm eval`
            of question rows uses the answer length the model was trained with (`VLMConfig.answer_tokens`).
        temperature: 0 for greedy decoding; above 0 samples with this temperature.
        top_k: Sample only among the k most likely tokens (0: no limit).
        top_p: Sample only within this cumulative probability (1.0: no limit).
        num_beams: Beam search with this many beams (1: no beam search).
        repetition_penalty: Above 1 discourages repeating tokens.
        seed: Random seed for sampling, for reproducible outputs.
        compile: Compile the decode step with torch.compile (unset: on CUDA only; on a CPU the first call pays
            seconds to minutes of compiling, which pays back over long or many generations).
    """

    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    seed: int | None = None
    compile: bool | None = None

    # What each option accepts, in words: `__post_init__` checks these, and the CLI's messages quote them.
    ACCEPTED: ClassVar[dict[str, str]] = {
        "max_new_tokens": "an integer of at least 1",
        "temperature": "a finite number, 0 (greedy) or above",
        "top_k": "an integer, 0 (no limit) or above",
        "top_p": "a number above 0 and at most 1",
        "num_beams": "an integer of at least 1",
        "repetition_penalty": "a finite number above 0",
    }

    def __post_init__(self):
        checks = {
            "max_new_tokens": self.max_new_tokens is None or self.max_new_tokens >= 1,
            "temperature": math.isfinite(self.temperature) and self.temperature >= 0,
            "top_k": self.top_k >= 0,
            "top_p": 0 < self.top_p <= 1,  # False for NaN
            "num_beams": self.num_beams >= 1,
            "repetition_penalty": math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise OptionError(name, self.ACCEPTED[name], getattr(self, name))

    @property
    def new_tokens(self) -> int:
        """`max_new_tokens`, or the default when unset."""
        return self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS

    def hf_kwargs(self, stop_token_ids: list[int], pad_token_id: int) -> dict[str, Any]:
        """Keyword arguments for transformers' `generate` (beam search, and decoders the own loop does not run)."""
        sample = self.temperature > 0
        kw: dict[str, Any] = {
            "max_new_tokens": self.new_tokens,
            "do_sample": sample,
            "num_beams": self.num_beams,
            "repetition_penalty": self.repetition_penalty,
            "eos_token_id": stop_token_ids,
            "pad_token_id": pad_token_id,
        }
        if sample:
            kw.update(temperature=self.temperature, top_k=self.top_k or None, top_p=self.top_p)
        else:  # say so explicitly: a decoder's own generation_config may default to sampling
            kw.update(temperature=None, top_k=None, top_p=None)
        return kw


def generate_texts(
    model,
    processor,
    prompts: list[str],
    images: list[list[Image.Image]],
    options: GenerationOptions | None = None,
    history: list[list[dict[str, str]]] | None = None,
    stream: bool = False,
    placeholders: list[bool] | None = None,
    on_tokens: Callable[[list[int]], list[bool] | None] | None = None,
) -> list[str]:
    """Answers for a batch: sample i is `prompts[i]` about `images[i]` (after `history[i]`, if given), from a
    `VisionLanguageModel` and its `Processor`.

    The prompts are plain text; `placeholders[i]` says that `<image>` in prompt i marks where its images go instead
    (a data file's conversation).

    With `stream`, tokens of a one-sample batch are printed to stdout as they are produced.

    `on_tokens` (greedy and sampling; not beam search) is called after each decoding step with the new token id of
    every sample (a sample already finished gets the pad id); it may return one flag per sample, True to finish that
    sample now (e.g. its client left, or it reached its own length). The server streams and stops requests with it.
    """
    out = generate_ids(model, processor, prompts, images, options, history, stream, placeholders, on_tokens)
    return [processor.decode(seq) for seq in out]


def generate_ids(
    model,
    processor,
    prompts: list[str],
    images: list[list[Image.Image]],
    options: GenerationOptions | None = None,
    history: list[list[dict[str, str]]] | None = None,
    stream: bool = False,
    placeholders: list[bool] | None = None,
    on_tokens: Callable[[list[int]], list[bool] | None] | None = None,
):
    """The new token ids (B, T_new) behind `generate_texts`' answers (same arguments), stop and pad tokens included."""
    import torch
    from transformers import TextStreamer

    from vlm.decoder import context_length

    options = options or GenerationOptions()
    batch = processor(prompts, images, history, placeholders)
    limit = context_length(model.decoder)
    needed = batch["input_ids"].shape[1] + options.new_tokens
    if limit is not None and needed > limit:
        raise VLMError(
            f"the prompt is {batch['input_ids'].shape[1]} tokens (images included); with max_new_tokens "
            f"{options.new_tokens} that exceeds the decoder's context of {limit} tokens"
        )
    device = next(model.parameters()).device
    batch = {k: v.to(device) if v is not None else None for k, v in batch.items()}
    if options.seed is not None:
        torch.manual_seed(options.seed)
    streamer = None
    if stream and len(prompts) == 1 and options.num_beams == 1:
        streamer = TextStreamer(processor.tokenizer, skip_special_tokens=True)  # it is given new tokens only
    return model.generate(
        **batch,
        options=options,
        stop_token_ids=processor.stop_token_ids,
        pad_token_id=processor.tokenizer.pad_token_id,
        streamer=streamer,
        on_tokens=on_tokens,
    )
