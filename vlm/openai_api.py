"""OpenAI's chat-completions request, as the server reads it: the schema (pydantic), and the turn into what
`generate_texts` takes: a question, the conversation before it, and the images. The server's own explanation
request (`POST /v1/explain`) takes its messages in the same form.

Images come as base64 data URLs (PNG, JPEG or WebP), or as paths inside the one folder the server was told it may
read; the server fetches nothing from the network. Every problem with a request is a `RequestError` with the HTTP
status and OpenAI's error fields.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from vlm.errors import VLMError
from vlm.explain import Method

# The most stop strings OpenAI takes.
MAX_STOPS = 4
DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)", re.S)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")  # what a data URL may say it holds
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # what it is decoded as, whatever it says


class RequestError(Exception):
    """A request the server refuses: `status` (400, 404, 422, ...) and OpenAI's `{"error": {...}}` fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 503: "server_busy"}.get(
            self.status, "invalid_request_error"
        )
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    # Strict: "5" is not a number and 1 is not true; unknown fields (OpenAI's many options) are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part]


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    """The fields of `POST /v1/chat/completions` the server reads. `temperature` defaults to 0 (greedy), as in the
    CLI, where OpenAI's default is 1."""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> list[str]:
        """The stop strings, checked: at most `MAX_STOPS`, none empty."""
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise RequestError(400, f"stop must be up to {MAX_STOPS} non-empty strings", "stop")
        return stops

    def new_tokens(self, default: int) -> int:
        """How many tokens to generate at most: `max_completion_tokens` (OpenAI's newer name), else `max_tokens`."""
        return self.max_completion_tokens or self.max_tokens or default

    def turns(self, caption_prompt: str) -> Turns:
        """The conversation as `generate_texts` takes it (see `to_turns`)."""
        if self.n != 1:
            raise RequestError(400, "n must be 1: the server returns one answer per request", "n")
        return to_turns(self.messages, caption_prompt)


class ExplainRequest(_Strict):
    """`POST /v1/explain`: where the model looked for an answer. `messages` as in a chat request, but one user
    message with one image; `answer`: the answer to explain (unset: the model's greedy answer, up to `max_tokens`)."""

    model: str
    messages: list[Message] = Field(min_length=1)
    answer: str | None = None
    method: Method = "attention"
    max_tokens: int | None = Field(None, ge=1)

    def turn(self, caption_prompt: str) -> tuple[str, str]:
        """The question and the image's URL."""
        turns = to_turns(self.messages, caption_prompt)
        if turns.history or len(turns.image_urls) != 1:
            raise RequestError(
                400, "an explanation takes one user message with one image (and its question)", "messages"
            )
        if self.answer is not None and not self.answer.strip():
            raise RequestError(400, "the answer is empty: there is nothing to explain", "answer")
        return turns.question, turns.image_urls[0]


@dataclass
class Turns:
    """A request's conversation as `generate_texts` takes it."""

    question: str
    history: list[dict[str, str]]
    image_urls: list[str]


def _text(message: Message, index: int) -> tuple[str, list[str]]:
    """A message's text (text parts joined by newlines) and its image URLs."""
    if isinstance(message.content, str):
        return message.content, []
    texts = [p.text for p in message.content if isinstance(p, TextPart)]
    urls = [p.image_url.url for p in message.content if isinstance(p, ImagePart)]
    if urls and message.role != "user":
        raise RequestError(
            400,
            f"only user messages can hold images; message {index} is the {message.role}'s",
            f"messages[{index}].content",
        )
    return "\n".join(texts), urls


def to_turns(messages: list[Message], caption_prompt: str) -> Turns:
    """The question (the last message, the user's), the conversation before it and every image, in order. The
    images go where the processor puts a conversation's images: into its first user turn. A last message with
    images and no text asks for the model's caption prompt."""
    *before, last = messages
    if last.role != "user":
        raise RequestError(400, "the last message must be the user's", "messages")
    history, urls = [], []
    for i, m in enumerate(before):
        text, found = _text(m, i)
        history.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        urls += found
    question, found = _text(last, len(before))
    urls += found
    if not question.strip():
        if not urls:
            raise RequestError(400, "the last user message has no text and no image", "messages")
        question = caption_prompt
    return Turns(question=question, history=history, image_urls=urls)


def read_image(url: str, number: int, allowed_dir: Path | None) -> Image.Image:
    """Image `number` (from 1) of a request: a base64 data URL, or a path (or file:// URL) inside `allowed_dir`."""
    from vlm.images import image_from_bytes, load_image

    name = f"image {number}"
    if url.startswith("data:"):
        found = DATA_URL.fullmatch(url)
        if found is None or found["type"] not in IMAGE_TYPES:
            raise RequestError(
                400, f"{name}: a data URL must be base64 image/png, image/jpeg or image/webp", code="invalid_image"
            )
        try:
            data = base64.b64decode(found["data"], validate=True)
        except binascii.Error:
            raise RequestError(400, f"{name}: the data URL is not valid base64", code="invalid_image") from None
        return _image(lambda: image_from_bytes(data, name, IMAGE_FORMATS))
    if re.match(r"[a-zA-Z][\w+.-]*://", url) and not url.startswith("file://"):
        raise RequestError(
            400, f"{name}: the server fetches no URLs; send the image as a base64 data URL", code="invalid_image"
        )
    if allowed_dir is None:
        raise RequestError(
            400, f"{name}: this server reads no local files (start it with --allowed_image_dir)", code="invalid_image"
        )
    path = (allowed_dir / unquote(url.removeprefix("file://"))).resolve()
    if not path.is_relative_to(allowed_dir.resolve()):
        raise RequestError(400, f"{name}: {url} is outside the allowed image folder", code="invalid_image")
    return _image(lambda: load_image(path))


def _image(read) -> Image.Image:
    """`read()`, its one-line `VLMError` as a 400."""
    try:
        return read()
    except VLMError as e:
        raise RequestError(400, str(e), code="invalid_image") from None
