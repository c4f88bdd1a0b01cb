"""Every command in the code blocks of the README and the docs/ pages composes: python train.py /
evaluate.py / prepare.py lines as written, make lines as the Makefile expands them (make -n)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess

import pytest

from tests.conftest import ROOT

SCRIPTS = {
    "train.py": "train",
    "evaluate.py": "evaluate",
    "prepare.py": "prepare",
    "embed.py": "embed",
    "index.py": "index",
    "search.py": "search",
    "export.py": "export",
}


def readme_commands() -> list[str]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    blocks = [b for page in pages for b in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)]
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [
        line
        for line in lines
        if re.search(
            r"\b(train|evaluate|prepare|embed|index|search|export)\.py\b|^make (train|evaluate|data)\b", line
        )
    ]


def expand(command: str) -> list[str]:
    """The python command line a README line runs."""
    if command.startswith("make "):
        # Under `make test-all` this make is nested: drop the parent's variables, and its
        # "Entering directory" lines, so the output is just the recipe.
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
        out = subprocess.run(
            ["make", "--no-print-directory", "-n", *shlex.split(command)[1:]],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        command = next(line for line in reversed(out.stdout.splitlines()) if re.search(r"\w\.py\b", line))
    return shlex.split(command)


COMMANDS = readme_commands()


def test_the_readme_shows_commands():
    assert len(COMMANDS) > 15
    assert any(c.startswith("make train") for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_composes(compose_cfg, command):
    words = expand(re.sub(r"<[^>]*>", "x", command))
    script = next(w for w in words if w.endswith(tuple(SCRIPTS)))
    args = [w for w in words[words.index(script) + 1 :] if w not in ("-m", "--cfg", "job")]
    if "-m" in words:  # a sweep: compose its first combination
        args = [a if "[" in a else re.sub(r"=([^,]*),.*", r"=\1", a) for a in args]
    cfg = compose_cfg(args, name=SCRIPTS[script.rsplit("/", 1)[-1]])
    assert cfg.task_name == SCRIPTS[script.rsplit("/", 1)[-1]]


def test_hydra_overrides_typed_as_make_variables_reach_the_script():
    """make train DATA=cub trainer=gpu trains with trainer=gpu (make reads it as a variable of its own)."""
    words = expand(
        "make train DATA=cub trainer=gpu dataset.batch_size=240 'tags=[a, b]' ARGS='seed=3 test=false'"
    )
    args = words[words.index("train.py") + 1 :]
    assert args[:2] == ["dataset=cub", "preset=imagenet_finetune"]  # make lists its variables in any order
    assert args[2:4] == ["seed=3", "test=false"]  # ARGS, once: its words are not variables of their own
    assert sorted(args[4:]) == ["dataset.batch_size=240", "tags=[a, b]", "trainer=gpu"]
    assert "DATA=cub" not in words and expand("make evaluate CKPT=x.ckpt trainer=cpu")[-1] == "trainer=cpu"
