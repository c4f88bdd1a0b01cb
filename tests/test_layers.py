"""The two layers: the library never imports the command-line layer (task functions, run-folder policy,
exit codes, table printing, the study runner), so that it can be used, tested and grown without it."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# What each module of src/dml is; a new module must be placed in one of the two.
LIBRARY = (
    "dml.data",
    "dml.models",
    "dml.losses",
    "dml.evaluation",
    "dml.inference",
    "dml.functional",
    "dml.io",
    "dml.builders",
    "dml.checkpoints",
    "dml.config",
    "dml.callbacks",
    "dml.loggers",
    "dml.errors",
    "dml.log",
)
COMMAND_LINE = ("dml.tasks", "dml.command", "dml.runs", "dml.use", "dml.study", "hydra_plugins")


def _within(module: str, layer: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in layer)


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, src: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, at any depth (inside functions too), relative ones
    resolved."""
    name = module_name(path, src)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            found.append((node.lineno, base))
    return found


def wrong_way_imports(src: Path) -> list[str]:
    """``file:line imports module`` for each import of the command-line layer by the library, and each
    module of ``src/dml`` that is in neither layer."""
    problems = []
    for path in sorted((src / "dml").rglob("*.py")):
        name = module_name(path, src)
        if _within(name, COMMAND_LINE):
            continue
        if not (_within(name, LIBRARY) or name == "dml"):  # the package's own __init__ is library
            problems.append(f"{path.relative_to(src)} is in neither layer: add it to LIBRARY or COMMAND_LINE")
            continue
        for line, module in imported(path, src):
            if _within(module, COMMAND_LINE):
                problems.append(f"{path.relative_to(src)}:{line} imports {module}")
    return sorted(set(problems))


def test_the_library_never_imports_the_command_line_layer():
    assert wrong_way_imports(SRC) == []


@pytest.mark.parametrize(
    "planted",
    [
        "from dml.tasks import train",
        "    import dml.command as command",  # inside a function: imported when it runs
        "from ..runs import claim_run_dir",
        "from dml import study",
    ],
)
def test_a_planted_wrong_way_import_is_caught(tmp_path, planted):
    copy = tmp_path / "src"
    shutil.copytree(SRC / "dml", copy / "dml")
    target = copy / "dml" / "inference" / "index.py"
    body = f"def _late():\n{planted}\n" if planted.startswith(" ") else planted + "\n"
    target.write_text(target.read_text() + "\n\n" + body)
    lines = len(target.read_text().splitlines())
    problems = wrong_way_imports(copy)
    assert len(problems) >= 1 and all(p.startswith(f"dml/inference/index.py:{lines}") for p in problems), (
        problems
    )


def test_a_module_outside_both_layers_is_named(tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(SRC / "dml", copy / "dml")
    (copy / "dml" / "extras.py").write_text("X = 1\n")
    assert wrong_way_imports(copy) == ["dml/extras.py is in neither layer: add it to LIBRARY or COMMAND_LINE"]
