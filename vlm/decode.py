"""The decode loop: a prefill over the prompt's embeddings, then one token at a time over a preallocated KV cache.

The prefill is the decoder's own forward over the prompt (image embeddings written in, `grid` image positions, left
padding), exactly the computation transformers' `generate` starts with. Its keys and values are copied into a cache
allocated once for the prompt and every new token; each step then runs one token per row through each layer's own
norms, projections and MLP (`BLOCKS`), attending over that cache with a mask of its filled, non-padding slots. What
the step leaves out is transformers' per-token machinery (mask building, a growing cache, logits processors, stopping
criteria objects). Its shapes do not change from token to token, so `torch.compile` compiles it once per batch shape
(`mode="reduce-overhead"`, CUDA graphs, on a GPU); eager, a small decoder's step is still bound by per-op overhead.

The layout follows gpt-fast and litgpt (a preallocated cache, prefill and step as separate functions, sampling in a
few lines); the sampling follows transformers' processors in their order (repetition penalty over the new tokens,
temperature, top-k, top-p), so greedy decoding gives the same tokens as `generate`.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import StoppingCriteria, StoppingCriteriaList

from vlm.generation import GenerationOptions

# Decoder families the one-token step has a block for (`BLOCKS`); their prefill is the decoder's own forward.
FAMILIES = ("llama", "qwen2", "gpt2", "gptj")
SLOTS = 64  # the cache's length is rounded up to a multiple of this, so a compiled step sees few distinct shapes

_steps: weakref.WeakKeyDictionary[nn.Module, Callable] = weakref.WeakKeyDictionary()  # compiled steps, per decoder
_noted: set[str] = set()


def causal_lm(decoder: nn.Module) -> nn.Module:
    """The transformers causal LM inside `decoder` (the model itself, or the one a peft LoRA wrapper holds)."""
    get_base = getattr(decoder, "get_base_model", None)
    return get_base() if callable(get_base) else decoder


def unsupported(decoder: nn.Module) -> str | None:
    """Why the own loop cannot decode with `decoder` (transformers' `generate` then does), or None if it can."""
    config = causal_lm(decoder).config
    if config.model_type not in FAMILIES:
        return f"a {config.model_type} decoder (the own decode loop runs {', '.join(FAMILIES)})"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return "sliding-window attention layers"
    return None


class KVCache:
    """Keys and values of every layer, (B, heads, length, head_dim) each, filled by the prefill and then one slot a
    step; `valid` marks the slots a new token may attend to (real prompt tokens and the new tokens so far)."""

    def __init__(self, prefill: object, attention_mask: Tensor, length: int):
        batch, prompt = attention_mask.shape
        self.keys, self.values = [], []
        for layer in prefill.layers:
            for own, filled in ((self.keys, layer.keys), (self.values, layer.values)):
                b, heads, _, dim = filled.shape
                own.append(filled.new_zeros(b, heads, length, dim))
                own[-1][:, :, :prompt] = filled
        self.valid = torch.zeros(batch, length, dtype=torch.bool, device=attention_mask.device)
        self.valid[:, :prompt] = attention_mask.bool()
        self.slot = torch.tensor([prompt], device=attention_mask.device)  # where the next token's keys go

    def update(self, key: Tensor, value: Tensor, layer_idx: int) -> tuple[Tensor, Tensor]:
        self.keys[layer_idx].index_copy_(2, self.slot, key)
        self.values[layer_idx].index_copy_(2, self.slot, value)
        return self.keys[layer_idx], self.values[layer_idx]


def _attend(q: Tensor, k: Tensor, v: Tensor, cache: KVCache, layer: int, mask: Tensor, scale: float) -> Tensor:
    """One query per row (B, heads, 1, head_dim) against the cache with this step's keys and values written in;
    returns (B, 1, heads * head_dim)."""
    keys, values = cache.update(k, v, layer)
    out = F.scaled_dot_product_attention(q, keys, values, mask, scale=scale, enable_gqa=keys.shape[1] != q.shape[1])
    return out.transpose(1, 2).flatten(2)


def _heads(x: Tensor, head_dim: int) -> Tensor:
    return x.view(x.shape[0], 1, -1, head_dim).transpose(1, 2)  # (B, 1, D) -> (B, heads, 1, head_dim)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _llama_block(layer: nn.Module, h: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, cache: KVCache, i: int):
    """A Llama / Qwen2 decoder layer on one token: pre-norm attention with rotary q and k, pre-norm gated MLP."""
    a = layer.self_attn
    x = layer.input_layernorm(h)
    q, k, v = (_heads(proj(x), a.head_dim) for proj in (a.q_proj, a.k_proj, a.v_proj))
    cos, sin = (t.unsqueeze(1) for t in rope)  # (B, 1, 1, head_dim): every head
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    h = h + a.o_proj(_attend(q, k, v, cache, i, mask, a.scaling))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _gpt2_block(layer: nn.Module, h: Tensor, rope: None, mask: Tensor, cache: KVCache, i: int):
    """A GPT-2 block on one token: pre-norm attention (one fused q, k, v projection), pre-norm MLP."""
    a = layer.attn
    q, k, v = (_heads(t, a.head_dim) for t in a.c_attn(layer.ln_1(h)).split(a.split_size, dim=2))
    h = h + a.c_proj(_attend(q, k, v, cache, i, mask, a.scaling))
    return h + layer.mlp(layer.ln_2(h))


def _rotate_pairs(x: Tensor, sin: Tensor, cos: Tensor, dims: int | None) -> Tensor:
    """GPT-J's rotary embedding on the first `dims` features of (B, 1, heads, head_dim): pairs (0, 1), (2, 3), ..."""
    dims = dims or x.shape[-1]
    sin, cos = (t[:, :, None, :].repeat_interleave(2, dim=3) for t in (sin, cos))
    r = x[..., :dims]
    turned = torch.stack((-r[..., 1::2], r[..., ::2]), dim=-1).flatten(-2)
    return torch.cat((r * cos + turned * sin, x[..., dims:]), dim=-1)


def _gptj_block(layer: nn.Module, h: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, cache: KVCache, i: int):
    """A GPT-J block on one token: attention (rotary on the first rotary_dim features) and MLP side by side."""
    a = layer.attn
    x = layer.ln_1(h)
    sin, cos = rope
    q, k = (
        _rotate_pairs(proj(x).view(x.shape[0], 1, -1, a.head_dim), sin, cos, a.rotary_dim)
        for proj in (a.q_proj, a.k_proj)
    )
    attended = _attend(q.transpose(1, 2), k.transpose(1, 2), _heads(a.v_proj(x), a.head_dim), cache, i, mask, a.scaling)
    return a.out_proj(attended) + layer.mlp(x) + h


BLOCKS = {"llama": _llama_block, "qwen2": _llama_block, "gpt2": _gpt2_block, "gptj": _gptj_block}


def make_step(decoder: nn.Module) -> Callable[[Tensor, Tensor, KVCache], Tensor]:
    """The one-token step over `decoder`'s own weights: (tokens (B, 1), positions (B, 1), cache) -> next-token logits
    (B, vocab) in float32. It writes the tokens' keys and values into the cache at `cache.slot`.

    Projections, norms and MLPs are the decoder's own modules (so LoRA adapters apply); attention is one
    `scaled_dot_product_attention` over the cache, whatever attention the decoder was configured with."""
    lm = causal_lm(decoder)
    base = lm.base_model
    block = BLOCKS[lm.config.model_type]
    layers = base.layers if hasattr(base, "layers") else base.h
    norm = base.norm if hasattr(base, "norm") else base.ln_f
    embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    rotary, learned = getattr(base, "rotary_emb", None), getattr(base, "wpe", None)  # gpt2: learned positions

    def step(tokens: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
        cache.valid.index_fill_(1, cache.slot, True)
        mask = cache.valid[:, None, None, :]  # (B, 1, 1, length): every head, the one query
        h = embed(tokens)
        if learned is not None:
            h = h + learned(positions)
        rope = None if rotary is None else rotary(h, positions)
        for i, layer in enumerate(layers):
            h = block(layer, h, rope, mask, cache, i)
        return head(norm(h))[:, -1].float()

    return step


def _step_for(decoder: nn.Module, compile: bool) -> Callable:
    if not compile:
        return make_step(decoder)
    if decoder not in _steps:  # compiled once per decoder; torch recompiles for a new batch size or cache length
        mode = "reduce-overhead" if next(decoder.parameters()).device.type == "cuda" else None
        _steps[decoder] = torch.compile(make_step(decoder), mode=mode)
    return _steps[decoder]


def pick(logits: Tensor, options: GenerationOptions, new: Tensor) -> Tensor:
    """The next token of each row from its logits (B, vocab), given the tokens generated so far `new` (B, t)."""
    if options.repetition_penalty != 1 and new.shape[1]:  # CTRL's penalty (Keskar et al. 2019), as transformers'
        seen = logits.gather(1, new)
        seen = torch.where(seen < 0, seen * options.repetition_penalty, seen / options.repetition_penalty)
        logits = logits.scatter(1, new, seen)
    if options.temperature == 0:
        return logits.argmax(-1)
    logits = logits / options.temperature
    if options.top_k:
        kth = logits.topk(min(options.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if options.top_p < 1:  # the smallest set of most likely tokens whose probabilities reach top_p
        ascending, order = logits.sort()
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - options.top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return torch.multinomial(logits.softmax(-1), 1)[:, 0]


class _StepHook(StoppingCriteria):
    """`on_tokens` as a transformers stopping criterion, for the decoders that `generate` runs: it sees each step's new
    tokens (the last column) and finishes the rows it flags."""

    def __init__(self, on_tokens: Callable[[list[int]], list[bool] | None]):
        self.on_tokens = on_tokens

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        done = self.on_tokens(input_ids[:, -1].tolist()) or [False] * input_ids.shape[0]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _note(text: str) -> None:
    if text not in _noted:
        _noted.add(text)
        print(f"vlm: note: {text}", file=sys.stderr)


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    pixel_values: Tensor | None,
    options: GenerationOptions,
    stop_token_ids: Sequence[int],
    pad_token_id: int,
    streamer=None,
    on_tokens: Callable[[list[int]], list[bool] | None] | None = None,
    suppress_token_ids: Sequence[int] = (),
) -> Tensor:
    """New token ids (B, T_new) for left-padded prompts; rows that stopped early are padded with `pad_token_id`.

    `model` is a `VisionLanguageModel`. Beam search, and decoders the own loop does not run (`unsupported`, with a
    one-line note), go to transformers' `generate`. `streamer` gets each step's tokens (`put`) and `end()`.
    `on_tokens` (not with beam search) gets each step's new token of every row (the pad id for a row already done)
    and may return one flag per row, True to finish that row now. `suppress_token_ids` are never generated.
    """
    decoder = model.decoder
    embeds = model.embed(input_ids, pixel_values)
    reason = unsupported(decoder)
    if reason is not None or options.num_beams > 1:
        if reason is not None:
            _note(f"{reason}: decoding with transformers' generate")
        kwargs = options.hf_kwargs(list(stop_token_ids), pad_token_id)
        if suppress_token_ids:
            kwargs["suppress_tokens"] = list(suppress_token_ids)
        if on_tokens is not None and options.num_beams == 1:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_StepHook(on_tokens)])
        with model._positioned(input_ids):  # the offsets apply to the prompt's forward pass only
            return decoder.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs, streamer=streamer)
    batch, prompt = input_ids.shape
    n = options.new_tokens
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # as `generate` counts
    with model._positioned(input_ids):
        out = decoder(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
    cache = KVCache(out.cache, attention_mask, -(-(prompt + n) // SLOTS) * SLOTS)
    compile = options.compile if options.compile is not None else input_ids.device.type == "cuda"
    step = _step_for(decoder, compile)
    if compile and input_ids.device.type == "cuda":  # CUDA graphs replay reading and writing these very tensors
        for t in (*cache.keys, *cache.values, cache.valid, cache.slot):
            torch._dynamo.mark_static_address(t)
    logits = out.logits[:, -1].float()
    positions = positions[:, -1:] + 1
    stops = torch.tensor(list(stop_token_ids), device=input_ids.device, dtype=torch.long)
    running = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    new = input_ids.new_empty(batch, 0)
    suppress = torch.tensor(list(suppress_token_ids), device=input_ids.device, dtype=torch.long)
    for i in range(n):
        if len(suppress):
            logits = logits.index_fill(1, suppress, -float("inf"))
        token = pick(logits, options, new).where(running, pad_token_id)
        new = torch.cat([new, token[:, None]], dim=1)
        if streamer is not None:
            streamer.put(token.cpu())
        running &= ~torch.isin(token, stops)
        if on_tokens is not None and (finish := on_tokens(token.tolist())):
            running &= ~torch.tensor(finish, dtype=torch.bool, device=running.device)
        if i == n - 1 or not running.any():  # each row stops at its own stop token; the batch when all have
            break
        logits = step(token[:, None], positions, cache)
        positions += 1
        cache.slot += 1
    if streamer is not None:
        streamer.end()
    return new
