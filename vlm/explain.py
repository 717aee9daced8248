"""Explanation maps: how much each image patch counts for an answer, as numbers and as a picture.

`explain_answer` answers a question about one image the way `vlm ask` does (`generate_ids`), then reads the answer
back through the decoder (teacher forcing) and scores every image token's relevance to every answer token by one of
`METHODS`. Image tokens are the projector's patch grid (`VisionLanguageModel.image_grid`), row by row, so each answer
token's scores form a rows x columns map. `draw` overlays the maps on the image. What each method measures, and when
it misleads, is in docs/explain.md; `vlm explain-bench` (eval/explain_bench.py) checks them against the shapes
benchmark's known object positions.
"""

from __future__ import annotations

import contextlib
import math
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor

from vlm.errors import VLMError
from vlm.generation import GenerationOptions, generate_ids
from vlm.inference import Device, DType
from vlm.model import VisionLanguageModel
from vlm.processor import Processor

METHODS = ("attention", "rollout", "gradient")
Method = Literal["attention", "rollout", "gradient"]


@dataclass
class Explanation:
    """The maps of one answer. Every map is non-negative and sums to 1 (uniform where nothing counts at all)."""

    prompt: str
    answer: str
    method: str
    grid: tuple[int, int]  # (rows, cols) of image patches
    tokens: list[str]  # the answer's tokens as text
    token_scores: Tensor  # (num_tokens, rows, cols)
    words: list[str]  # the answer's words (whitespace-separated)
    word_scores: Tensor  # (num_words, rows, cols): the mean of each word's tokens' maps

    @property
    def scores(self) -> Tensor:
        """(rows, cols): the whole answer's map, the mean of its tokens' maps."""
        return self.token_scores.mean(0)

    def to_json(self) -> dict[str, Any]:
        """The maps as JSON: `scores` (rows x cols lists), and per token and per word the same."""

        def grid(t: Tensor) -> list[list[float]]:
            return [[round(float(v), 6) for v in row] for row in t]

        return {
            "prompt": self.prompt,
            "answer": self.answer,
            "method": self.method,
            "grid": list(self.grid),
            "scores": grid(self.scores),
            "tokens": [{"token": t, "scores": grid(s)} for t, s in zip(self.tokens, self.token_scores)],
            "words": [{"word": w, "scores": grid(s)} for w, s in zip(self.words, self.word_scores)],
        }


@contextlib.contextmanager
def _eager_attention(decoder):
    """Runs the decoder with eager attention, the implementation that returns its attention weights."""
    before = decoder.config._attn_implementation
    try:
        decoder.set_attn_implementation("eager")
    except (ValueError, ImportError) as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        raise VLMError(
            f"the {decoder.config.model_type} decoder cannot return attention weights ({reason}); use --method gradient"
        ) from None
    try:
        yield
    finally:
        decoder.set_attn_implementation(before)


@torch.no_grad()
def attention_weights(
    model: VisionLanguageModel, input_ids: Tensor, attention_mask: Tensor | None, pixel_values: Tensor | None
) -> tuple[Tensor, ...]:
    """Every decoder layer's attention weights, (B, heads, T, T) each, for one forward pass with eager attention."""
    with _eager_attention(model.decoder):
        attentions = model(input_ids, attention_mask, pixel_values, output_attentions=True).attentions
    if not attentions or any(a is None for a in attentions):
        raise VLMError(
            f"the {model.decoder.config.model_type} decoder returns no attention weights; use --method gradient"
        )
    return attentions


def relevance(
    model: VisionLanguageModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    pixel_values: Tensor,
    num_answer: int,
    method: str,
) -> Tensor:
    """Raw non-negative relevance (num_answer, num_image_tokens) of each image token to each of the last `num_answer`
    tokens of a one-sample sequence (the answer, read back by teacher forcing), by `method`:

    - attention: the attention the position predicting the token gives each image token, averaged over heads and
      layers;
    - rollout: attention rollout (Abnar and Zuidema 2020, "Quantifying Attention Flow in Transformers"): each layer's
      head-averaged attention plus the residual (0.5 A + 0.5 I, rows renormalised), multiplied through the layers;
    - gradient: gradient x input (Shrikumar et al. 2016) on the image embeddings the decoder reads: |sum over the
      hidden dimension of (d log p(token) / d embedding) * embedding|.
    """
    if method not in METHODS:
        raise VLMError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    length = input_ids.shape[1]
    queries = torch.arange(length - num_answer - 1, length - 1, device=input_ids.device)  # t predicts token t + 1
    image = (input_ids[0] == model.image_token_id).nonzero()[:, 0]
    if method != "gradient":
        attn = torch.stack(attention_weights(model, input_ids, attention_mask, pixel_values))[:, 0].float().mean(1)
        if method == "attention":  # (layers, T, T), heads averaged
            return attn.mean(0)[queries][:, image]
        eye = torch.eye(length, device=attn.device)
        flow = eye
        for layer in attn:
            step = 0.5 * layer + 0.5 * eye
            flow = (step / step.sum(-1, keepdim=True)) @ flow
        return flow[queries][:, image]
    targets = input_ids[0, queries + 1]
    images: list[Tensor] = []  # the projector's output, made the leaf the gradient is taken at

    def leaf(module, args, out: Tensor) -> Tensor:
        images.append(out.detach().requires_grad_(True))
        return images[-1]

    hook = model.projector.register_forward_hook(leaf)
    try:
        with torch.enable_grad():
            logits = model(input_ids, attention_mask, pixel_values).logits[0, queries]
            log_probs = logits.float().log_softmax(-1).gather(1, targets[:, None])[:, 0]
            maps = []
            for k in range(num_answer):
                (grad,) = torch.autograd.grad(log_probs[k], images[0], retain_graph=k + 1 < num_answer)
                maps.append((grad * images[0]).float().sum(-1).abs().flatten())  # image tokens in order
    finally:
        hook.remove()
    return torch.stack(maps).detach()


def normalise(scores: Tensor) -> Tensor:
    """Each row of non-negative scores scaled to sum to 1; a row with nothing in it (all zero) becomes uniform."""
    scores = scores.float().nan_to_num(0.0, 0.0, 0.0).clamp(min=0)
    total = scores.sum(-1, keepdim=True)
    uniform = torch.full_like(scores, 1.0 / scores.shape[-1])
    return torch.where(total > 0, scores / total.clamp(min=torch.finfo(scores.dtype).tiny), uniform)


def _word_groups(processor: Processor, ids: list[int]) -> list[list[int]]:
    """For each word of the decoded answer, the indices of its tokens: token k belongs to the last word of the text
    decoded from tokens 0..k (a token that only adds space stays with the word before it)."""
    groups: list[list[int]] = []
    for k in range(len(ids)):
        word = max(len(processor.decode(ids[: k + 1]).split()) - 1, 0)
        while len(groups) <= word:
            groups.append([])
        groups[word].append(k)
    return [g for g in groups if g]


def explain_answer(
    model: VisionLanguageModel,
    processor: Processor,
    image: Image.Image,
    question: str | None = None,
    method: str = "attention",
    options: GenerationOptions | None = None,
    answer: str | None = None,
) -> Explanation:
    """Answers `question` about `image` (without one, captions it) and explains the answer by `method` (see
    `relevance`); with `answer` (e.g. one the server sent before), explains that text instead of generating one.
    Raises `VLMError` when the model's image tokens are no patch grid or the answer is empty."""
    grid = model.image_grid
    if grid is None:
        raise VLMError(
            "explanation maps need the image tokens to be a patch grid; this model keeps the encoder's "
            "class tokens (encoder.keep_prefix_tokens)"
        )
    if method not in METHODS:
        raise VLMError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    prompt = processor.caption_prompt if question is None else question
    if answer is None:
        generated = generate_ids(model, processor, [prompt], [[image]], options)[0].tolist()
        stops = {*processor.stop_token_ids, processor.tokenizer.pad_token_id}
        answer_ids = generated[: next((k for k, t in enumerate(generated) if t in stops), len(generated))]
    else:
        answer_ids = processor.text_ids(answer.strip())
    answer = processor.decode(answer_ids)
    if not answer:
        raise VLMError("the model's answer is empty: there is nothing to explain")
    batch = processor([prompt], [[image]])
    device = next(model.parameters()).device
    input_ids = torch.cat([batch["input_ids"], torch.tensor([answer_ids])], 1).to(device)
    raw = relevance(
        model, input_ids, torch.ones_like(input_ids), batch["pixel_values"].to(device), len(answer_ids), method
    )
    token_scores = normalise(raw).cpu().view(len(answer_ids), *grid)
    groups = _word_groups(processor, answer_ids)
    return Explanation(
        prompt=prompt,
        answer=answer,
        method=method,
        grid=grid,
        tokens=[processor.tokenizer.decode([t]) for t in answer_ids],
        token_scores=token_scores,
        words=[processor.decode(answer_ids[g[0] : g[-1] + 1]) for g in groups],
        word_scores=torch.stack([normalise(token_scores[g].mean(0).flatten()).view(grid) for g in groups]),
    )


def draw(explanation: Explanation, image: Image.Image, path: str | Path) -> None:
    """Writes a PNG: the image, then the image under the answer's map (and, for answers of several words, under each
    word's map), with one colour bar and the question and answer above."""
    from matplotlib.figure import Figure

    from vlm.files import atomic_file

    e = explanation
    panels = [("image", None), ("whole answer" if len(e.words) > 1 else e.answer, e.scores)]
    if len(e.words) > 1:
        panels += list(zip(e.words, e.word_scores))
    cols = min(len(panels), 6)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(2.6 * cols + 1.2, 2.6 * rows + 1.2), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    width, height = image.size
    top = max(float(s.max()) for _, s in panels[1:])
    for ax, (title, scores) in zip(axes.flat, panels):
        ax.imshow(image, extent=(0, width, height, 0))
        if scores is not None:
            shown = ax.imshow(
                scores.numpy(),
                cmap="jet",
                alpha=0.5,
                vmin=0,
                vmax=top,
                extent=(0, width, height, 0),
                interpolation="nearest",
            )
        ax.set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.colorbar(shown, ax=axes, shrink=0.8, label="share of relevance")
    heading = f"Q: {e.prompt}\nA: {e.answer}\n({e.method}, {e.grid[0]}x{e.grid[1]} patches; each map sums to 1)"
    fig.suptitle("\n".join(textwrap.fill(line, 50 + 40 * (cols - 2)) for line in heading.split("\n")), fontsize=10)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


def _png_path(path: str) -> Path:
    from vlm.files import check_output_file

    if Path(path).suffix.lower() != ".png":
        raise VLMError(f"--output must name a .png file (the JSON goes beside it), got {path}")
    return check_output_file(path)


def _explain_one(net, processor, image_path: Path, question: str | None, method: str, gen, png: Path) -> dict:
    """Explains one image and question (None: a caption) and draws the PNG; returns the JSON to write beside it."""
    from vlm.images import load_image

    image = load_image(image_path)
    result = explain_answer(net, processor, image, question, method, gen)
    draw(result, image, png)
    return {**result.to_json(), "map": png.name}


def _explain_rows(input: str, output_dir: str, net, processor, method: str, gen) -> int:
    """Every row of a JSONL file explained into `output_dir` as NNNNN.png + NNNNN.json (row NNNNN, from 0, in file
    order); a bad row's JSON has an "error" and the run goes on. Returns how many rows failed."""
    from tqdm import tqdm

    from vlm.files import write_json
    from vlm.inference import items_from_jsonl

    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise VLMError(f"--output_dir must be a folder, but {folder} is a file")
    folder.mkdir(parents=True, exist_ok=True)
    items = items_from_jsonl(Path(input), processor.caption_prompt)
    failed = 0
    for k, item in enumerate(tqdm(items, unit="row", file=sys.stderr, disable=None)):
        png = folder / f"{k:05d}.png"
        try:
            if item.error is not None:
                raise VLMError(item.error)
            if item.placeholders or len(item.images) != 1:
                raise VLMError("only question and caption rows with one image can be explained")
            question = item.row["question"] if "question" in item.row else None
            row = {**item.row, **_explain_one(net, processor, item.images[0], question, method, gen, png)}
        except VLMError as e:
            failed += 1
            row = {**item.row, "error": str(e)}
        write_json(png.with_suffix(".json"), row)
    if failed:
        print(f"vlm: {failed} of {len(items)} rows failed (see 'error' in their JSON files)", file=sys.stderr)
    print(f"vlm: wrote {len(items) - failed} maps to {folder}", file=sys.stderr)
    return failed


def explain(
    image: str | None = None,
    question: str | None = None,
    method: Method = "attention",
    output: str | None = None,
    input: str | None = None,
    output_dir: str | None = None,
    model: str | None = None,
    device: Device = "auto",
    dtype: DType = "auto",
    json: bool = False,
    gen: GenerationOptions | None = None,
) -> int:
    """Answer a question about an image (without a question, caption it) and draw which image patches the answer
    rests on: a PNG of the image under a heat map (one per word for longer answers) and a JSON file of the per-patch
    scores (rows x columns), for the whole answer and per answer token and word. See docs/explain.md.

    Args:
        image: The image file.
        question: The question about IMAGE (none: explain its caption).
        method: attention (answer tokens' attention to image tokens, mean over layers and heads), rollout (attention
            rollout) or gradient (gradient x input on the image embeddings).
        output: The PNG to write (the JSON goes beside it, .json); default: IMAGE's name + .explain.png, here.
        input: A JSONL file of rows {"image": path relative to the file, "question": ...} (rows without a question are
            captioned) instead of IMAGE; needs --output_dir.
        output_dir: With --input: the folder for one NNNNN.png + NNNNN.json per row (NNNNN: the row, from 0).
        model: A vlm checkpoint folder (default: samples/shapes-model/, which knows only the synthetic
            shapes benchmark).
        device: Where to run: auto (CUDA when available), cpu, cuda or cuda:N (the GPU numbered N).
        dtype: Weights' precision: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.
        json: Print the JSON (scores included) instead of the answer.
        gen: Generation options.
    """
    import json as json_module

    from vlm.checkpoint import open_model
    from vlm.files import check_input_file, write_json

    gen = gen or GenerationOptions()
    if input is not None and (image is not None or question is not None or output is not None):
        raise VLMError("give either IMAGE [QUESTION] [--output PNG] or --input FILE.jsonl --output_dir DIR, not both")
    if input is None and image is None:
        raise VLMError("give IMAGE (and a QUESTION; without one its caption is explained), or --input FILE.jsonl")
    if (input is None) != (output_dir is None):
        raise VLMError("--input and --output_dir go together")
    if question is not None and not question.strip():
        raise VLMError("the question is empty")
    if input is not None:
        check_input_file(input, "input file")
    else:
        check_input_file(image, "image")
        png = _png_path(output or f"{Path(image).stem}.explain.png")
    net, processor = open_model(model, device, dtype)
    if input is not None:
        return 2 if _explain_rows(input, output_dir, net, processor, method, gen) else 0
    out = {"image": image, **_explain_one(net, processor, Path(image), question, method, gen, png)}
    write_json(png.with_suffix(".json"), out)
    print(json_module.dumps(out, ensure_ascii=False) if json else out["answer"])
    print(f"vlm: wrote {png} and {png.with_suffix('.json')}", file=sys.stderr)
    return 0
