"""Every training recipe in samples/configs parses with LightningCLI (as `--print_config` does), without training."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from peft import PeftModel
from vlm.train.cli import main, make_cli

from vlm.lora import LoraSettings

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "samples" / "configs").glob("*.yaml"))
# Recipes of the preference and reinforcement methods, and their commands; the others are `vlm fit`'s.
METHOD_RECIPES = {"dpo.yaml": "fit-dpo", "reward.yaml": "fit-reward", "grpo.yaml": "fit-grpo"}


def assert_within(given, resolved, where: str) -> None:
    if isinstance(given, dict):
        for key, value in given.items():
            assert_within(value, resolved[key], f"{where}.{key}")
    elif isinstance(given, list) and given and isinstance(given[0], dict):
        assert len(resolved) == len(given), where
        for k, (value, got) in enumerate(zip(given, resolved)):
            assert_within(value, got, f"{where}[{k}]")
    else:
        assert resolved == given, where


def test_the_recipes_are_there():
    expected = {"tiny.yaml", "align.yaml", "instruct.yaml", "nanovlm-222m.yaml", *METHOD_RECIPES}
    assert expected <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_recipe_parses(config, capsys):
    with pytest.raises(SystemExit) as e:
        main([METHOD_RECIPES.get(config.name, "fit"), "--config", str(config), "--print_config"])
    assert e.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    given = yaml.safe_load(config.read_text())
    # Every value the recipe sets survives parsing (the resolved config adds the defaults).
    for section in ("model", "data", "trainer"):
        for key, value in given[section].items():
            if key != "callbacks":
                assert_within(value, resolved[section][key], f"{section}.{key}")
    assert [c["class_path"] for c in resolved["trainer"]["callbacks"]] == [
        c["class_path"] for c in given["trainer"]["callbacks"]
    ]


def test_unknown_option_is_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(CONFIGS[0]), "--model.no_such_option", "1", "--print_config"])
    assert e.value.code == 2


@pytest.mark.parametrize(
    ("args", "printed", "settings"),
    [
        (["--model.lora", "true"], "lora: true", LoraSettings()),
        (["--model.lora=true", "--model.lora.r", "4"], "r: 4", LoraSettings(r=4)),
        (["--model.lora", "false"], "lora: false", None),
        ([], "lora: null", None),
    ],
)
def test_lora_true_means_the_default_settings(capsys, args, printed, settings):
    """`--model.lora true` parses (not a usage dump) and trains adapters with `LoraSettings`' defaults."""
    tiny = str(CONFIGS[0].parent / "tiny.yaml")
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", tiny, *args, "--print_config"])
    assert e.value.code in (0, None) and printed in capsys.readouterr().out
    model = make_cli(["--config", tiny, *args], run=False).model
    assert model.lora == settings
    assert isinstance(model.vlm.decoder, PeftModel) == (settings is not None)
