"""The `vlm` console script: one entry point, one typed function per subcommand.

A subcommand's options and `--help` come from its function's signature and docstring (jsonargparse);
required parameters (except `REQUIRED_OPTIONS`; plus `OPTIONAL_POSITIONALS`) are positional, a dataclass parameter is
flattened into plain options. jsonargparse's errors (several lines, with the usage) become one line that names the
option and what it accepts (from its type, or the dataclass's `ACCEPTED`); `vlm data` alone lists the data commands.
Only the chosen subcommand's module is imported, so `vlm caption` never pays for Lightning; `fit`/`validate` hand
over to LightningCLI in `train/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import gc
import importlib
import inspect
import json
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

from vlm.errors import OptionError, VLMError

# name -> ("module:function", one-line summary for `vlm --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "caption": ("vlm.commands:caption", "caption images, folders or JSONL files"),
    "ask": ("vlm.commands:ask", "answer a question about an image, or a JSONL file of questions"),
    "chat": ("vlm.commands:chat", "talk about an image, turn by turn"),
    "explain": ("vlm.explain:explain", "draw which image patches an answer rests on (heat map PNG + JSON scores)"),
    "serve": ("vlm.commands:serve", "serve a model over HTTP: OpenAI's chat completions API and a web page"),
    "init": ("vlm.commands:init", "write an untrained checkpoint of a preset"),
    "eval": ("vlm.eval.evaluate:evaluate", "score a model (or a predictions file) on a VQA or caption benchmark"),
    "fit": ("vlm.train.cli:main", "train a model (LightningCLI; --config samples/configs/NAME.yaml)"),
    "validate": ("vlm.train.cli:main", "validate a model (LightningCLI)"),
    "fit-dpo": ("vlm.train.cli:main", "tune a model on preference pairs: DPO, IPO or SimPO (samples/configs/dpo.yaml)"),
    "fit-reward": ("vlm.train.cli:main", "train a reward model on preference pairs (samples/configs/reward.yaml)"),
    "fit-grpo": ("vlm.train.cli:main", "tune a model with GRPO and rule-based rewards (samples/configs/grpo.yaml)"),
    "reward": ("vlm.reward:reward", "score preference pairs or answers with a reward model"),
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
    "data preference": (
        "vlm.eval.mistakes:generate_preference",
        "preference pairs from a model's wrong answers to a labelled question set (for fit-dpo, fit-reward)",
    ),
    "diagnose": ("vlm.train.diagnose:diagnose", "measure whether a model reads the image (norms, probes, attention)"),
    "shapes-report": ("vlm.eval.benchmarks.shapes_report:shapes_report", "read shapes answers back against the scenes"),
    "explain-bench": (
        "vlm.eval.explain_bench:explain_bench",
        "check explanation maps on the shapes benchmark: pointing game, deletion, uniformity",
    ),
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
OPTIONAL_POSITIONALS: dict[str, tuple[str, ...]] = {"ask": ("image", "question"), "explain": ("image", "question")}
# Required parameters that read better as options than as positionals.
REQUIRED_OPTIONS: dict[str, tuple[str, ...]] = {
    "data shapes": ("out",),
    "data fashion-mnist": ("out",),
    "data objects": ("out",),
    "data preference": ("data", "out"),
    "diagnose": ("data",),
    "explain-bench": ("data",),
    "reward": ("data", "model"),
    "baselines": ("train", "test"),
    "probe": ("train", "test"),
}
LIGHTNING_COMMANDS = {"fit", "validate", "fit-dpo", "fit-reward", "fit-grpo"}
# Every --seed reaches torch.manual_seed (or numpy's SeedSequence): one range for all, the 64 bits torch takes.
SEED_LIMIT = 2**64


def _load(target: str) -> Callable:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _group(name: str) -> list[str]:
    """The two-word commands that start with `name` (`data` -> data shapes, ...); none for other names."""
    return [n for n in COMMANDS if n.startswith(f"{name} ")]


def _usage(names: list[str] | None = None) -> str:
    """The usage line and the commands `names` (default: all) with their summaries, for `vlm --help`."""
    names = names or list(COMMANDS)
    width = max(len(n) for n in names)
    lines = [f"  {name:<{width}}  {COMMANDS[name][1]}" for name in names]
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
    parser = ArgumentParser(prog=f"vlm {name}", description=(fn.__doc__ or "").split("\n\n")[0], exit_on_error=False)
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


def _describe(hint: Any) -> str:
    """What a type hint accepts, in words (for error messages)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is list:
        return f"one or more values, each {_describe(args[0])}"
    words = {int: "an integer", float: "a finite number", bool: "true or false", str: "text"}
    return words.get(hint, getattr(hint, "__name__", str(hint)))


def _accepted(fn: Callable, flattened: dict[str, type]) -> dict[str, str]:
    """What each option of a subcommand accepts, in words: from its type, or a flattened dataclass's `ACCEPTED`."""
    hints = typing.get_type_hints(fn)
    accepted = {name: _describe(hint) for name, hint in hints.items() if name not in flattened}
    for cls in flattened.values():
        fields = typing.get_type_hints(cls)
        accepted |= {f.name: _describe(fields[f.name]) for f in dataclasses.fields(cls)}
        accepted |= getattr(cls, "ACCEPTED", {})
    return accepted


def _long_options(parser) -> list[str]:
    """The `--options` of a subcommand's parser that its `--help` shows, `--help` aside."""
    shown = [action for action in parser._actions if action.help != argparse.SUPPRESS]
    return [s for action in shown for s in action.option_strings if s.startswith("--") and s != "--help"]


def _unknown_argument(words: list[str], name: str, options: list[str]) -> VLMError:
    """The error for arguments the parser did not take: the first unknown option, with the closest known one."""
    word = next((w for w in words if w.startswith("-")), words[0])
    if not word.startswith("-"):
        return VLMError(f"unexpected argument {word!r} for vlm {name} (see vlm {name} --help)")
    option = word.split("=")[0]
    close = difflib.get_close_matches(option, options, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else f"the options are {', '.join(options)}"
    return VLMError(f"unknown option {option} for vlm {name}; {hint}")


def _missing_arguments(names: list[str], name: str, options: list[str], docs: dict[str, str]) -> VLMError:
    """The error for required arguments not given: their names (and, for one, what it takes)."""
    flags = [f"--{n}" if f"--{n}" in options else n.upper() for n in names]
    what = f": {docs[names[0]]}" if len(names) == 1 and docs.get(names[0]) else f" (see vlm {name} --help)"
    return VLMError(f"vlm {name} needs {' and '.join(flags)}{what}")


def _parse_error(message: str, name: str, fn: Callable, parser, accepted: dict[str, str]) -> VLMError:
    """jsonargparse's error `message` (several lines) as one line naming the option and what it accepts."""
    if key := re.match(r'Parser key "(\w+)"', message):
        value = re.search(r"(?:Given|Got) value: (.*)", message)
        return OptionError(key[1], accepted.get(key[1], "what --help says"), value[1] if value else None)
    what, _, rest = message.partition(": ")
    if what == "unrecognized arguments":
        return _unknown_argument(rest.split(), name, _long_options(parser))
    if what == "the following arguments are required":
        return _missing_arguments(rest.split(", "), name, _long_options(parser), _docs(fn))
    if (option := re.match(r"argument (--\w+).*: expected one argument", message)) is not None:
        return VLMError(f"{option[1]} needs a value")
    return VLMError(message.splitlines()[0])


def _check_values(values: dict[str, Any], accepted: dict[str, str]) -> None:
    """Refuses what the parser lets through: NaN and infinities (YAML's .nan, .inf) and seeds beyond 64 bits."""
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise OptionError(key, accepted[key], value)
    seed = values.get("seed")
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise OptionError("seed", f"an integer from 0 to {SEED_LIMIT - 1}", seed)


def run(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if rest and f"{name} {rest[0]}" in COMMANDS:  # two-word commands, e.g. `vlm data shapes`
        name, rest = f"{name} {rest[0]}", rest[1:]
    elif group := _group(name):  # `vlm data`, `vlm data --help`: its commands
        if rest and rest[0] not in ("-h", "--help"):
            raise VLMError(f"unknown command '{name} {rest[0]}'; the {name} commands are {', '.join(group)}")
        print(_usage(group))
        return 0 if rest else 2
    if name not in COMMANDS:
        raise VLMError(f"unknown command {name!r}\n{_usage()}")
    fn = _load(COMMANDS[name][0])
    if name in LIGHTNING_COMMANDS:
        fn([name, *rest])
        return 0
    parser, flattened = build_parser(name, fn)
    accepted = _accepted(fn, flattened)
    try:
        values = parser.parse_args(_dashes_to_underscores(rest)).as_dict()
    except argparse.ArgumentError as e:
        raise _parse_error(str(e), name, fn, parser, accepted) from None
    values.pop("config", None)
    _check_values(values, accepted)
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
        print(f"vlm: error: {'--' if isinstance(e, OptionError) else ''}{e}", file=sys.stderr)
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
    # The interpreter's last garbage collection walks every object that importing torch and transformers made: seconds
    # after the answer is printed. Frozen, they are left to the operating system, which frees the process anyway.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    main()
