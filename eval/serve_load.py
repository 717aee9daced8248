"""A load test of `vlm serve` on this machine: batched decoding against one request at a time, in one run.

`python -m vlm.eval.serve_load --model DIR` starts two servers on free loopback ports, the same model in each: one
that batches (`--max_batch_size`, default 32) and one with `--max_batch_size 1`. It first sends every distinct request
once, one at a time, to get the single-request (greedy) answers and the one-at-a-time throughput; then `clients`
concurrent clients send `requests` requests each to each server in turn (for `rounds` rounds, alternating, so the
machine's other work falls on both alike). It reports requests per second, new tokens per second, p50/p99 latency,
errors, and how many answers differ from the single-request answer. Traffic goes to 127.0.0.1 only, and every loop is
bounded. Needs the dev extra (the `openai` client).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

QUESTIONS = [
    "What is the shape of the red object?",
    "What colour is the object at the top?",
    "How many circles are there?",
    "What shape is the object closest to the blue one?",
    "Is there a green square?",
]
IMAGES = Path(__file__).resolve().parent.parent / "samples" / "images"


@dataclass
class Phase:
    """The figures of one phase."""

    name: str
    requests: int
    errors: int
    differing: int  # answers that differ from the single-request answer
    seconds: float
    requests_per_s: float
    tokens_per_s: float
    p50_s: float
    p99_s: float


def _requests(model_name: str, clients: int, per_client: int, max_tokens: int) -> list[list[dict]]:
    """Each client's requests: sample images and questions in a fixed mix."""
    images = sorted(IMAGES.glob("*.png"))
    urls = [f"data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}" for p in images]
    out = []
    for c in range(clients):
        row = []
        for r in range(per_client):
            k = c * per_client + r
            content = [
                {"type": "image_url", "image_url": {"url": urls[k % len(urls)]}},
                {"type": "text", "text": QUESTIONS[(k // len(urls)) % len(QUESTIONS)]},
            ]
            row.append(
                {
                    "model": model_name,
                    "messages": [{"role": "user", "content": content}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                }
            )
        out.append(row)
    return out


def _key(request: dict) -> str:
    return json.dumps(request, sort_keys=True)


class Server:
    """`vlm serve` in a subprocess on a free loopback port; its log goes to a temporary file."""

    def __init__(self, model: str, max_batch_size: int, timeout: float = 600):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="vlm-serve-", suffix=".log", delete=False)
        # A queue and a timeout that hold every client's requests: the test measures pace, not refusals.
        args = [
            sys.executable,
            "-m",
            "vlm.cli",
            "serve",
            "--model",
            model,
            "--port",
            "0",
            "--max_batch_size",
            str(max_batch_size),
            "--max_queue",
            "1024",
            "--timeout",
            "3600",
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        deadline = time.monotonic() + timeout
        while (url := self._url()) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vlm serve did not start: {Path(self.log.name).read_text()}")
            time.sleep(0.2)
        self.url = url

    def _url(self) -> str | None:
        for line in Path(self.log.name).read_text().splitlines():
            if line.startswith("vlm serve: model"):
                return line.split(" at ")[1].split()[0]
        return None

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        os.unlink(self.log.name)


async def _send(client, request: dict) -> tuple[float, str | None, int, str | None]:
    """(seconds, answer, new tokens, error) of one request."""
    start = time.perf_counter()
    try:
        reply = await client.chat.completions.create(**request)
    except Exception as e:  # every failure is counted and reported, not raised
        return time.perf_counter() - start, None, 0, f"{type(e).__name__}: {e}"
    return time.perf_counter() - start, reply.choices[0].message.content, reply.usage.completion_tokens, None


async def _phase(name: str, url: str, plan: list[list[dict]], reference: dict[str, str]) -> Phase:
    """All clients at once, each sending its requests in turn."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=url + "v1", api_key="none", max_retries=0, timeout=600) as client:

        async def one_client(requests: list[dict]) -> list:
            return [(r, await _send(client, r)) for r in requests]

        start = time.perf_counter()
        results = [x for row in await asyncio.gather(*(one_client(r) for r in plan)) for x in row]
        seconds = time.perf_counter() - start
    return _figures(name, results, seconds, reference)


def _figures(name: str, results: list, seconds: float, reference: dict[str, str]) -> Phase:
    latencies = sorted(r[1][0] for r in results)
    errors = [r[1][3] for r in results if r[1][3]]
    differing = sum(1 for req, (_, answer, _, err) in results if err is None and answer != reference[_key(req)])
    tokens = sum(r[1][2] for r in results)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    if errors:
        print(f"{name}: {len(errors)} errors, the first: {errors[0]}", file=sys.stderr)
    return Phase(
        name,
        len(results),
        len(errors),
        differing,
        round(seconds, 3),
        round(len(results) / seconds, 2),
        round(tokens / seconds, 1),
        round(statistics.median(latencies), 4),
        round(p99, 4),
    )


async def _one_at_a_time(url: str, plan: list[list[dict]]) -> tuple[dict[str, str], Phase]:
    """Every distinct request once, in turn: the single-request answers, and that pace as a phase."""
    from openai import AsyncOpenAI

    distinct = list({_key(r): r for row in plan for r in row}.values())
    async with AsyncOpenAI(base_url=url + "v1", api_key="none", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        results = [(r, await _send(client, r)) for r in distinct]
        seconds = time.perf_counter() - start
    reference = {_key(r): answer for r, (_, answer, _, _) in results}
    return reference, _figures("one at a time", results, seconds, reference)


def serve_load(
    model: str | None = None,
    clients: int = 32,
    requests: int = 8,
    max_tokens: int = 32,
    max_batch_size: int = 32,
    rounds: int = 2,
    output: str | None = None,
) -> list[dict]:
    """Load-test `vlm serve` (127.0.0.1 only): batched against --max_batch_size 1 and one request at a time.

    Args:
        model: A vlm checkpoint folder (default: samples/shapes-model/).
        clients: Concurrent clients.
        requests: Requests each client sends, one after another.
        max_tokens: max_tokens of each request (greedy).
        max_batch_size: The batching server's --max_batch_size.
        rounds: Rounds of (batched, batch size 1), alternating.
        output: Also write the figures here (JSON).
    """
    from vlm.checkpoint import DEFAULT_MODEL_DIR

    model = model or str(DEFAULT_MODEL_DIR)
    plan = _requests(Path(model).resolve().name, clients, requests, max_tokens)
    batched, single = Server(model, max_batch_size), Server(model, 1)
    try:
        reference, sequential = asyncio.run(_one_at_a_time(single.url, plan))
        phases = [sequential]
        for _ in range(rounds):
            phases.append(asyncio.run(_phase(f"batched (max {max_batch_size})", batched.url, plan, reference)))
            phases.append(asyncio.run(_phase("max_batch_size 1", single.url, plan, reference)))
    finally:
        batched.close()
        single.close()
    rows = [asdict(p) for p in phases]
    print(f"{clients} clients x {requests} requests, max_tokens {max_tokens}, model {model}")
    print("| phase | requests | errors | differing | s | requests/s | new tokens/s | p50 s | p99 s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in phases:
        print(
            f"| {p.name} | {p.requests} | {p.errors} | {p.differing} | {p.seconds} | {p.requests_per_s} | "
            f"{p.tokens_per_s} | {p.p50_s} | {p.p99_s} |"
        )
    if output:
        Path(output).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(serve_load)
