"""What `pip install .` (the README's first command) gives: the fast OpenGL path and safetensors by default, the
shipped weights as package data, and no command that needs a source checkout."""

import ast
import fnmatch
from pathlib import Path

import pytest

from inverse_graphics.cli import build_parser
from inverse_graphics.pretrained import WEIGHTS

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _names(requirements: list[str]) -> set[str]:
    return {r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in requirements}


def test_default_dependencies_hold_the_fast_renderer_and_safetensors():
    deps = _names(PROJECT["project"]["dependencies"])
    assert {"moderngl", "safetensors", "torch", "easypytorch3d"} <= deps


def test_the_shipped_weights_are_package_data():
    globs = PROJECT["tool"]["setuptools"]["package-data"]["inverse_graphics"]
    for file, _ in WEIGHTS.values():
        assert any(fnmatch.fnmatch(f"weights/{file}", g) for g in globs), file
        assert (REPO / "inverse_graphics" / "weights" / file).is_file()
    assert not list((REPO / "inverse_graphics" / "weights").glob("*.pt"))  # no pickles shipped


@pytest.mark.parametrize("package", PROJECT["tool"]["setuptools"]["packages"])
def test_no_packaged_module_imports_benchmarks_or_tests(package):
    for path in (REPO / package.replace(".", "/")).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("benchmarks", "tests") for n in names), path
        assert "runpy" not in path.read_text(), path


def test_every_command_works_from_an_installed_package():
    commands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert "bench" not in commands and {"convert", "infer", "train", "export"} <= commands
