"""Dynamic batching for the server: requests that arrive together decode together, through `generate_texts`.

A `Batcher` owns one worker thread and a bounded queue of `Job`s. The worker takes the oldest job and, after a short
wait for company (`wait_s`), the queued jobs that can share its decode (the same sampling options; prompts and
lengths that fit the context together), up to `max_batch_size`, and runs them as one batch. Each step's tokens reach
each job through `generate_texts(on_tokens=...)`; a job finishes at its end-of-turn token, at its own `max_tokens`,
at a stop string, or when it is cancelled (its client left), and the batch ends when all of its jobs have.

An `ExplainJob` (an explanation map, `vlm.explain`) waits in the same queue, under the same limits, and runs alone on
the same thread: the model is never used by two things at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vlm.decoder import context_length
from vlm.errors import VLMError
from vlm.explain import explain_answer
from vlm.generation import GenerationOptions, generate_texts

log = logging.getLogger("vlm.server")


class QueueFull(Exception):
    """The queue holds `max_queue` jobs already."""


class TextTracker:
    """A job's answer, token by token: the text to send so far and why it ended.

    The text is the decoded tokens stripped of surrounding whitespace, as `generate_texts` answers, cut before the
    first stop string. What is sent while streaming never has to be taken back: trailing whitespace, an incomplete
    character and the start of a possible stop string wait for the next token.
    """

    def __init__(self, decode: Callable[[list[int]], str], end_ids: set[int], stops: list[str], max_tokens: int):
        self.decode, self.end_ids, self.stops, self.max_tokens = decode, end_ids, stops, max_tokens
        self.tokens: list[int] = []
        self.sent = ""
        self.finish_reason: str | None = None  # "stop" (end of turn or a stop string) or "length"

    def add(self, token: int) -> str:
        """Takes the next token; returns the text that may be sent now (often empty)."""
        if token in self.end_ids:
            self.finish_reason = "stop"
        else:
            self.tokens.append(token)
            if len(self.tokens) >= self.max_tokens:
                self.finish_reason = "length"
        text = self.decode(self.tokens).lstrip()
        cut = min((i for s in self.stops if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            text, self.finish_reason = text[:cut], "stop"
        if self.finish_reason is None:
            text = text.rstrip("\ufffd")  # a character whose bytes are not all there yet
            held = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - held]
        text = text.rstrip()
        new = text[len(self.sent) :] if len(text) > len(self.sent) else ""
        self.sent += new
        return new


@dataclass(eq=False)
class Job:
    """One request in the batcher. `emit(kind, payload)` is called from the worker thread: ("text", str) as the answer
    grows, then ("done", finish reason) or ("error", (status, message)); a cancelled job gets no more calls."""

    id: str
    question: str
    history: list[dict[str, str]]
    images: list[Image.Image]
    prompt_tokens: int
    max_tokens: int
    tracker: TextTracker
    emit: Callable[[str, Any], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    cancelled: bool = False
    batch_size: int = 0  # the size of the batch it decoded in
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can decode in one batch: greedy ones all together; sampling ones with the same
        options; a seeded sampling job alone, so that its seed gives the same answer whatever else is queued."""
        if self.temperature == 0:
            return ("greedy",)
        return ("sample", self.temperature, self.top_p) if self.seed is None else ("seeded", self.id)

    def step(self, token: int) -> bool:
        """Takes this job's next token; True once the job needs no more."""
        if self.cancelled or self.tracker.finish_reason is not None:
            return True
        text = self.tracker.add(token)
        if text:
            self.emit("text", text)
        if self.tracker.finish_reason is not None:
            self.emit("done", self.tracker.finish_reason)
            return True
        return False


@dataclass(eq=False)
class ExplainJob:
    """A request for the explanation map of an answer about one image (`explain_answer`; `answer` None: the model's
    greedy answer, up to `max_tokens`). `emit` as for a `Job`: ("done", the explanation's JSON) or ("error", (status,
    message))."""

    id: str
    question: str
    image: Image.Image
    answer: str | None
    method: str
    prompt_tokens: int
    max_tokens: int
    emit: Callable[[str, Any], None]
    cancelled: bool = False
    batch_size: int = 0
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple:
        """Its own: an explanation runs alone."""
        return ("explain", self.id)

    def run(self, model, processor) -> None:
        options = GenerationOptions(max_new_tokens=self.max_tokens)
        result = explain_answer(model, processor, self.image, self.question, self.method, options, self.answer)
        if not self.cancelled:
            self.emit("done", result.to_json())


class Batcher:
    """The queue and the worker thread that decodes it, batch by batch (see the module's docstring).

    `on_batch(size, new_tokens, seconds)` is called after each batch (for the metrics)."""

    def __init__(
        self,
        model,
        processor,
        max_batch_size: int,
        max_queue: int,
        wait_s: float = 0.01,
        on_batch: Callable[[int, int, float], None] | None = None,
    ):
        self.model, self.processor = model, processor
        self.max_batch_size, self.max_queue, self.wait_s = max_batch_size, max_queue, wait_s
        self.on_batch = on_batch
        self.context = context_length(model.decoder)
        self.pending: deque[Job | ExplainJob] = deque()
        self.running: list[Job | ExplainJob] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="vlm-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            for job in self.running:
                job.cancelled = True
            self.cond.notify_all()
        self.thread.join()

    def submit(self, job: Job | ExplainJob) -> None:
        """Queues `job`; raises `QueueFull` when `max_queue` jobs are waiting already."""
        with self.cond:
            if len(self.pending) >= self.max_queue:
                raise QueueFull
            self.pending.append(job)
            self.cond.notify_all()

    def cancel(self, job: Job | ExplainJob) -> None:
        """Drops `job`: out of the queue at once, or out of its batch at the next step."""
        with self.cond:
            job.cancelled = True
            if job in self.pending:
                self.pending.remove(job)

    @property
    def queued(self) -> int:
        return len(self.pending)

    def fits(self, prompt_tokens: int, new_tokens: int) -> bool:
        """Whether a (batch) prompt of this length and this many new tokens fit the decoder's context."""
        return self.context is None or prompt_tokens + new_tokens <= self.context

    def _take(self) -> list[Job | ExplainJob]:
        """The next batch: the oldest job and those that can join it; empty when stopping."""
        with self.cond:
            while not self.pending and not self.stopping:
                self.cond.wait()
            deadline = time.monotonic() + self.wait_s
            while not self.stopping and len(self.pending) < self.max_batch_size:
                left = deadline - time.monotonic()
                if left <= 0 or not self.pending:
                    break
                self.cond.wait(left)
            if self.stopping or not self.pending:
                return []
            first = self.pending[0]
            batch, longest, most = [], 0, 0
            for job in self.pending:
                if len(batch) == self.max_batch_size:
                    break
                longer, more = max(longest, job.prompt_tokens), max(most, job.max_tokens)
                if job.key == first.key and self.fits(longer, more):
                    batch.append(job)
                    longest, most = longer, more
            for job in batch:
                self.pending.remove(job)
                job.batch_size = len(batch)
            self.running = batch
            return batch

    def _loop(self) -> None:
        while batch := self._take():
            self._run(batch)
            with self.cond:
                self.running = []

    def _run(self, batch: list[Job | ExplainJob]) -> None:
        first = batch[0]
        if isinstance(first, ExplainJob):
            self._explain(first)
            return
        options = GenerationOptions(
            max_new_tokens=max(job.max_tokens for job in batch),
            temperature=first.temperature,
            top_p=first.top_p,
            seed=first.seed,
        )
        start = time.monotonic()
        try:
            generate_texts(
                self.model,
                self.processor,
                [job.question for job in batch],
                [job.images for job in batch],
                options,
                [job.history for job in batch],
                on_tokens=lambda ids: [job.step(token) for job, token in zip(batch, ids)],
            )
        except VLMError as e:
            self._fail(batch, 400, str(e))
        except Exception:  # a bug or the device failing: log it here, tell the clients no more than that
            log.exception("decoding a batch of %d failed", len(batch))
            self._fail(batch, 500, "the server failed to decode this request")
        else:
            for job in batch:  # the decode stopped on its own (e.g. at the context's end) before the job did
                if not job.cancelled and job.tracker.finish_reason is None:
                    job.tracker.finish_reason = "length"
                    job.emit("done", "length")
        if self.on_batch is not None:
            tokens = sum(len(job.tracker.tokens) for job in batch)
            self.on_batch(len(batch), tokens, time.monotonic() - start)

    def _explain(self, job: ExplainJob) -> None:
        try:
            job.run(self.model, self.processor)
        except VLMError as e:
            if not job.cancelled:
                job.emit("error", (400, str(e)))
        except Exception:  # as for a batch: the log has the details, the client a line
            log.exception("explaining %s failed", job.id)
            if not job.cancelled:
                job.emit("error", (500, "the server failed to explain this answer"))

    @staticmethod
    def _fail(batch: list[Job], status: int, message: str) -> None:
        for job in batch:
            if not job.cancelled and job.tracker.finish_reason is None:
                job.emit("error", (status, message))
