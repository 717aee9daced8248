"""The processor: tokenizer + image transform + chat template, producing batched tensors.

A conversation is a list of `{"role", "content"}` messages; its images go into its first user turn, or, in a data
file's conversation, where its text has an `<image>` placeholder. It is rendered with the tokenizer's chat template
(or `DEFAULT_CHAT_TEMPLATE`) and tokenized in segments, prompt and answer apart, so the labels cover exactly the
assistant's tokens, by construction. The messages' text is tokenized apart from the template, so a special token
written in it (a turn marker, an image placeholder) is plain text: only the template and the images' places make
special tokens.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jinja2 import TemplateError
from PIL import Image
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from vlm.config import PROCESSOR_FILE, VLMConfig, check_fields
from vlm.decoder import load_tokenizer
from vlm.errors import VLMError
from vlm.files import read_json

IGNORE_INDEX = -100

# ChatML, for tokenizers that bring no template of their own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


# The settings of a processor file (`Processor.save_pretrained`) and their types.
_SETTINGS = {
    "transform": dict[str, Any],
    "num_image_tokens": int,
    "image_token": str,
    "caption_prompt": str,
    "max_length": int | None,
    "images_after_text": bool,
    "chat_template": str | None,
}


@dataclass
class ImageTransform:
    """Resize to the encoder's input size (no crop: a question may be about the image's edge), scale, normalize.

    Its numbers come from the encoder's own data config (`ImageEncoder.data_config`)."""

    size: tuple[int, int]  # (H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"

    def __call__(self, images: list[Image.Image]) -> Tensor:
        """RGB PIL images -> (n, 3, H, W) float32."""
        h, w = self.size
        resample = RESAMPLE.get(self.interpolation, Image.Resampling.BICUBIC)
        arr = np.stack([np.asarray(img.convert("RGB").resize((w, h), resample), dtype=np.float32) for img in images])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).div_(255.0)  # (n, H, W, 3) -> (n, 3, H, W)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std


def _checked_transform(t: dict[str, Any], file: Path) -> ImageTransform:
    """The `transform` of a processor file, refused in one line naming the file and the field when its numbers
    cannot normalise an image: a std of 0 (or below, or not finite) would turn every pixel into NaN or inf, and the
    model would still answer, confidently, from nothing."""
    check_fields(t, {"interpolation": Literal[tuple(RESAMPLE)]}, str(file), "transform.", ("size", "mean", "std"))
    size = t["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise VLMError(f"{file}: transform.size must be two positive integers (height, width), got {json.dumps(size)}")
    for field in ("mean", "std"):
        values = t.get(field)
        ok = isinstance(values, list) and len(values) == 3 and all(_is_number(v) for v in values)
        if not ok or (field == "std" and min(values) <= 0):
            need = "three positive numbers" if field == "std" else "three numbers"
            raise VLMError(f"{file}: transform.{field} must be {need}, got {json.dumps(values)}")
    return ImageTransform(tuple(t["size"]), tuple(t["mean"]), tuple(t["std"]), t["interpolation"])


def _is_number(value: Any) -> bool:
    """An int or float (not a bool) that is a finite float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def add_image_token(tokenizer: PreTrainedTokenizerBase, image_token: str) -> None:
    """Adds the image placeholder as a special token, and a pad token where the tokenizer has none."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([image_token], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def tokenizer_for(config: VLMConfig) -> PreTrainedTokenizerBase:
    """The tokenizer a config names, with the image token added, ready for `VisionLanguageModel.from_config`."""
    source = config.decoder.tokenizer or config.decoder.name_or_path
    if not source:
        raise VLMError("the config names no tokenizer (decoder.tokenizer or decoder.name_or_path)")
    tokenizer = load_tokenizer(source)
    add_image_token(tokenizer, config.image_token)
    return tokenizer


class ImageSlot:
    """Where an image goes among a message's text parts (`IMAGE`, the one instance)."""

    def __repr__(self) -> str:
        return "IMAGE"


IMAGE = ImageSlot()


def _interleave(texts: list[str], item: ImageSlot) -> list[str | ImageSlot]:
    """The texts with `item` between each two: what a text split at its placeholders was."""
    return [x for k, text in enumerate(texts) for x in ([item, text] if k else [text])]


def _joined(parts: list[str | ImageSlot]) -> list[str | ImageSlot]:
    """The parts with adjacent texts joined and empty ones dropped."""
    out: list[str | ImageSlot] = []
    for part in parts:
        if part is IMAGE or not out or out[-1] is IMAGE:
            out.append(part)
        else:
            out[-1] += part
    return [part for part in out if part != ""]


def _marker(texts: list[str]) -> str:
    """A string found in none of `texts` (a private-use character, repeated as often as needed), to mark where the
    messages' text goes in a rendered template."""
    marker = "\ue000"
    while any(marker in text for text in texts):
        marker += "\ue000"
    return marker


class Processor:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        transform: ImageTransform,
        num_image_tokens: int,
        image_token: str = "<image>",
        caption_prompt: str = "Describe the image.",
        max_length: int | None = None,
        images_after_text: bool = False,
    ):
        self.tokenizer = tokenizer
        self.transform = transform
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.caption_prompt = caption_prompt
        self.max_length = max_length
        self.images_after_text = images_after_text
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.chat_template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
        # Stop at the end of the assistant's turn as well as at the tokenizer's EOS.
        self.stop_token_ids = sorted(
            {i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")) if i is not None}
            - {tokenizer.unk_token_id}
        )

    @classmethod
    def from_model(cls, model, tokenizer: PreTrainedTokenizerBase) -> Processor:
        """The processor for a built `VisionLanguageModel` (its encoder decides the image transform)."""
        from vlm.decoder import context_length

        dc = model.encoder.data_config
        transform = ImageTransform(
            tuple(dc["input_size"][1:]), tuple(dc["mean"]), tuple(dc["std"]), dc["interpolation"]
        )
        return cls(
            tokenizer,
            transform,
            model.num_image_tokens,
            model.config.image_token,
            model.config.caption_prompt,
            context_length(model.decoder),
            model.config.images_after_text,
        )

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.tokenizer.save_pretrained(path)
        meta = {
            "transform": asdict(self.transform),
            "num_image_tokens": self.num_image_tokens,
            "image_token": self.image_token,
            "caption_prompt": self.caption_prompt,
            "max_length": self.max_length,
            "images_after_text": self.images_after_text,
            "chat_template": self.chat_template,
        }
        (path / PROCESSOR_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Processor:
        """Loads from a checkpoint folder without building the model (e.g. in data-loading workers)."""
        path = Path(path)
        file = path / PROCESSOR_FILE
        meta = read_json(file)
        if not isinstance(meta, dict):
            raise VLMError(f"{file}: not a JSON object")
        check_fields(meta, _SETTINGS, str(file), required=tuple(k for k in _SETTINGS if k != "images_after_text"))
        transform = _checked_transform(meta["transform"], file)
        tokenizer = load_tokenizer(str(path))
        tokenizer.chat_template = meta["chat_template"]
        processor = cls(
            tokenizer,
            transform,
            meta["num_image_tokens"],
            meta["image_token"],
            meta["caption_prompt"],
            meta["max_length"],
            meta.get("images_after_text", False),  # not written before this option existed
        )
        try:  # a template the sandbox refuses, or that cannot render one question, is refused now, naming the file
            processor._render([{"role": "user", "content": "?"}], add_generation_prompt=True)
        except VLMError as e:
            raise VLMError(f"{file}: chat_template: {e}") from None
        return processor

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The saved files as uint8 tensors (name -> bytes), so a training checkpoint, which holds only tensors and
        plain containers, carries its processor; `from_tensors` reads them back."""
        with tempfile.TemporaryDirectory(prefix="vlm-processor-") as tmp:
            self.save_pretrained(tmp)
            return {
                p.name: torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)
                for p in Path(tmp).iterdir()
                if p.is_file()
            }

    @classmethod
    def from_tensors(cls, files: dict[str, torch.Tensor]) -> Processor:
        with tempfile.TemporaryDirectory(prefix="vlm-processor-") as tmp:
            for name, data in files.items():
                (Path(tmp) / Path(name).name).write_bytes(data.numpy().tobytes())
            return cls.from_pretrained(tmp)

    # ---- text -------------------------------------------------------------------------------------------

    def image_parts(
        self, messages: list[dict[str, str]], num_images: int, placeholders: bool = False
    ) -> list[list[str | ImageSlot]]:
        """Each message's content as parts: text (str) and images (`IMAGE`).

        With `placeholders`, each `<image>` in the text is an image (the data format's conversations); otherwise the
        text is all text, `<image>` included. A conversation with no image parts gets them in its first user turn,
        one per line before its text (after it, with `images_after_text`)."""
        contents = [m["content"] for m in messages]
        if placeholders:
            parts = [_joined(_interleave(c.split(self.image_token), IMAGE)) for c in contents]
        else:
            parts = [[c] for c in contents]
        found = sum(part is IMAGE for p in parts for part in p)
        if found == num_images:
            return parts
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if found == 0 and first_user is not None and messages[0]["role"] in ("user", "system"):
            lines = [IMAGE, "\n"] * num_images
            text = parts[first_user]
            parts[first_user] = _joined(text + lines[::-1] if self.images_after_text else lines + text)
            return parts
        raise VLMError(f"the conversation has {found} {self.image_token} placeholders for {num_images} images")

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The chat template rendered for `messages`; a template that jinja's sandbox refuses (SecurityError), that
        does not parse, or that refuses the conversation (`raise_exception`) is a one-line `VLMError`."""
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except TemplateError as e:
            reason = (str(e).strip().splitlines() or [""])[0]
            raise VLMError(f"the chat template cannot be used ({type(e).__name__}: {reason})") from None

    def text_ids(self, text: str) -> list[int]:
        """Token ids of text from a user or a data file: special tokens written in it are plain text."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def _template_ids(self, text: str) -> list[int]:
        """Token ids of what the chat template wrote, its special tokens and image tokens included; each image token
        is expanded to `num_image_tokens` ids."""
        ids: list[int] = []
        for tok in self.tokenizer(text, add_special_tokens=False)["input_ids"]:
            ids += [tok] * (self.num_image_tokens if tok == self.image_token_id else 1)
        return ids

    def encode(
        self,
        messages: list[dict[str, str]],
        num_images: int = 0,
        add_generation_prompt: bool = False,
        placeholders: bool = False,
    ) -> tuple[list[int], list[int]]:
        """Token ids and labels for one conversation; labels are IGNORE_INDEX except on assistant turns.

        With `add_generation_prompt` the ids end with the assistant prompt, ready for generation. Images are placed
        by `image_parts` (`placeholders`: whether `<image>` in the text marks them) and expanded to
        `num_image_tokens` image-token ids each.

        The messages' text is tokenized apart from the template: the template is rendered with a marker in place of
        each text, and only what the template itself writes can be a special token (a turn, an image, an end of
        text); a special token written in a message is plain text.
        """
        parts = self.image_parts(messages, num_images, placeholders)
        marker = _marker([self.chat_template, *(m["content"] for m in messages)])
        texts: list[str] = []  # the messages' text, in the order of the markers' numbers
        masked = [{"role": m["role"], "content": self._masked(p, marker, texts)} for m, p in zip(messages, parts)]
        segments: list[tuple[str, bool]] = []  # (rendered text with markers, is_answer)
        done = ""
        for i, m in enumerate(masked):
            if m["role"] != "assistant":
                continue
            prompt = self._render(masked[:i], add_generation_prompt=True)
            full = self._render(masked[: i + 1], add_generation_prompt=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise VLMError("the chat template does not render conversations prefix by prefix; cannot mask labels")
            segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
            done = full
        end = self._render(masked, add_generation_prompt=add_generation_prompt)
        segments.append((end[len(done) :], False))
        ids: list[int] = []
        labels: list[int] = []
        for rendered, is_answer in segments:
            for n, piece in enumerate(re.split(f"{marker}(\\d+){marker}", rendered)):
                if marker in piece:
                    raise VLMError("the chat template changes the text of messages; vlm cannot keep it apart")
                if piece:
                    piece_ids = self.text_ids(texts[int(piece)]) if n % 2 else self._template_ids(piece)
                    ids += piece_ids
                    labels += piece_ids if is_answer else [IGNORE_INDEX] * len(piece_ids)
        if self.max_length is not None and len(ids) > self.max_length:
            raise VLMError(f"the conversation is {len(ids)} tokens, longer than the decoder's {self.max_length}")
        return ids, labels

    def _masked(self, parts: list[str | ImageSlot], marker: str, texts: list[str]) -> str:
        """A message's content as the template sees it: each image the image token, each text its number in `texts`
        (where it is appended) between two markers. A newline between an image and text is the template's: a LLaVA
        template's prologue (`vlm.llava.templates`) takes the one after an image for the layout, not the text."""
        out = []
        for k, part in enumerate(parts):
            if part is IMAGE:
                out.append(self.image_token)
                continue
            before = "\n" if k > 0 and parts[k - 1] is IMAGE and part.startswith("\n") else ""
            rest = part[len(before) :]
            after = "\n" if k + 1 < len(parts) and parts[k + 1] is IMAGE and rest.endswith("\n") else ""
            core = rest[: len(rest) - len(after)]
            out.append(before)
            if core:
                out.append(f"{marker}{len(texts)}{marker}")
                texts.append(core)
            out.append(after)
        return "".join(out)

    def prompt(
        self,
        text: str,
        num_images: int = 1,
        history: list[dict[str, str]] | None = None,
        placeholders: bool = False,
    ) -> list[int]:
        """Token ids for one user turn (after an optional history), ending with the assistant prompt. `<image>` in
        the text is plain text unless `placeholders` (a data file's conversation)."""
        if not text.strip():
            raise VLMError("the question is empty")
        messages = [*(history or []), {"role": "user", "content": text}]
        return self.encode(messages, num_images, add_generation_prompt=True, placeholders=placeholders)[0]

    def pad(
        self, sequences: list[list[int]], padding_side: str, labels: list[list[int]] | None = None
    ) -> dict[str, Tensor]:
        """Pads to the longest sequence: left for generation, right for training."""
        longest = max(len(s) for s in sequences)
        pad_id = self.tokenizer.pad_token_id
        ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        out_labels = torch.full((len(sequences), longest), IGNORE_INDEX, dtype=torch.long)
        for i, s in enumerate(sequences):
            span = slice(longest - len(s), longest) if padding_side == "left" else slice(0, len(s))
            ids[i, span] = torch.tensor(s, dtype=torch.long)
            mask[i, span] = 1
            if labels is not None:
                out_labels[i, span] = torch.tensor(labels[i], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask}
        if labels is not None:
            batch["labels"] = out_labels
        return batch

    def __call__(
        self,
        prompts: list[str],
        images: list[list[Image.Image]],
        history: list[list[dict[str, str]]] | None = None,
        placeholders: list[bool] | None = None,
    ) -> dict[str, Any]:
        """A left-padded generation batch: one prompt and its images (possibly none) per sample; `placeholders[i]`
        says whether `<image>` in prompt i marks its images (see `prompt`)."""
        if len(prompts) != len(images):
            raise VLMError(f"{len(prompts)} prompts for {len(images)} image lists")
        seqs = [
            self.prompt(p, len(imgs), history[i] if history else None, bool(placeholders and placeholders[i]))
            for i, (p, imgs) in enumerate(zip(prompts, images))
        ]
        batch = self.pad(seqs, "left")
        flat = [img for imgs in images for img in imgs]
        batch["pixel_values"] = self.transform(flat) if flat else None
        return batch

    def decode(self, ids: Tensor | list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
