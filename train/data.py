"""Training data: the project's JSONL files or Hugging Face datasets, as a `LightningDataModule`.

Every row is read by `vlm.data` (`read_jsonl` for JSONL; `open_hf_dataset` and `example_from_record` for datasets),
so training, evaluation and inference agree on what a row means.

Broken rows never crash an epoch and are never dropped silently. Rows that cannot be parsed (too long, not UTF-8,
bad JSON, missing fields), and rows whose image file is missing, are found up front in the main process. Rows that
fail later in a loader worker (a corrupt image, a row longer than `max_length`) are replaced by the next good row,
and the replaced row travels with the batch (`batch["bad"]`) to the main process. `vlm.train.callbacks.DataHealth`
counts both alike, one per row, against all the rows of the epoch.

Resuming mid-epoch: the training loader is stateful. Lightning stores its `state_dict` (epoch and batches consumed;
for streams, how many rows each worker had read) in every checkpoint and hands it back on `--ckpt_path`, and the
loader then starts the epoch after the batches already trained on, in the same shuffled order.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, get_worker_info

from vlm.collate import Collator, PairCollator, encode_sample
from vlm.data import (
    Example,
    PreferencePair,
    RowError,
    example_from_record,
    load_row_images,
    open_hf_dataset,
    parse_pair,
    parse_row,
    read_jsonl,
    read_pairs,
)
from vlm.errors import VLMError
from vlm.files import open_regular
from vlm.images import max_pixels
from vlm.model import check_packing
from vlm.processor import Processor

# A run of this many broken rows in a row means the data (not a row) is broken: stop rather than skip on.
MAX_CONSECUTIVE_BAD = 32


# ---- rows ----------------------------------------------------------------------------------------------------------


class RowSource:
    """Indexable rows of one dataset: `get(i) -> (Example, images)`; `key(i)` names row i in reports; `errors`
    holds `(key, message)` for rows found broken while indexing (they are not among the indexed rows)."""

    name: str
    errors: list[tuple[str, str]]

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, i: int) -> tuple[Example, list[Any]]:
        raise NotImplementedError

    def key(self, i: int) -> str:
        raise NotImplementedError


class JsonlRows(RowSource):
    """A JSONL file, checked once in the main process: rows that do not parse and rows whose image file is missing go
    to `errors`. The good rows are kept as line numbers and byte offsets (two numbers a row, so forked loader workers
    share them instead of copying millions of Python objects) and parsed again with `vlm.data.parse_row` when read
    (`vlm.data.parse_pair` for a file of preference pairs, `pairs`). A file with no rows at all is an error."""

    def __init__(self, path: str | Path, caption_prompt: str, pairs: bool = False):
        self.path, self.name, self.caption_prompt, self.pairs = Path(path), str(path), caption_prompt, pairs
        self.errors = []
        exists: dict[Path, bool] = {}
        lines: list[int] = []
        offsets: list[int] = []
        for item in read_pairs(path) if pairs else read_jsonl(path, caption_prompt):
            if isinstance(item, RowError):
                self.errors.append((f"{path}:{item.line}", f"{path}: {item}"))
                continue
            for p in item.images:
                if p not in exists:
                    exists[p] = _may_exist(p)
            missing = [p for p in item.images if not exists[p]]
            if missing:
                self.errors.append((f"{path}:{item.line}", f"{path}: line {item.line}: image not found: {missing[0]}"))
                continue
            lines.append(item.line)
            offsets.append(item.offset)
        self.lines = np.array(lines, dtype=np.int64)
        self.offsets = np.array(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.lines)

    def get(self, i: int) -> tuple[Example | PreferencePair, list[Any]]:
        with open_regular(self.path, "data file") as f:
            f.seek(int(self.offsets[i]))
            text = f.readline()
        row, line = json.loads(text), int(self.lines[i])
        if self.pairs:
            example = parse_pair(row, self.path.parent, line)
        else:
            example = parse_row(row, self.path.parent, self.caption_prompt, line=line)
        return example, list(example.images)

    def key(self, i: int) -> str:
        return f"{self.name}:{self.lines[i]}"


def _may_exist(path: Path) -> bool:
    """False when nothing is at `path`. Anything else wrong with it (a folder, a pipe, a name too long to look up)
    is reported when the image is loaded (`vlm.images.load_image`), with its own reason."""
    try:
        return path.exists()
    except OSError:
        return True


def check_columns(spec: str, names: list[str] | None, columns: dict[str, str]) -> None:
    """Refuses, before training starts, a `datasets` source whose columns cannot make rows (every row would be broken,
    and the loader workers would stop on it): a mapped column it lacks, or no column for a caption, a question and
    its answer, or conversations. `names` are the dataset's columns (None: not known, as for some streams)."""
    if names is None:
        return
    listed = ", ".join(names) or "none"
    for field, column in columns.items():
        if column not in names:
            raise VLMError(
                f"{spec} has no column {column!r} (data.columns maps {field!r} to it); its columns: {listed}"
            )
    fields = (set(names) - set(columns.values())) | set(columns)
    if not fields & {"caption", "question", "conversations"} or ("question" in fields and "answer" not in fields):
        raise VLMError(
            f"{spec} has no columns named caption, question and answer, or conversations (its columns: {listed}): "
            "map them with --data.columns, e.g. --data.columns '{question: query, answer: label, image: picture}'"
        )


class DatasetRows(RowSource):
    """A map-style Hugging Face dataset; rows are parsed when read (in the loader workers)."""

    def __init__(self, dataset, name: str, columns: dict[str, str], base: Path, caption_prompt: str):
        self.dataset, self.name, self.columns, self.base = dataset, name, columns, base
        self.caption_prompt = caption_prompt
        self.errors = []

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, i: int) -> tuple[Example, list[Any]]:
        return example_from_record(self.dataset[i], self.columns, self.base, self.caption_prompt, self.key(i))

    def key(self, i: int) -> str:
        return f"{self.name}[{i}]"


class ConcatRows(RowSource):
    def __init__(self, sources: list[RowSource]):
        self.sources = sources
        self.name = " + ".join(s.name for s in sources)
        self.errors = [e for s in sources for e in s.errors]
        self.starts = [0]
        for s in sources:
            self.starts.append(self.starts[-1] + len(s))

    def __len__(self) -> int:
        return self.starts[-1]

    def _locate(self, i: int) -> tuple[RowSource, int]:
        k = next(k for k in range(len(self.sources)) if i < self.starts[k + 1])
        return self.sources[k], i - self.starts[k]

    def get(self, i: int) -> tuple[Example, list[Any]]:
        source, j = self._locate(i)
        return source.get(j)

    def key(self, i: int) -> str:
        source, j = self._locate(i)
        return source.key(j)


# ---- datasets ------------------------------------------------------------------------------------------------------


def _encode(
    processor: Processor,
    example: Example,
    images: list[Any],
    max_length: int | None,
    with_prompt: bool = False,
    independent_turns: bool = False,
) -> dict[str, Any]:
    """A parsed row and its images (paths, PIL images or datasets' dicts) -> an encoded training sample."""
    return encode_sample(
        processor,
        example.messages,
        load_row_images(images),
        example.kind,
        example.references,
        max_length,
        with_prompt=with_prompt,
        independent_turns=independent_turns,
    )


def _encode_pair(
    processor: Processor, pair: PreferencePair, images: list[Any], max_length: int | None
) -> dict[str, Any]:
    """A preference pair and its images -> the encoded chosen and rejected conversations, which share the images."""
    pixels = load_row_images(images)
    chosen = encode_sample(processor, pair.messages(pair.chosen), pixels, "vqa", [], max_length)
    rejected = encode_sample(processor, pair.messages(pair.rejected), pixels, "vqa", [], max_length)
    return {
        "chosen_ids": chosen["input_ids"],
        "chosen_labels": chosen["labels"],
        "rejected_ids": rejected["input_ids"],
        "rejected_labels": rejected["labels"],
        "pixel_values": chosen["pixel_values"],
        "bad": [],
    }


def _bad_row(where: str, error: VLMError) -> tuple[str, str]:
    """(where, message) of a broken row, the message always starting with where it came from."""
    message = str(error)
    return where, message if message.startswith(where) else f"{where}: {message}"


class VLMDataset(Dataset):
    """Rows -> encoded samples. A broken row is replaced by the next good one and reported in the sample's `bad`.

    Rows whose index is in `generate` also carry a generation prompt (question rows only; see `encode_sample`), and
    come first: item k is the k-th of them, then the other rows follow in file order, so a validation cut short by
    `trainer.limit_val_batches` still answers every chosen row. Those that get a prompt also carry what a reward
    reads (`rollout`: the row's key, question, fields and images).

    `pairs`: the rows are preference pairs (`_encode_pair`), not rows of the data format. `prompts_only`: every row
    must give a prompt (a question row); any other row is broken.
    """

    def __init__(
        self,
        rows: RowSource,
        processor: Processor,
        max_length: int | None = None,
        generate: set[int] | None = None,
        independent_turns: bool = False,
        pairs: bool = False,
        prompts_only: bool = False,
    ):
        self.rows, self.processor, self.max_length, self.pairs = rows, processor, max_length, pairs
        self.independent_turns, self.prompts_only = independent_turns, prompts_only
        chosen = sorted(generate or ())
        self.num_generate = len(chosen)
        self.order = chosen + sorted(set(range(len(rows))) - set(chosen)) if chosen else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        bad: list[tuple[str, str]] = []
        first = self.order[index] if self.order is not None else index
        for k in range(MAX_CONSECUTIVE_BAD):
            i = (first + k) % len(self.rows)
            try:
                example, images = self.rows.get(i)
                if self.pairs:
                    sample = {**_encode_pair(self.processor, example, images, self.max_length), "index": i}
                else:
                    with_prompt = index < self.num_generate
                    sample = _encode(
                        self.processor, example, images, self.max_length, with_prompt, self.independent_turns
                    )
                if self.prompts_only and "prompt_ids" not in sample:
                    raise VLMError("not a question row: GRPO samples answers to questions")
                if "prompt_ids" in sample:
                    sample["rollout"] = {"key": self.rows.key(i), "prompt": example.prompt, "row": example.row}
                    sample["rollout"]["images"] = images
            except VLMError as e:
                bad.append(_bad_row(self.rows.key(i), e))
                continue
            sample["bad"] = bad
            return sample
        raise VLMError(f"{MAX_CONSECUTIVE_BAD} broken rows in a row in {self.rows.name}, e.g. {bad[0][1]}")


class StreamingVLMDataset(IterableDataset):
    """A streaming Hugging Face dataset (`datasets.IterableDataset`) -> encoded samples.

    Broken rows are skipped and reported with the next good sample. Each sample records how many rows its worker
    has read (`stream_position`), so a resumed run can skip exactly the rows already trained on.
    """

    def __init__(
        self, stream, name: str, columns: dict[str, str], base: Path, processor: Processor, max_length: int | None
    ):
        self.stream, self.name, self.columns, self.base = stream, name, columns, base
        self.processor, self.max_length = processor, max_length
        self.skip: dict[int, int] = {}  # worker id -> rows to skip (set when resuming)

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)  # datasets reshuffles shards and its buffer with seed + epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        skip = self.skip.get(worker, 0)
        bad: list[tuple[str, str]] = []
        # datasets gives each loader worker its own shards of the stream.
        for position, record in enumerate(self.stream, start=1):
            if position <= skip:
                continue
            where = f"{self.name}: worker {worker} row {position}"
            try:
                example, images = example_from_record(
                    record, self.columns, self.base, self.processor.caption_prompt, where
                )
                sample = _encode(self.processor, example, images, self.max_length)
            except VLMError as e:
                bad.append(_bad_row(where, e))
                continue
            sample["bad"], bad = bad, []
            sample["stream_position"] = (worker, position)
            yield sample


def checked_rows(sources: list[RowSource], what: str, max_bad_fraction: float) -> RowSource:
    """The sources as one, once their broken rows are reported; refused when no row is usable or more than
    `max_bad_fraction` of them are broken."""
    rows = sources[0] if len(sources) == 1 else ConcatRows(sources)
    total = len(rows) + len(rows.errors)
    if len(rows) == 0:
        first = f"; e.g. {rows.errors[0][1]}" if rows.errors else ""
        raise VLMError(f"no usable {what} rows in {rows.name}{first}")
    check_bad_fraction(len(rows.errors), total, max_bad_fraction, f"{what} data {rows.name}", rows.errors)
    if rows.errors:
        rank_zero_info(bad_rows_report(f"{what} data", rows.errors, total))
    return rows


# ---- resumable loading ---------------------------------------------------------------------------------------------


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` (same shuffle per seed and epoch, same split over ranks) that can start part-way into
    an epoch: the first `start` indices of this rank's order are skipped. Being a `DistributedSampler`, Lightning
    keeps it rather than swapping in its own."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start :])


class ResumableDataLoader(DataLoader):
    """A training `DataLoader` with `state_dict`/`load_state_dict`, which Lightning saves in (and restores from)
    every checkpoint. `epoch_fn` gives the trainer's current epoch when an epoch's iteration starts."""

    def __init__(self, dataset: Dataset, *, epoch_fn: Callable[[], int], **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.epoch_fn = epoch_fn
        self.streaming = isinstance(dataset, IterableDataset)
        self._pending: dict[str, Any] | None = None
        # Position after each batch handed out; Lightning reads one batch ahead of training from loaders without
        # a length (streams), so for them the state is the one before the last batch handed out.
        self._history: deque[dict[str, Any]] = deque([{"epoch": 0, "batches": 0, "positions": {}}], maxlen=3)
        self._exhausted = False

    def state_dict(self) -> dict[str, Any]:
        lag = 1 if self.streaming and not self._exhausted and len(self._history) > 1 else 0
        state = self._history[-1 - lag]
        return {"epoch": state["epoch"], "batches": state["batches"], "positions": dict(state["positions"])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state

    def __iter__(self) -> Iterator[Any]:
        return self._epoch()

    def _epoch(self) -> Iterator[Any]:
        # A generator: this runs at the first `next`, after Lightning has set up the epoch.
        epoch = self.epoch_fn()
        state: dict[str, Any] = {"epoch": epoch, "batches": 0, "positions": {}}
        if self._pending is not None and self._pending["epoch"] == epoch:
            state = {"epoch": epoch, "batches": self._pending["batches"], "positions": dict(self._pending["positions"])}
        self._pending = None
        if self.streaming:
            self.dataset.set_epoch(epoch)
            self.dataset.skip = {int(w): p for w, p in state["positions"].items()}
        else:
            self.sampler.set_epoch(epoch)
            self.sampler.start = state["batches"] * self.batch_size
        self._history = deque([state], maxlen=3)
        self._exhausted = False
        for batch in super().__iter__():
            positions = state["positions"]
            if "stream_position" in batch:
                worker, position = batch["stream_position"]
                positions = {**positions, worker: position}
            state = {"epoch": epoch, "batches": state["batches"] + 1, "positions": positions}
            self._history.append(state)
            yield batch
        self._exhausted = True


class VLMDataModule(LightningDataModule):
    """Training and validation data for `vlm fit` / `vlm validate`.

    A source is a JSONL file (the project's format), a folder saved with `datasets` `save_to_disk`, a `.parquet`,
    `.arrow`, `.json` or `.csv` file, an image folder with a metadata file (`imagefolder`), or a dataset name on the
    Hugging Face hub. Several sources are concatenated. `datasets` sources are read through `columns`; their images
    may be paths (relative to the source's folder) or images stored in the dataset. Validation data is never
    streamed.

    Args:
        train: Training source(s).
        val: Validation source(s); none skips validation.
        batch_size: Samples per device per step.
        pack_tokens: Pack each training batch's samples into rows of at most this many tokens (a longer sample gets
            a row of its own) instead of padding every sample to the longest; each sample keeps its own positions
            and attends only to itself, so the loss is the same on fewer rows. Unset pads. Validation always pads.
        independent_turns: Train each answer of a conversation row as a one-question sample about the same images:
            the turns share one row, the image tokens and the common start once, and each turn sees only that start
            and itself (no turn can read another's answer; the image is encoded once). Training data only; not
            with `pack_tokens`.
        val_batch_size: Validation batch size (default: `batch_size`).
        num_workers: Loader worker processes per device (0 loads in the main process).
        pin_memory: Pin batches for faster host-to-GPU copies; default: when training on a GPU.
        max_length: Rows longer than this many tokens (image tokens included) count as broken; the decoder's
            context length always applies.
        max_bad_fraction: Stop with an error when more than this fraction of an epoch's rows are broken.
        seed: Shuffle seed (the order also changes with the epoch).
        generate_samples: Validation rows (spread evenly) answered by generation for `val/accuracy`; 0 disables it.
        columns: For `datasets` sources: JSONL field -> dataset column, e.g. `{image: img, answer: label}`.
        train_split: Split to read from `datasets` sources for training.
        val_split: Split to read from `datasets` sources for validation.
        streaming: Stream `datasets` sources instead of loading them (for data that does not fit on disk); needs
            `trainer.max_steps`.
        shuffle_buffer: Rows in the streaming shuffle buffer.
        hf_kwargs: More keyword arguments for `datasets.load_dataset` (e.g. `name` for a dataset configuration).
    """

    # What the rows are (`PairDataModule`: preference pairs) and whether every training row is a prompt to sample
    # answers to (`PromptDataModule`, for GRPO).
    pairs = False
    prompts = False

    def __init__(
        self,
        train: str | list[str] | None = None,
        val: str | list[str] | None = None,
        batch_size: int = 16,
        pack_tokens: int | None = None,
        independent_turns: bool = False,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        max_length: int | None = None,
        max_bad_fraction: float = 0.05,
        seed: int = 0,
        generate_samples: int = 64,
        columns: dict[str, str] | None = None,
        train_split: str = "train",
        val_split: str = "validation",
        streaming: bool = False,
        shuffle_buffer: int = 10_000,
        hf_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise VLMError("data.batch_size must be at least 1")
        if pack_tokens is not None and pack_tokens < 1:
            raise VLMError("data.pack_tokens must be at least 1")
        if not 0 <= max_bad_fraction <= 1:
            raise VLMError("data.max_bad_fraction must be between 0 and 1")
        self.train = [train] if isinstance(train, str) else list(train or [])
        self.val = [val] if isinstance(val, str) else list(val or [])
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        if pack_tokens is not None and independent_turns:
            raise VLMError("data.independent_turns and data.pack_tokens cannot be combined: choose one")
        self.pack_tokens, self.independent_turns = pack_tokens, independent_turns
        self.num_workers, self.pin_memory, self.max_length = num_workers, pin_memory, max_length
        self.max_bad_fraction, self.seed, self.generate_samples = max_bad_fraction, seed, generate_samples
        self.columns = dict(columns or {})
        self.train_split, self.val_split = train_split, val_split
        self.streaming, self.shuffle_buffer, self.hf_kwargs = streaming, shuffle_buffer, dict(hf_kwargs or {})
        self.processor: Processor | None = None  # taken from the LightningModule in `setup`, or set directly
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        # Broken rows found while indexing (not among the indexed rows): (key, message).
        self.train_errors: list[tuple[str, str]] = []
        self.val_errors: list[tuple[str, str]] = []

    # ---- building ----

    def _rows(self, spec: str, split: str) -> RowSource:
        if spec.endswith(".jsonl"):
            return JsonlRows(spec, self.processor.caption_prompt, self.pairs)
        if self.pairs:
            raise VLMError(f"preference pairs are read from JSONL files, not {spec}")
        ds, base = open_hf_dataset(spec, split, **self.hf_kwargs)
        check_columns(spec, ds.column_names, self.columns)
        return DatasetRows(ds, spec, self.columns, base, self.processor.caption_prompt)

    def _map_dataset(
        self, specs: list[str], split: str, what: str, generate: int, independent_turns: bool = False
    ) -> VLMDataset:
        rows = checked_rows([self._rows(s, split) for s in specs], what, self.max_bad_fraction)
        chosen = set()
        prompts_only = self.prompts and what == "training"
        if prompts_only:
            chosen = set(range(len(rows)))
        elif generate > 0 and not self.pairs:
            step = len(rows) / min(generate, len(rows))
            chosen = {int(k * step) for k in range(min(generate, len(rows)))}
        return VLMDataset(rows, self.processor, self._max_length(), chosen, independent_turns, self.pairs, prompts_only)

    def _stream(self, specs: list[str], split: str, shuffle: bool) -> StreamingVLMDataset:
        import datasets
        from datasets.distributed import split_dataset_by_node

        if len(specs) != 1 or specs[0].endswith(".jsonl"):
            raise VLMError("data.streaming reads exactly one datasets source (not JSONL)")
        stream, base = open_hf_dataset(specs[0], split, streaming=True, **self.hf_kwargs)
        if not isinstance(stream, datasets.IterableDataset):
            raise VLMError(f"{specs[0]} did not open as a stream")
        check_columns(specs[0], stream.column_names, self.columns)
        if shuffle:
            stream = stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        if self.trainer is not None and self.trainer.world_size > 1:
            stream = split_dataset_by_node(stream, rank=self.trainer.global_rank, world_size=self.trainer.world_size)
        return StreamingVLMDataset(stream, specs[0], self.columns, base, self.processor, self._max_length())

    def _max_length(self) -> int | None:
        limits = [n for n in (self.max_length, self.processor.max_length) if n is not None]
        return min(limits) if limits else None

    def setup(self, stage: str) -> None:
        max_pixels()  # a bad VLM_MAX_IMAGE_PIXELS stops the run here, not as a broken row in every worker
        if self.processor is None:
            self.processor = self.trainer.lightning_module.processor
        if stage == "fit" and self.pack_tokens is not None and self.trainer is not None:
            check_packing(self.trainer.lightning_module.vlm.decoder)  # refuse before the first step, not at it
        if (self.pairs or self.prompts) and (self.streaming or self.pack_tokens is not None):
            raise VLMError("preference and GRPO data are neither streamed nor packed: unset data.streaming/pack_tokens")
        if stage == "fit" and self.train_set is None:
            if not self.train:
                raise VLMError("no training data: set --data.train (a JSONL file or a dataset)")
            if self.streaming and self.independent_turns:
                raise VLMError("data.independent_turns does not apply to streamed data")
            if self.streaming:
                self.train_set = self._stream(self.train, self.train_split, shuffle=True)
            else:
                self.train_set = self._map_dataset(self.train, self.train_split, "training", 0, self.independent_turns)
                self.train_errors = list(self.train_set.rows.errors)
        if stage in ("fit", "validate") and self.val and self.val_set is None:
            self.val_set = self._map_dataset(self.val, self.val_split, "validation", self.generate_samples)
            self.val_errors = list(self.val_set.rows.errors)
            self._check_val_limit()
        if stage == "validate" and not self.val:
            raise VLMError("no validation data: set --data.val")

    def _check_val_limit(self) -> None:
        """Refuses a `trainer.limit_val_batches` that would cut the generation rows (they come first: `VLMDataset`),
        so `val/accuracy` always answers every one of `generate_samples`."""
        limit = getattr(self.trainer, "limit_val_batches", None) if self.trainer is not None else None
        needed = math.ceil(self.val_set.num_generate / self.val_batch_size)
        if limit is None or needed == 0:
            return
        total = math.ceil(len(self.val_set) / self.val_batch_size)
        batches = limit if isinstance(limit, int) else int(limit * total)
        if batches < needed:
            raise VLMError(
                f"trainer.limit_val_batches={limit} validates {batches} batches, but the {self.val_set.num_generate} "
                f"generation rows (data.generate_samples) need {needed} of {self.val_batch_size}: raise it or lower "
                "data.generate_samples"
            )

    def describe(self) -> dict[str, Any]:
        """The data as given and what indexing found in it, for the run's training record.

        Each source (its spec as given) with `rows`, the rows indexed, and `broken_rows`, those found broken and
        skipped while indexing. JSONL files are checked up front; dataset rows are only parsed when loaded, so their
        `broken_rows` is None, and both are None for a source not indexed (streamed, or not set up). Rows that fail
        in a loader are counted per epoch by `vlm.train.callbacks.DataHealth` (`data/train_bad_rows`).
        """

        def sources(specs: list[str], dataset: Dataset | None, split: str) -> list[dict[str, Any]]:
            indexed: list[RowSource] = []
            if isinstance(dataset, VLMDataset):
                indexed = dataset.rows.sources if isinstance(dataset.rows, ConcatRows) else [dataset.rows]
            out = []
            for k, spec in enumerate(specs):
                entry: dict[str, Any] = {"source": spec}
                if not spec.endswith(".jsonl"):
                    entry["split"] = split
                counted = len(indexed) == len(specs)
                entry["rows"] = len(indexed[k]) if counted else None
                entry["broken_rows"] = len(indexed[k].errors) if counted and isinstance(indexed[k], JsonlRows) else None
                out.append(entry)
            return out

        return {
            "train": sources(self.train, self.train_set, self.train_split),
            "val": sources(self.val, self.val_set, self.val_split),
            "streaming": self.streaming,
            "columns": self.columns or None,
            "pack_tokens": self.pack_tokens,
            "independent_turns": self.independent_turns,
        }

    # ---- loaders ----

    def _loader_kwargs(self, pack_tokens: int | None = None) -> dict[str, Any]:
        pin = self.pin_memory
        if pin is None:
            pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return {
            "num_workers": self.num_workers,
            "pin_memory": pin,
            "collate_fn": PairCollator(self.processor) if self.pairs else Collator(self.processor, pack_tokens),
            # Loader seeds come from their own generator, so data loading never moves the global RNG.
            "generator": torch.Generator().manual_seed(self.seed),
        }

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        epoch_fn = (lambda: trainer.current_epoch) if trainer is not None else (lambda: 0)
        kwargs = self._loader_kwargs(self.pack_tokens)
        if self.streaming:
            # Persistent workers would keep a stale copy of the stream's epoch and resume position.
            return ResumableDataLoader(self.train_set, epoch_fn=epoch_fn, batch_size=self.batch_size, **kwargs)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        return ResumableDataLoader(
            self.train_set,
            epoch_fn=epoch_fn,
            batch_size=self.batch_size,
            sampler=sampler,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(
            self.val_set,
            batch_size=self.val_batch_size,
            shuffle=False,
            persistent_workers=self.num_workers > 0,
            **self._loader_kwargs(),
        )


class PairDataModule(VLMDataModule):
    """Preference pairs for `vlm fit-dpo` and `vlm fit-reward`: JSONL rows `{"image", "prompt", "chosen",
    "rejected"}` (`vlm.data.parse_pair`), each batch the chosen and the rejected conversations of its pairs.

    Args:
        train: Training JSONL file(s) of pairs.
        val: Validation JSONL file(s) of pairs (held out: preference accuracy); none skips validation.
        batch_size: Pairs per device per step.
        val_batch_size: Validation batch size (default: `batch_size`).
        num_workers: Loader worker processes per device (0 loads in the main process).
        max_length: Conversations longer than this many tokens (image tokens included) count as broken.
        max_bad_fraction: Stop with an error when more than this fraction of an epoch's rows are broken.
        seed: Shuffle seed (the order also changes with the epoch).
    """

    pairs = True

    def __init__(
        self,
        train: str | list[str] | None = None,
        val: str | list[str] | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 1,
        max_length: int | None = None,
        max_bad_fraction: float = 0.05,
        seed: int = 0,
    ):
        super().__init__(
            train,
            val,
            batch_size,
            val_batch_size=val_batch_size,
            num_workers=num_workers,
            max_length=max_length,
            max_bad_fraction=max_bad_fraction,
            seed=seed,
            generate_samples=0,
        )

    def in_order(self, split: str) -> DataLoader | None:
        """One pass over the pairs of `split` (train or val) in file order, or None if it has none."""
        dataset = self.train_set if split == "train" else self.val_set
        if dataset is None:
            return None
        return DataLoader(dataset, batch_size=self.val_batch_size, shuffle=False, **self._loader_kwargs())


class PromptDataModule(VLMDataModule):
    """Question rows for `vlm fit-grpo`: every training row is a prompt whose answers the policy samples and the
    rewards score (its `answer`, any list of references, and its other fields are what rewards compare with); other
    rows are broken. Validation is as `vlm fit`'s (loss, and answers to `generate_samples` rows), plus their reward.
    Every option is `VLMDataModule`'s; the data is neither streamed nor packed."""

    prompts = True


# ---- broken-row accounting -----------------------------------------------------------------------------------------


def bad_rows_report(what: str, bad: list[tuple[str, str]], total: int, examples: int = 3) -> str:
    """One paragraph: how many rows were broken, and the first few reasons."""
    share = 100 * len(bad) / max(total, 1)
    lines = [f"{what}: {len(bad)} of {total} rows broken and skipped ({share:.2f}%)"]
    lines += [f"  {message}" for _, message in bad[:examples]]
    if len(bad) > examples:
        lines.append(f"  ... and {len(bad) - examples} more")
    return "\n".join(lines)


def check_bad_fraction(
    num_bad: int, total: int, limit: float, what: str, bad: list[tuple[str, str]], examples: int = 3
) -> None:
    """Raises a one-line `VLMError` when more than `limit` of `total` rows are broken, naming the first few."""
    if total > 0 and num_bad / total > limit:
        first = "; ".join(message for _, message in bad[:examples]) or "see the reports above"
        raise VLMError(
            f"{num_bad} of {total} rows ({100 * num_bad / total:.1f}%) of the {what} are broken, more than "
            f"data.max_bad_fraction={limit}; first: {first}"
        )
