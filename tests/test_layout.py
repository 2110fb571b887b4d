"""Imports point one way between the rooms of the code.

tools → lsp_server, training, team_engine → denoiser → fim, kernels. Every import of every
module is read with `ast` (lazy ones inside functions included), so a module
that reaches against that order fails here, by name and line. Only the CLI
entry point may reach every room, to dispatch its subcommands.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# room -> rooms its modules may import (besides their own)
ALLOWED = {
    "fim": set(),
    "kernels": set(),
    "denoiser": {"fim", "kernels"},
    "lsp_server": {"denoiser", "fim", "kernels"},
    "training": {"denoiser", "fim", "kernels"},
    "tools": {"lsp_server", "training", "team_engine", "denoiser", "fim", "kernels"},
    # The team engine (`parafill engine`) runs the denoiser for many language servers; it talks
    # to them over HTTP only, so neither side imports the other.
    "team_engine": {"denoiser", "fim", "kernels"},
}
REACHES_EVERY_ROOM = {REPO / "lsp_server" / "cli.py"}


def modules_of(room: str) -> list[Path]:
    return sorted(p for p in (REPO / room).rglob("*.py") if "node_modules" not in p.parts)


def dotted_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_rooms(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in the module that names a project room."""
    tree = ast.parse(path.read_text(encoding="utf-8") if source is None else source, filename=str(path))
    package = dotted_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's own package
                base = package[: len(package) - (node.level - 1)]
                found.append((node.lineno, base[0] if base else ""))
            elif node.module:
                found.append((node.lineno, node.module.split(".")[0]))
    return [(line, top) for line, top in found if top in ALLOWED]


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_imports_point_one_way(room):
    assert modules_of(room), f"{room}/ has no modules"
    wrong = []
    for path in modules_of(room):
        if path in REACHES_EVERY_ROOM:
            continue
        for line, target in imported_rooms(path):
            if target != room and target not in ALLOWED[room]:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not wrong, f"{room}/ may import only {sorted(ALLOWED[room]) or 'itself'}:\n" + "\n".join(wrong)


def test_the_checker_sees_lazy_and_relative_imports():
    # The rule is only as good as the reader: a lazy import inside a function must be
    # seen, and a relative import resolves inside its own package.
    lazy = "def f():\n    from training.train import run\n"
    assert imported_rooms(REPO / "denoiser" / "probe.py", lazy) == [(2, "training")]
    relative = "from ..network import x\nfrom . import families\n"
    assert imported_rooms(REPO / "denoiser" / "open_models" / "probe.py", relative) == [(1, "denoiser"), (2, "denoiser")]
    assert imported_rooms(REPO / "tools" / "probe.py", "import lsp_server.cli, os\n") == [(1, "lsp_server")]


def test_denoiser_holds_no_training_code():
    names = {p.name for p in modules_of("denoiser")}
    for training_only in ("train.py", "train_data.py", "examples.py", "tokenizer_train.py", "humaneval.py"):
        assert training_only not in names, f"denoiser/{training_only} belongs in training/ or tools/"
    assert not (REPO / "denoiser" / "corpus").exists()


def test_lsp_server_holds_only_the_server_and_cli():
    names = {p.name for p in modules_of("lsp_server")}
    assert not names & {"bench.py", "soak.py", "evaluate.py"}


def test_only_the_team_engine_imports_ray():
    # The language server and the model run without Ray; `parafill engine` alone needs it.
    found = []
    for room in sorted(ALLOWED):
        if room == "team_engine":
            continue
        for path in modules_of(room):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
                found += [f"{path.relative_to(REPO)}:{node.lineno}" for name in names if name.split(".")[0] == "ray"]
    assert found == [], "ray imported outside team_engine/: " + ", ".join(found)
