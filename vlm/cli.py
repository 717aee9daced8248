"""The `vlm` console script: one entry point, one typed function per subcommand.

A subcommand's options and `--help` come from its function's signature and docstring (jsonargparse);
required parameters (except `REQUIRED_OPTIONS`; plus `OPTIONAL_POSITIONALS`) are positional, a dataclass parameter is
flattened into plain options. Only the chosen subcommand's module is imported, so `vlm caption` never
pays for Lightning; `fit`/`validate` hand over to LightningCLI in `train/`.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import sys
import typing
from collections.abc import Callable

from vlm.errors import VLMError

# name -> ("module:function", one-line summary for `vlm --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "caption": ("vlm.commands:caption", "caption images, folders or JSONL files"),
    "ask": ("vlm.commands:ask", "answer a question about an image, or a JSONL file of questions"),
    "chat": ("vlm.commands:chat", "talk about an image, turn by turn"),
    "init": ("vlm.commands:init", "write an untrained checkpoint of a preset"),
    "eval": ("vlm.eval.evaluate:evaluate", "score a model (or a predictions file) on a VQA or caption benchmark"),
    "fit": ("vlm.train.cli:main", "train a model (LightningCLI; --config samples/configs/NAME.yaml)"),
    "validate": ("vlm.train.cli:main", "validate a model (LightningCLI)"),
    "import-ckpt": ("vlm.training_ckpt:import_ckpt", "make a vlm checkpoint folder from a training checkpoint (.ckpt)"),
    "export-hf": ("vlm.llava.export:export_hf", "write a transformers LLaVA folder from a vlm checkpoint"),
    "import-hf": ("vlm.llava.load:import_hf", "make a vlm checkpoint from a transformers LLaVA folder (or hub id)"),
    "data shapes": ("vlm.eval.benchmarks.shapes:generate_shapes", "generate the Sort-of-CLEVR benchmark (JSONL + PNG)"),
    "data fashion-mnist": (
        "vlm.eval.benchmarks.fashion_mnist:generate_fashion_mnist",
        "make a VQA and caption set from Fashion-MNIST (Debian package dataset-fashion-mnist)",
    ),
    "data objects": (
        "vlm.eval.benchmarks.objects:generate_objects",
        "generate a synthetic colour/shape/count/position VQA set",
    ),
    "diagnose": ("vlm.train.diagnose:diagnose", "measure whether a model reads the image (norms, probes, attention)"),
    "shapes-report": ("vlm.eval.benchmarks.shapes_report:shapes_report", "read shapes answers back against the scenes"),
    "bench": ("vlm.eval.bench:bench", "measure training and generation speed against a transformers LLaVA baseline"),
    "baselines": (
        "vlm.eval.baselines.cnn:baselines",
        "question-only and small-CNN accuracy on a VQA set: what a VLM must beat",
    ),
    "probe": (
        "vlm.eval.baselines.probe:probe",
        "linear-probe accuracy of a frozen image encoder: the ceiling for its VLM",
    ),
}
OPTIONAL_POSITIONALS: dict[str, tuple[str, ...]] = {"ask": ("image", "question")}
# Required parameters that read better as options than as positionals.
REQUIRED_OPTIONS: dict[str, tuple[str, ...]] = {
    "data shapes": ("out",),
    "data fashion-mnist": ("out",),
    "data objects": ("out",),
    "diagnose": ("data",),
    "baselines": ("train", "test"),
    "probe": ("train", "test"),
}
LIGHTNING_COMMANDS = {"fit", "validate"}


def _load(target: str) -> Callable:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "usage: vlm COMMAND [options]   (vlm COMMAND --help for its options)\n\ncommands:\n" + "\n".join(lines)


def _docs(fn: Callable) -> dict[str, str]:
    from docstring_parser import parse

    return {p.arg_name: p.description or "" for p in parse(fn.__doc__ or "").params}


def _dashes_to_underscores(args: list[str]) -> list[str]:
    """Accept `--max-new-tokens` as well as `--max_new_tokens` (only option names change, never values)."""
    out = []
    for a in args:
        if a.startswith("--") and len(a) > 2:
            name, eq, value = a[2:].partition("=")
            a = "--" + name.replace("-", "_") + eq + value
        out.append(a)
    return out


def build_parser(name: str, fn: Callable):
    """The jsonargparse parser for one subcommand function."""
    from jsonargparse import ActionYesNo, ArgumentParser

    hints = typing.get_type_hints(fn)
    sig = inspect.signature(fn)
    docs = _docs(fn)
    parser = ArgumentParser(prog=f"vlm {name}", description=(fn.__doc__ or "").split("\n\n")[0], exit_on_error=True)
    positional, flattened = [], {}
    for p in sig.parameters.values():
        hint = hints.get(p.name)
        inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if dataclasses.is_dataclass(inner[0]):
            flattened[p.name] = inner[0]
        elif p.name in REQUIRED_OPTIONS.get(name, ()):
            parser.add_argument(f"--{p.name}", required=True, help=docs.get(p.name, ""))
            positional.append(p.name)
        elif p.default is p.empty or p.name in OPTIONAL_POSITIONALS.get(name, ()):
            is_list = typing.get_origin(hint) is list
            required = p.default is p.empty
            nargs = ("+" if required else "*") if is_list else (None if required else "?")
            parser.add_argument(
                p.name, nargs=nargs, help=docs.get(p.name, ""), **({} if required else {"default": p.default})
            )
            positional.append(p.name)
        elif hint is bool:  # a bare --flag means true (and --no_flag false)
            parser.add_argument(f"--{p.name}", action=ActionYesNo, default=p.default, help=docs.get(p.name, ""))
            positional.append(p.name)
    parser.add_function_arguments(fn, skip=set(positional) | set(flattened), fail_untyped=True)
    for cls in flattened.values():
        parser.add_class_arguments(cls, nested_key=None)
    return parser, flattened


def run(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if rest and f"{name} {rest[0]}" in COMMANDS:  # two-word commands, e.g. `vlm data shapes`
        name, rest = f"{name} {rest[0]}", rest[1:]
    if name not in COMMANDS:
        raise VLMError(f"unknown command {name!r}\n{_usage()}")
    fn = _load(COMMANDS[name][0])
    if name in LIGHTNING_COMMANDS:
        fn([name, *rest])
        return 0
    parser, flattened = build_parser(name, fn)
    values = parser.parse_args(_dashes_to_underscores(rest)).as_dict()
    values.pop("config", None)
    for param, cls in flattened.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        values[param] = cls(**{k: values.pop(k) for k in list(values) if k in fields})
    result = fn(**values)
    if isinstance(result, dict):  # a summary (e.g. of generated files): print it for the user and for scripts
        print(json.dumps(result, indent=2))
        return 0
    return result or 0


def main(argv: list[str] | None = None) -> None:
    """Runs a subcommand; input problems end as one line on stderr and exit code 2, never a traceback."""
    args = sys.argv[1:] if argv is None else argv
    debug = os.environ.get("VLM_DEBUG") == "1"
    try:
        code = run(args)
    except VLMError as e:
        if debug:
            raise
        print(f"vlm: error: {e}", file=sys.stderr)
        code = e.exit_code
    except ValueError as e:  # argument checks in pure-python modules (e.g. data generators) raise ValueError
        if debug:
            raise
        print(f"vlm: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("vlm: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    sys.exit(code)


if __name__ == "__main__":
    main()
