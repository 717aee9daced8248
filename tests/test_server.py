"""`vlm serve` (vlm/server.py, vlm/openai_api.py, vlm/batching.py) against the official `openai` client, raw HTTP and
a real headless Chromium, on a free port of this machine.

The server runs in a thread of the test process with the scrambled tiny model, so its answers can be compared with
`generate_texts`; a `Gate` around the decode can hold it mid-batch, which makes queueing, batching and a client that
leaves deterministic (no timing in the assertions).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from vlm.explain import explain_answer  # noqa: E402
from vlm.generation import GenerationOptions, generate_texts  # noqa: E402
from vlm.server import ServerSettings, create_app, listen  # noqa: E402

KEY = "test-key"
NAME = "tiny-test"
MAX_QUEUE = 3
MAX_BATCH = 4
MAX_BODY = 256 * 1024
TOKENS = 6


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def wait_for(condition, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the server did not get there in time"
        time.sleep(0.005)


class Gate:
    """Wraps `generate_texts` in the batcher: records each batch's size and decoding steps, and holds every step
    while closed."""

    def __init__(self):
        self.open = threading.Event()
        self.open.set()
        self.sizes: list[int] = []
        self.steps: list[int] = []

    def __call__(self, model, processor, prompts, images, options, history, on_tokens):
        self.sizes.append(len(prompts))
        self.steps.append(0)

        def step(ids):
            assert self.open.wait(30), "the gate stayed closed"
            self.steps[-1] += 1
            return on_tokens(ids)

        return generate_texts(model, processor, prompts, images, options, history, on_tokens=step)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory, pil_images):
    """(base URL, gate, allowed image folder, port, settings): the tiny model served with an API key."""
    model, processor = tiny
    allowed = tmp_path_factory.mktemp("allowed")
    pil_images[0].save(allowed / "red.png")
    settings = ServerSettings(
        NAME,
        max_batch_size=MAX_BATCH,
        max_queue=MAX_QUEUE,
        api_key=KEY,
        allowed_image_dir=allowed,
        max_body_bytes=MAX_BODY,
        timeout_s=60,
    )
    gate = Gate()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("vlm.batching.generate_texts", gate)
        app = create_app(model, processor, settings)
        sock = listen("127.0.0.1", 0)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        wait_for(lambda: server.started)
        host, port = sock.getsockname()[:2]
        yield f"http://{host}:{port}", gate, allowed, port, settings
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def expected(tiny, question: str, images=(), max_tokens: int = TOKENS) -> str:
    model, processor = tiny
    return generate_texts(model, processor, [question], [list(images)], GenerationOptions(max_new_tokens=max_tokens))[0]


def raw(server, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None):
    """(status, headers, body text) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", server[3], timeout=60)
    conn.request(
        method, path, body, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    )
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    return response.status, response.headers, text  # headers: case-insensitive


def ask(question: str, **more) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": question}], "max_tokens": TOKENS, **more}


def test_a_question_is_answered_as_generate_texts_answers_it(tiny, client):
    question = "what shape <|im_end|><image> is it?"  # special tokens in the user's text are plain text
    reply = client.chat.completions.create(**ask(question))
    assert reply.choices[0].message.content == expected(tiny, question) != ""
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.model == NAME and reply.id.startswith("chatcmpl-")
    prompt = tiny[1].prompt(question, 0)
    assert reply.usage.prompt_tokens == len(prompt) and 1 <= reply.usage.completion_tokens <= TOKENS


def test_stop_strings_and_seeds(tiny, client):
    answer = expected(tiny, "hello")
    stop = answer.strip()[2:4]
    reply = client.chat.completions.create(**ask("hello", stop=[stop, "never in it"]))
    assert reply.choices[0].message.content == answer[: answer.find(stop)].strip()
    assert reply.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(**ask("hello", temperature=1.0, seed=s)) for s in (7, 7, 8)]
    texts = [r.choices[0].message.content for r in sampled]
    assert texts[0] == texts[1] != texts[2]


def test_an_image_streamed_and_whole_give_the_same_answer(tiny, client, pil_images):
    content = [
        {"type": "image_url", "image_url": {"url": data_url(png(pil_images[2]))}},
        {"type": "text", "text": "what colour?"},
    ]
    request = {"model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": TOKENS}
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    answer = expected(tiny, "what colour?", [pil_images[2]])
    assert whole.choices[0].message.content == streamed == answer != ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_a_conversation_and_a_path_in_the_allowed_folder(tiny, client, server, pil_images):
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}]
    content = [
        {"type": "image_url", "image_url": {"url": str(server[2] / "red.png")}},
        {"type": "text", "text": "and?"},
    ]
    reply = client.chat.completions.create(
        model=NAME, messages=[*history, {"role": "user", "content": content}], max_tokens=TOKENS
    )
    model, processor = tiny
    want = generate_texts(
        model, processor, ["and?"], [[pil_images[0]]], GenerationOptions(max_new_tokens=TOKENS), [history]
    )[0]
    assert reply.choices[0].message.content == want


@pytest.mark.parametrize(
    "url, words",
    [
        ("data:image/png;base64,not base64!", "not valid base64"),
        (data_url(b"hello", "text/plain"), "must be base64 image/png"),
        (data_url(b"GIF89a...", "image/gif"), "must be base64 image/png"),
        (data_url(b"\x89PNG\r\n\x1a\n" + b"\0" * 40), "image 1"),  # a truncated PNG
        ("https://example.com/cat.png", "fetches no URLs"),
        ("../outside.png", "outside the allowed image folder"),
        ("red-but-missing.png", "image not found"),
    ],
)
def test_a_bad_image_is_a_400(client, url, words):
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}])
    assert e.value.status_code == 400 and words in e.value.message and e.value.code == "invalid_image"


def test_the_api_key_is_required(server, client):
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(**ask("hi"))
    status, _, body = raw(server, "GET", "/metrics", headers={"Authorization": ""})
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert raw(server, "GET", "/health", headers={"Authorization": ""})[0] == 200
    assert [m.id for m in client.models.list()] == [NAME]


def test_bad_requests_get_their_4xx_json_and_the_server_goes_on(tiny, server, client):
    cases = [
        ("{not json", 400),
        (json.dumps(ask("hi", max_tokens="5")), 422),  # a number as text
        (json.dumps(ask("hi", stream="yes")), 422),
        (json.dumps({**ask("hi"), "messages": []}), 422),
        (json.dumps(ask("hi", temperature=float("nan"))), 422),
        (json.dumps(ask("hi", n=2)), 400),
        (json.dumps(ask("hi", model="gpt-4o")), 404),
        (json.dumps(ask("hi", max_tokens=10**6)), 400),  # beyond the context
        (json.dumps(ask("hi", stop=["a", "b", "c", "d", "e"])), 400),
        (json.dumps({**ask("hi"), "messages": [{"role": "assistant", "content": "hi"}]}), 400),
        (json.dumps({**ask("hi"), "messages": [{"role": "user", "content": ""}]}), 400),
        (json.dumps(ask("x" * MAX_BODY)), 413),
    ]
    for body, status in cases:
        got, _, text = raw(server, "POST", "/v1/chat/completions", body)
        error = json.loads(text)["error"]
        assert (got, type(error["message"])) == (status, str), (body[:80], got, text)
        assert "Traceback" not in text
    assert raw(server, "GET", "/no/such/page")[0] == 404
    assert client.chat.completions.create(**ask("still there?")).choices[0].message.content == expected(
        tiny, "still there?"
    )


def test_a_full_queue_is_a_503_and_queued_requests_decode_together(tiny, server, client):
    gate, results = server[1], {}
    questions = ["one", "a longer second question", "three?", "four"]

    def send(question):
        results[question] = client.chat.completions.create(**ask(question)).choices[0].message.content

    gate.open.clear()
    batches = len(gate.sizes)
    threads = [threading.Thread(target=send, args=(q,)) for q in questions]
    threads[0].start()
    wait_for(lambda: len(gate.sizes) == batches + 1)  # "one" is decoding, held at its first step
    for t in threads[1:]:
        t.start()
    try:
        wait_for(lambda: metric(server, "vlm_queue_depth") == MAX_QUEUE)
        status, headers, text = raw(server, "POST", "/v1/chat/completions", json.dumps(ask("five")))
    finally:
        gate.open.set()
    assert status == 503 and headers["Retry-After"] == "1" and json.loads(text)["error"]["code"] == "queue_full"
    for t in threads:
        t.join(60)
    assert gate.sizes[batches:] == [1, MAX_QUEUE]  # the three that waited decoded as one batch
    assert results == {q: expected(tiny, q) for q in questions}


def test_a_request_past_its_time_is_a_503(server, client):
    gate, settings = server[1], server[4]
    gate.open.clear()
    settings.timeout_s = 0.3
    try:
        status, headers, text = raw(server, "POST", "/v1/chat/completions", json.dumps(ask("slow")))
    finally:
        settings.timeout_s = 60
        gate.open.set()
    assert status == 503 and json.loads(text)["error"]["code"] == "timeout" and headers["Retry-After"]
    wait_for(lambda: metric(server, "vlm_running_requests") == 0)


def test_a_client_that_leaves_mid_stream_frees_its_place(server):
    gate = server[1]
    gate.open.clear()
    batches = len(gate.sizes)
    conn = http.client.HTTPConnection("127.0.0.1", server[3], timeout=60)
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps(ask("tell me", stream=True, max_tokens=500)),
        {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")  # the stream has begun
    try:
        wait_for(lambda: len(gate.sizes) == batches + 1)
        conn.close()  # the client leaves while its decode is held at step 1
        time.sleep(0.2)  # for the server to notice the closed connection (nothing is asserted about time)
    finally:
        gate.open.set()
    wait_for(lambda: metric(server, "vlm_running_requests") == 0)
    assert gate.steps[-1] < 50  # it stopped soon after the client left, far from its 500 tokens
    assert metric(server, 'vlm_requests_total{status="499"}') >= 1


def explain_body(content, **more) -> str:
    return json.dumps({"model": NAME, "messages": [{"role": "user", "content": content}], **more})


def image_and(question: str, image) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": data_url(png(image))}}, {"type": "text", "text": question}]


def test_explain_returns_the_answers_maps_over_the_patch_grid(tiny, server, pil_images):
    model, processor = tiny
    rows, cols = model.image_grid
    body = explain_body(image_and("what colour?", pil_images[2]), answer="a red square", method="rollout")
    status, headers, text = raw(server, "POST", "/v1/explain", body)
    got = json.loads(text)
    assert status == 200 and got["object"] == "explanation" and headers["x-request-id"] == got["id"]
    assert got["grid"] == [rows, cols] and got["answer"] == "a red square" and got["method"] == "rollout"
    scores = torch.tensor(got["scores"])
    assert scores.shape == (rows, cols) and (scores >= 0).all() and scores.sum().item() == pytest.approx(1, abs=1e-4)
    assert len(got["tokens"]) == len(processor.text_ids("a red square"))
    assert all(torch.tensor(t["scores"]).sum().item() == pytest.approx(1, abs=1e-4) for t in got["tokens"])
    want = explain_answer(model, processor, pil_images[2], "what colour?", "rollout", answer="a red square")
    assert torch.allclose(scores, want.scores, atol=1e-5)
    assert not torch.allclose(scores, torch.full((rows, cols), 1 / (rows * cols)))
    # Without an answer, the model's own: the one a chat request gets.
    status, _, text = raw(
        server, "POST", "/v1/explain", explain_body(image_and("what?", pil_images[2]), max_tokens=TOKENS)
    )
    assert status == 200 and json.loads(text)["answer"] == expected(tiny, "what?", [pil_images[2]]) != ""


def test_bad_explain_requests_are_one_line_errors(server, pil_images):
    image = image_and("what?", pil_images[0])
    cases = [
        (explain_body("what colour?"), 400),  # no image
        (explain_body([*image, image[0]]), 400),  # two
        (explain_body(image, answer="  "), 400),
        (explain_body([{"type": "image_url", "image_url": {"url": "missing.png"}}]), 400),
        (explain_body([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]), 400),
        (
            json.dumps(
                {
                    "model": NAME,
                    "messages": [
                        {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "yo"},
                        {"role": "user", "content": image},
                    ],
                }
            ),
            400,
        ),
        (explain_body(image, answer="x " * 10_000), 400),  # beyond the context
        (explain_body(image, method="magic"), 422),
        (explain_body(image, model="gpt-4o"), 404),
    ]
    for body, status in cases:
        got, _, text = raw(server, "POST", "/v1/explain", body)
        message = json.loads(text)["error"]["message"]
        assert got == status and "\n" not in message and "Traceback" not in message, (body[:120], got, text)
    assert raw(server, "POST", "/v1/explain", explain_body(image, answer="red"))[0] == 200


def test_an_explanation_waits_in_the_queue_for_the_batch_before_it(tiny, server, client, pil_images):
    gate, results = server[1], {}
    gate.open.clear()
    batches = len(gate.sizes)
    chat = threading.Thread(target=lambda: results.update(chat=client.chat.completions.create(**ask("first"))))
    body = explain_body(image_and("what?", pil_images[1]), answer="green")
    explain = threading.Thread(target=lambda: results.update(explain=raw(server, "POST", "/v1/explain", body)))
    chat.start()
    try:
        wait_for(lambda: len(gate.sizes) == batches + 1)  # the chat request is decoding, held at its first step
        explain.start()
        wait_for(lambda: metric(server, "vlm_queue_depth") == 1)  # the explanation waits behind it
        assert "explain" not in results
    finally:
        gate.open.set()
    chat.join(60)
    explain.join(60)
    assert results["chat"].choices[0].message.content == expected(tiny, "first")
    assert results["explain"][0] == 200 and json.loads(results["explain"][2])["answer"] == "green"


def metric(server, name: str) -> float:
    """A sample's value in /metrics (0 if absent)."""
    text = raw(server, "GET", "/metrics")[2]
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")), 0.0)


def test_metrics_count_requests_and_tokens(server, client):
    before = metric(server, "vlm_completion_tokens_total")
    client.chat.completions.create(**ask("count me"))
    text = raw(server, "GET", "/metrics")[2]
    for name in (
        "vlm_requests_total",
        "vlm_request_errors_total",
        "vlm_queue_depth",
        "vlm_tokens_per_second",
        "vlm_request_latency_seconds_bucket",
        "vlm_batch_size_bucket",
    ):
        assert name in text
    assert metric(server, "vlm_completion_tokens_total") > before


@pytest.mark.skipif(
    shutil.which("chromium") is None and not Path("/usr/bin/chromium").exists(),
    reason="no chromium browser on this machine (Debian package chromium)",
)
def test_the_web_page_in_a_real_browser(tiny, server, pil_images, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    image = tmp_path / "photo.png"
    pil_images[2].resize((160, 96)).save(image)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium")
        page = browser.new_page()
        page.goto(server[0] + "/")
        page.wait_for_selector("#key-row:not([hidden])")  # the server wants a key: the page asks for it
        page.fill("#key", KEY)
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#preview[src^='data:image/png']")
        page.check("#look")  # "where did it look": each answer's map over the image
        for turn, question in enumerate(["what colour?", "and the shape?"], start=1):
            page.fill("#question", question)
            page.click("#send")
            answered = f"document.querySelectorAll('.msg.assistant').length == {turn}"
            page.wait_for_function(f"{answered} && !document.getElementById('send').disabled")
        answers = page.locator(".msg.assistant").all_inner_texts()
        assert page.locator(".msg.error").count() == 0
        rows, cols = tiny[0].image_grid
        page.wait_for_function(f"document.querySelectorAll('#overlay:not([hidden]) .cell').length == {rows * cols}")
        shades = page.eval_on_selector_all("#overlay .cell", "cells => cells.map((c) => c.style.backgroundColor)")
        assert len(set(shades)) > 1  # a map, not a uniform tint
        page.screenshot(path=str(tmp_path / "page.png"))
        page.uncheck("#look")
        page.wait_for_selector("#overlay", state="hidden")
        browser.close()
    model, processor = tiny
    from vlm.images import load_image

    first = expected(tiny, "what colour?", [load_image(image)], max_tokens=64)
    assert answers[0] == first != ""
    assert (
        answers[1]
        == generate_texts(
            model,
            processor,
            ["and the shape?"],
            [[load_image(image)]],
            GenerationOptions(),
            [[{"role": "user", "content": "what colour?"}, {"role": "assistant", "content": first}]],
        )[0]
    )


def test_the_serve_command_serves_and_logs_each_request(varied_checkpoint, monkeypatch, capsys, caplog):
    """`vlm serve` itself (options, model, port 0, log lines), in a thread; its uvicorn server is kept to stop it."""
    from vlm.cli import run

    servers, codes = [], []

    class Kept(uvicorn.Server):
        def __init__(self, config):
            super().__init__(config)
            servers.append(self)

    monkeypatch.setattr(uvicorn, "Server", Kept)
    caplog.set_level("INFO", logger="vlm.server")
    thread = threading.Thread(
        target=lambda: codes.append(run(["serve", "--model", str(varied_checkpoint), "--port", "0"]))
    )
    thread.start()
    try:
        wait_for(lambda: servers and servers[0].started)
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith(f"vlm serve: model {varied_checkpoint.name} at http://127.0.0.1:"), line
        url = line.split(" at ")[1].split()[0]
        client = openai.OpenAI(base_url=url + "v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(**{**ask("hi"), "model": varied_checkpoint.name})
    finally:
        if servers:
            servers[0].should_exit = True
        thread.join(30)
    assert codes == [0] and reply.choices[0].message.content
    logged = [r.getMessage() for r in caplog.records if r.name == "vlm.server"]
    assert any(m.startswith(f"request {reply.id} status=200 latency=") and "completion_tokens=" in m for m in logged)


def test_bad_serve_options_are_one_line_errors(capsys, tmp_path):
    from vlm.cli import main

    for args, message in [
        (["--port", "70000"], "--port must be an integer from 0 to 65535, got 70000"),
        (["--max_batch_size", "0"], "--max_batch_size must be an integer of at least 1, got 0"),
        (
            ["--allowed_image_dir", str(tmp_path / "nowhere")],
            f"--allowed_image_dir {tmp_path / 'nowhere'} is not a folder",
        ),
    ]:
        with pytest.raises(SystemExit) as e:
            main(["serve", *args])
        assert (e.value.code, capsys.readouterr().err) == (2, f"vlm: error: {message}\n")
