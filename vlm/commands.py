"""The inference subcommands of the `vlm` console script: caption, ask, chat, serve, init.

Each is a typed function; `vlm/cli.py` builds its command line and `--help` from the signature and docstring.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from vlm.errors import OptionError, VLMError
from vlm.files import atomic_file, check_input_file, check_name_lengths, check_output_file
from vlm.generation import GenerationOptions, generate_texts
from vlm.inference import Device, DType, Item, items_from_inputs, items_from_jsonl, run_items


def _emit(items: Iterator[Item], output: str | None, as_json: bool, single: bool, streamed: bool) -> int:
    """Writes results (JSONL file, JSON lines or plain text) as they come; returns how many items failed. An output
    file appears only once complete."""
    failed = total = 0
    with atomic_file(output) if output else contextlib.nullcontext(sys.stdout) as out:
        for item in items:
            total += 1
            if item.error:
                failed += 1
                print(f"vlm: error: {item.error}", file=sys.stderr)
            if output or as_json:
                out.write(json.dumps(item.result(), ensure_ascii=False) + "\n")
            elif item.error is None:
                if streamed:
                    continue  # already printed token by token
                out.write(item.prediction + "\n" if single else f"{item.row.get('image', '')}\t{item.prediction}\n")
            out.flush()
    if failed and total > 1:
        print(
            f"vlm: {failed} of {total} items failed" + (f" (see 'error' in {output})" if output else ""),
            file=sys.stderr,
        )
    return failed


def _open(model: str | None, device: str, dtype: str):
    from vlm.checkpoint import open_model

    return open_model(model, device, dtype)


def caption(
    inputs: list[str],
    model: str | None = None,
    output: str | None = None,
    batch_size: int = 8,
    device: Device = "auto",
    dtype: DType = "auto",
    json: bool = False,
    gen: GenerationOptions | None = None,
) -> int:
    """Caption images: image files, folders of images, or JSONL files of rows with an "image".

    Args:
        inputs: Image files, folders and/or JSONL files (image paths relative to the JSONL file).
        model: A vlm checkpoint folder (default: samples/shapes-model/, which knows only the synthetic
            shapes benchmark).
        output: Write JSONL here: each input row (or {"image": path}) plus "prediction", in input order.
        batch_size: Images per forward pass.
        device: Where to run: auto (CUDA when available), cpu, cuda or cuda:N (the GPU numbered N).
        dtype: Weights' precision: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.
        json: Print one JSON object per result instead of plain text.
        gen: Generation options.
    """
    from vlm.images import load_image

    gen = gen or GenerationOptions()
    if output is not None:
        check_output_file(output)
    if model is not None:
        check_name_lengths(model, "model folder")
    lone = check_name_lengths(inputs[0], "input") if len(inputs) == 1 else None
    if lone is not None and lone.suffix != ".jsonl" and not lone.is_dir():
        load_image(lone)  # a bad lone image is reported before the model is loaded
    net, processor = _open(model, device, dtype)
    items, single = items_from_inputs(inputs, processor.caption_prompt)
    stream = single and not output and not json and sys.stdout.isatty()
    failed = _emit(run_items(items, net, processor, gen, batch_size, stream), output, json, single, stream)
    return 2 if failed else 0


def ask(
    image: str | None = None,
    question: str | None = None,
    input: str | None = None,
    model: str | None = None,
    output: str | None = None,
    batch_size: int = 8,
    device: Device = "auto",
    dtype: DType = "auto",
    json: bool = False,
    gen: GenerationOptions | None = None,
) -> int:
    """Answer a question about an image, or every row of a JSONL file of questions.

    Args:
        image: The image file (with QUESTION).
        question: The question about IMAGE.
        input: A JSONL file of rows {"image": path relative to the file, "question": ...} instead.
        model: A vlm checkpoint folder (default: samples/shapes-model/, which knows only the synthetic
            shapes benchmark).
        output: Write JSONL here: each input row plus "prediction", in input order.
        batch_size: Questions per forward pass.
        device: Where to run: auto (CUDA when available), cpu, cuda or cuda:N (the GPU numbered N).
        dtype: Weights' precision: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.
        json: Print one JSON object per result instead of plain text.
        gen: Generation options.
    """
    gen = gen or GenerationOptions()
    if input is not None and (image is not None or question is not None):
        raise VLMError("give either IMAGE QUESTION or --input FILE.jsonl, not both")
    if input is None and (image is None or question is None):
        raise VLMError("give IMAGE and QUESTION, or --input FILE.jsonl")
    if question is not None and not question.strip():
        raise VLMError("the question is empty")
    if input is not None:
        check_input_file(input, "input file")
    if output is not None:
        check_output_file(output)
    if image is not None:
        from vlm.images import load_image

        load_image(image)  # a bad image is reported before the model is loaded
    net, processor = _open(model, device, dtype)
    if input is not None:
        items, single = items_from_jsonl(Path(input), processor.caption_prompt), False
        for it in items:
            if it.error is None and "question" not in it.row:
                it.error = f"line {it.line}: the row has no 'question'"
    else:
        items, single = [Item({"image": image, "question": question}, [Path(image)], question)], True
    stream = single and not output and not json and sys.stdout.isatty()
    failed = _emit(run_items(items, net, processor, gen, batch_size, stream), output, json, single, stream)
    return 2 if failed else 0


CHAT_COMMANDS = """commands:
  /help          list these commands
  /reset         forget the conversation (the image stays)
  /image PATH    talk about another image (the conversation starts afresh)
  /exit          end the chat (so does Ctrl-D)"""


def _read_turn(interactive: bool) -> str | None:
    """The next line the user typed, stripped; None at the end of input. In a terminal, Ctrl-C drops the line."""
    if not interactive:
        text = sys.stdin.readline()
        return text.strip() if text else None
    while True:
        try:
            return input("you> ").strip()
        except EOFError:  # Ctrl-D
            print(file=sys.stderr)
            return None
        except KeyboardInterrupt:  # as in a shell: forget the line, ask again
            print(file=sys.stderr)


def _chat_command(text: str, state: dict) -> bool:
    """Runs a chat command (`/help`, `/reset`, `/image PATH`, `/exit`) on the session `state` ("image", "pixels",
    "history"); False when the chat should end. A bad command or image is one line on stderr; the chat goes on."""
    from vlm.images import load_image

    name, _, arg = text.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/help":
        print(CHAT_COMMANDS, file=sys.stderr)
    elif name == "/reset":
        state["history"] = []
        print("(conversation forgotten)", file=sys.stderr)
    elif name == "/image" and arg:
        try:
            state["pixels"] = [load_image(arg)]
        except VLMError as e:
            print(f"vlm: error: {e}", file=sys.stderr)
            return True
        state["image"], state["history"] = arg, []
        print(f"(now talking about {arg}; conversation forgotten)", file=sys.stderr)
    elif name == "/image":
        print("vlm: error: /image needs a path: /image PATH", file=sys.stderr)
    else:
        print(f"vlm: error: unknown command {name}; /help lists the commands", file=sys.stderr)
    return True


def chat(
    image: str,
    model: str | None = None,
    device: Device = "auto",
    dtype: DType = "auto",
    verbose: bool = False,
    gen: GenerationOptions | None = None,
) -> int:
    """Talk about an image, turn by turn. Reads your turns from the terminal (with line editing and history) or stdin;
    /help lists the commands (/reset, /image PATH, /exit); /exit or end of input (Ctrl-D) ends.

    Args:
        image: The image to talk about.
        model: A vlm checkpoint folder (default: samples/shapes-model/, which knows only the synthetic
            shapes benchmark).
        device: Where to run: auto (CUDA when available), cpu, cuda or cuda:N (the GPU numbered N).
        dtype: Weights' precision: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.
        verbose: Show on stderr each question exactly as it is sent to the model, with its turn in the conversation.
        gen: Generation options.
    """
    from vlm.checkpoint import DEFAULT_MODEL_DIR
    from vlm.images import load_image

    gen = gen or GenerationOptions()
    state = {"image": image, "pixels": [load_image(image)], "history": []}
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (importing it gives input() line editing and history)

        print(f"loading {model or DEFAULT_MODEL_DIR}...", file=sys.stderr, flush=True)
    net, processor = _open(model, device, dtype)
    if interactive:
        print(
            f"vlm chat: model {model or DEFAULT_MODEL_DIR}, image {image}\n"
            "Ask about the image; /help lists the commands, /exit or Ctrl-D ends.",
            file=sys.stderr,
        )
    while (text := _read_turn(interactive)) is not None:
        if text.startswith("/"):
            if not _chat_command(text, state):
                break
            continue
        if not text:
            continue
        if verbose:
            turn = len(state["history"]) // 2 + 1
            print(f"turn {turn}, question sent: {json.dumps(text, ensure_ascii=False)}", file=sys.stderr, flush=True)
        # No placeholder here: the processor puts the image into the conversation's first user turn, where the model
        # reads it (before the text, or after it with images_after_text), every turn alike.
        if interactive:
            print("vlm> ", end="", flush=True)
        try:
            answer = generate_texts(
                net, processor, [text], [state["pixels"]], gen, [state["history"]], stream=interactive
            )[0]
        except VLMError as e:  # e.g. the conversation outgrew the context: say so, keep the session
            print(f"vlm: error: {e}", file=sys.stderr)
            continue
        if not interactive:
            print(answer, flush=True)
        state["history"] += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
    return 0


API_KEY_VARIABLE = "VLM_API_KEY"


def serve(
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: Device = "auto",
    dtype: DType = "auto",
    max_batch_size: int = 8,
    max_queue: int = 64,
    timeout: float = 120.0,
    api_key: str | None = None,
    allowed_image_dir: str | None = None,
    max_body_mb: float = 20.0,
    max_images: int = 8,
) -> int:
    """Serve a model over HTTP: OpenAI's /v1/chat/completions (images as data URLs), and a web page at /.

    Requests that arrive together are decoded together (up to --max_batch_size); GET /health, /v1/models and
    /metrics (Prometheus) too. Ctrl-C stops it. Details: docs/serving.md.

    Args:
        model: A vlm checkpoint folder (default: samples/shapes-model/, which knows only the synthetic
            shapes benchmark).
        host: The address to listen on (127.0.0.1: this machine only; 0.0.0.0: every network, so set --api_key).
        port: The port to listen on (0: any free port; the address is printed).
        device: Where to run: auto (CUDA when available), cpu, cuda or cuda:N (the GPU numbered N).
        dtype: Weights' precision: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.
        max_batch_size: The most requests decoded together.
        max_queue: The most requests waiting for a batch; beyond it the server answers 503 with Retry-After.
        timeout: Seconds a request may take, waiting included, before it is dropped (503).
        api_key: Require "Authorization: Bearer KEY" (default: the VLM_API_KEY environment variable, which, unlike
            an option, other users of the machine cannot read; unset: no key).
        allowed_image_dir: A folder whose images requests may name by path (default: none; images come as data
            URLs only).
        max_body_mb: The largest request body, in MiB (413 beyond it).
        max_images: The most images in one request.
    """
    checks = [
        ("port", port, 0 <= port <= 65535, "an integer from 0 to 65535"),
        ("max_batch_size", max_batch_size, max_batch_size >= 1, "an integer of at least 1"),
        ("max_queue", max_queue, max_queue >= 1, "an integer of at least 1"),
        ("timeout", timeout, timeout > 0, "a number of seconds above 0"),
        ("max_body_mb", max_body_mb, max_body_mb > 0, "a number of MiB above 0"),
        ("max_images", max_images, max_images >= 0, "an integer, 0 or above"),
    ]
    for name, value, ok, accepted in checks:
        if not ok:
            raise OptionError(name, accepted, value)
    if allowed_image_dir is not None and not Path(allowed_image_dir).is_dir():
        raise VLMError(f"--allowed_image_dir {allowed_image_dir} is not a folder")
    try:
        import uvicorn

        from vlm.server import ServerSettings, create_app, listen
    except ModuleNotFoundError as e:
        raise VLMError(f"vlm serve needs {e.name}: pip install 'vlm[serve]'", exit_code=1) from None
    from vlm.checkpoint import DEFAULT_MODEL_DIR

    sock = listen(host, port)
    net, processor = _open(model, device, dtype)
    settings = ServerSettings(
        model_name=Path(model or DEFAULT_MODEL_DIR).resolve().name,
        max_batch_size=max_batch_size,
        max_queue=max_queue,
        timeout_s=timeout,
        api_key=api_key or os.environ.get(API_KEY_VARIABLE) or None,
        allowed_image_dir=Path(allowed_image_dir).resolve() if allowed_image_dir else None,
        max_body_bytes=int(max_body_mb * 2**20),
        max_images=max_images,
    )
    app = create_app(net, processor, settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    address, bound = sock.getsockname()[:2]
    shown = f"[{address}]" if ":" in address else address
    print(
        f"vlm serve: model {settings.model_name} at http://{shown}:{bound}/ (Ctrl-C stops)", file=sys.stderr, flush=True
    )
    # On Ctrl-C, requests still running get 5 s to finish before their connections are closed.
    config = uvicorn.Config(app, log_level="info", access_log=False, log_config=None, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def init(out_dir: str, preset: str = "tiny", seed: int = 0, pretrained: bool = False) -> int:
    """Write an UNTRAINED checkpoint of a preset (random weights: for smoke tests and as a starting point).

    Args:
        out_dir: The checkpoint folder to write.
        preset: A named preset: tiny, shapes, nanovlm-222m, llava-222m.
        seed: Random seed for the initial weights.
        pretrained: Load the parts' pretrained weights where the preset names them (needs the model hub).
    """
    import torch

    from vlm.checkpoint import build, save_checkpoint
    from vlm.config import VLMConfig

    config = VLMConfig.from_name(preset)
    torch.manual_seed(seed)
    model, processor = build(config, pretrained=pretrained)
    save_checkpoint(model, out_dir, processor)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote an untrained {preset} checkpoint ({n / 1e6:.2f}M parameters) to {out_dir}", file=sys.stderr)
    return 0
