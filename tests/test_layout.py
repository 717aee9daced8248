"""docs/layout.md names every module of the packages, so a newcomer finds each part by its name."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layout_block() -> str:
    text = (ROOT / "docs" / "layout.md").read_text(encoding="utf-8")
    return re.search(r"```\n(.*?)```", text, re.S).group(1)


def test_the_layout_names_every_module_and_folder():
    block = layout_block()
    named = set(re.findall(r"[\w.]+\.py|[\w]+/", block))
    missing = []
    for top in ("vlm", "encoders", "train", "eval"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT / top)
            if path.name == "__init__.py" or "assets" in rel.parts:
                continue
            if path.name not in named or any(f"{folder}/" not in named for folder in rel.parts[:-1]):
                missing.append(str(path.relative_to(ROOT)))
    assert missing == []


def test_every_name_in_the_layout_exists():
    block = layout_block()
    files = {p.name for top in ("vlm", "encoders", "train", "eval") for p in (ROOT / top).rglob("*.py")}
    assert sorted(set(re.findall(r"[\w]+\.py", block)) - files) == []
