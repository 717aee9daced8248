"""An lmms-eval model backed by a vlm checkpoint: `lmms-eval --model vlm --model_args pretrained=DIR --tasks ...`.

lmms-eval (0.7) finds plugin models through the Python entry-point group `lmms_eval.models`; this project's
pyproject.toml registers `manifest` there, so installing the project (with the `lmms` extra) is all it takes.

* `generate_until`: the task's prompt and images go through the processor's chat template, exactly as
  `vlm ask` does; batching, and per-request error isolation, are those of `vlm.commands.run_items`. A request
  that fails (e.g. a prompt longer than the context) answers "" and is reported on stderr.
* `loglikelihood`: log P(continuation | context, images) = the sum of the log-probabilities of the continuation's
  tokens, from one `model.forward` over the prompt (with the assistant prefix) followed by the continuation's
  tokens, appended exactly as given (so chat-style tasks want `target_delimiter: ""`). `isgreedy` says whether
  greedy decoding would have produced every continuation token.

Caveat: lmms-eval's built-in `multiple_choice` scoring picks the choice with the *smallest* value
(`np.argmin`), because several of its bundled models return a loss there instead of the documented
log-likelihood. This adapter returns the documented log-likelihood, so tasks relying on that built-in scoring
rank choices backwards; the shipped `shapes_vqa_mc` task scores with its own `process_results` (argmax).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import astuple
from typing import Any

from vlm.errors import VLMError

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ImportError as e:  # only lmms-eval imports this module; say how to get it
    raise VLMError("the lmms-eval adapter needs lmms-eval: pip install 'vlm[lmms]'", exit_code=1) from e

import torch
from PIL import Image

from vlm.generation import GenerationOptions
from vlm.images import to_rgb
from vlm.inference import Item, run_items

# Arguments lmms-eval passes to every model that this one has no use for.
_IGNORED_ARGS = {"max_batch_size"}


class VLMForLmmsEval(lmms):
    """A vlm checkpoint as an lmms-eval model (single process)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        device: str | None = "auto",
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int = 64,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            pretrained: A vlm checkpoint folder (default: samples/shapes-model/, which knows only the synthetic
                shapes benchmark).
            device: auto, cpu, cuda or cuda:N.
            dtype: auto, float32, bfloat16 or float16.
            batch_size: Requests per forward pass.
            max_new_tokens: Generation length when a task does not set one.
        """
        super().__init__()
        from vlm.checkpoint import open_model

        unknown = set(kwargs) - _IGNORED_ARGS
        if unknown:
            print(f"vlm: warning: ignoring unknown model_args {', '.join(sorted(unknown))}", file=sys.stderr)
        try:
            self.batch_size = int(batch_size)
        except ValueError:
            raise VLMError(f"batch_size must be a whole number, got {batch_size!r}") from None
        if self.batch_size < 1:
            raise VLMError("batch_size must be at least 1")
        self.max_new_tokens = int(max_new_tokens)
        self.model, self.processor = open_model(pretrained, device or "auto", dtype)
        self.device = next(self.model.parameters()).device

    # ---- helpers ----

    def _doc(self, task: str, split: str, doc_id: int) -> dict[str, Any]:
        return self.task_dict[task][split][doc_id]

    @staticmethod
    def _images(doc_to_visual: Callable | None, doc: dict[str, Any]) -> list[Image.Image]:
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        for v in visuals:
            if not isinstance(v, Image.Image):
                raise VLMError(f"vlm models read images; the task gave a {type(v).__name__} (video or audio?)")
        return [to_rgb(v) for v in visuals]

    def _options(self, gen_kwargs: dict[str, Any]) -> GenerationOptions:
        """lmms-eval's generation kwargs as vlm options (greedy unless the task samples)."""
        sample = gen_kwargs.get("do_sample", True) and float(gen_kwargs.get("temperature") or 0) > 0
        return GenerationOptions(
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            temperature=float(gen_kwargs["temperature"]) if sample else 0.0,
            top_p=float(gen_kwargs.get("top_p") or 1.0),
            top_k=int(gen_kwargs.get("top_k") or 0),
            num_beams=int(gen_kwargs.get("num_beams") or 1),
        )

    # ---- lmms-eval's interface ----

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str] = [""] * len(requests)
        groups: dict[tuple, list[int]] = {}  # requests with the same options run together, in order
        plans = []
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            options = self._options(gen_kwargs)
            doc = self._doc(task, split, doc_id)
            images = lambda f=doc_to_visual, d=doc: self._images(f, d)  # noqa: E731 -- decoded when its batch runs
            item = Item({"doc_id": doc_id, "task": task}, [], context, source=images)
            plans.append((item, options, until))
            groups.setdefault((astuple(options), tuple(until)), []).append(i)
        for indices in groups.values():
            _, options, until = plans[indices[0]]
            items = [plans[i][0] for i in indices]
            answered = run_items(items, self.model, self.processor, options, self.batch_size)
            for i, item in zip(indices, answered, strict=True):
                if item.error is not None:
                    print(f"vlm: error: {item.row['task']} doc {item.row['doc_id']}: {item.error}", file=sys.stderr)
                    continue
                text = item.prediction
                for stop in until:  # the stop strings themselves are not part of the answer
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                answers[i] = text
        return answers

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch_size):
            results += self._loglikelihood_batch(requests[start : start + self.batch_size])
        return results

    def _loglikelihood_batch(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        processor = self.processor
        seqs, spans, images = [], [], []
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else str(target(doc))
            pics = self._images(doc_to_visual, doc)
            # encode, not prompt: lmms-eval may ask about an empty context (unconditional likelihoods).
            ctx, _ = processor.encode([{"role": "user", "content": context}], len(pics), add_generation_prompt=True)
            cont = processor.text_ids(continuation)
            if processor.max_length is not None and len(ctx) + len(cont) > processor.max_length:
                raise VLMError(
                    f"{task} doc {doc_id}: context and continuation are {len(ctx) + len(cont)} tokens, more than "
                    f"the decoder's {processor.max_length}"
                )
            seqs.append(ctx + cont)
            spans.append((len(ctx), len(ctx) + len(cont)))
            images += pics
        batch = processor.pad(seqs, "right")
        pixels = processor.transform(images) if images else None
        logits = self.model(
            batch["input_ids"].to(self.device),
            batch["attention_mask"].to(self.device),
            pixels.to(self.device) if pixels is not None else None,
        ).logits
        out = []
        for i, (s, e) in enumerate(spans):
            if s == e:
                out.append((0.0, True))
                continue
            # Position t predicts token t+1, so the continuation's tokens s..e-1 are scored by positions s-1..e-2.
            logprobs = logits[i, s - 1 : e - 1].float().log_softmax(-1)
            tokens = batch["input_ids"][i, s:e].to(self.device)
            total = logprobs.gather(-1, tokens[:, None]).sum().item()
            out.append((total, bool((logprobs.argmax(-1) == tokens).all())))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("vlm models answer single-turn requests (generate_until, loglikelihood)")


def manifest():
    """This model's registration, for the entry-point group "lmms_eval.models" (see pyproject.toml).

    A function, not a constant: lmms-eval loads entry points while `lmms_eval.models` initializes, so this module
    must not import `lmms_eval.models` at import time (a circular import would hide the model).
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vlm", simple_class_path="vlm.eval.lmms_adapter.VLMForLmmsEval")
