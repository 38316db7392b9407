"""What the README tells a new user to run and install agrees with the repository."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from posttrain.config import parse_config

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def readme_commands(program: str) -> list[list[str]]:
    """Every command line of the README that runs `program` (in code blocks and indented examples)."""
    commands = []
    for line in README.splitlines():
        for part in line.split("&&"):
            part = part.split("#", 1)[0].strip().strip("`")
            if part.startswith(program):
                commands.append(shlex.split(part)[len(program.split()):])
    return commands


def test_the_torch_range_of_the_readme_is_the_packages() -> None:
    low, high = re.search(r"any torch (\d+\.\d+)-(\d+\.\d+) works", README).groups()
    pyproject = (REPO / "pyproject.toml").read_text()
    spec = re.search(r'"torch([^"]+)"', pyproject).group(1)
    major, minor = high.split(".")
    assert spec == f">={low},<{major}.{int(minor) + 1}", spec


def test_readme_train_commands_parse_and_recipes_keep_their_own_folders(monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    commands = readme_commands("python train.py")
    assert len(commands) >= 5
    folders: dict[str, set[str]] = {}
    for argv in commands:
        if "--config" not in argv or any("=" in a and a.startswith("--config") for a in argv):
            continue
        cfg = parse_config(argv)
        folders.setdefault(cfg.job.output_dir, set()).add(cfg.job.recipe)
    shared = {folder: recipes for folder, recipes in folders.items() if len(recipes) > 1}
    assert not shared, f"README commands of different recipes share an output folder (a run resumes there): {shared}"


def test_readme_scripts_exist() -> None:
    scripts = set(re.findall(r"python (scripts/[\w/]+\.py)", README))
    assert scripts and all((REPO / s).is_file() for s in scripts), scripts
