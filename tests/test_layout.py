"""The package's rooms and the direction of its arrows (tune_sana/__init__.py draws them).

Every import statement in tune_sana/ and trials/ is read with ``ast``, also the ones inside
functions (a lazy import is still a dependency), and checked for two things: no import circle
between modules, and no room importing what it must not (training/data never Ray or the engine;
record/analysis never Ray or torch; trials never Ray).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tune_sana", "trials")

# Room -> prefixes of modules it must not import (internal modules or third-party packages).
# Libraries that pull in torch (diffusers, peft, transformers) count as torch.
TORCH = ("torch", "diffusers", "peft", "transformers", "safetensors.torch")
RAY = ("ray",)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "tune_sana.config": ("tune_sana", *TORCH, *RAY),
    "tune_sana.outcomes": ("tune_sana", *TORCH, *RAY),
    "tune_sana.data": (*RAY, "tune_sana.training", "tune_sana.engine", "tune_sana.record",
                       "tune_sana.analysis", "tune_sana.cli", "tune_sana.testing", "trials"),
    "tune_sana.training": (*RAY, "tune_sana.engine", "tune_sana.record", "tune_sana.analysis",
                           "tune_sana.cli", "tune_sana.testing", "trials"),
    "tune_sana.record": (*RAY, *TORCH, "optuna", "tune_sana.training", "tune_sana.data",
                         "tune_sana.device", "tune_sana.engine", "tune_sana.analysis",
                         "tune_sana.cli", "tune_sana.testing"),
    "tune_sana.analysis": (*RAY, *TORCH, "optuna", "tune_sana.training", "tune_sana.data",
                           "tune_sana.device", "tune_sana.engine", "tune_sana.cli",
                           "tune_sana.testing"),
    "tune_sana.engine": ("tune_sana.cli", "tune_sana.testing"),
    "trials": (*RAY, "tune_sana.engine", "tune_sana.cli", "tune_sana.testing"),
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """Every module ``path`` imports, anywhere in the file; ``from a import b`` counts as
    ``a.b`` when that is a known module, else as ``a``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return found


def import_graph(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules it imports (internal ones by full name, external by theirs)."""
    files = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    known = set(files)
    return {name: imports_of(path, name, known) for name, path in files.items()}


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, or a module importing itself
    (Tarjan's algorithm, iterative); only edges between modules of ``graph`` count."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start] & graph.keys())))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child] & graph.keys()))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    found.append(sorted(component))
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(graph: Mapping[str, set[str]],
               forbidden: Mapping[str, tuple[str, ...]] = FORBIDDEN) -> list[str]:
    """'importer -> imported (room rule)' for each import a room must not make."""
    out = []
    for module, imported in sorted(graph.items()):
        for room, banned in forbidden.items():
            if not _within(module, room):
                continue
            for target in sorted(imported):
                if _within(target, room):
                    continue  # a room may import its own modules
                hit = next((b for b in banned if _within(target, b)), None)
                if hit is not None:
                    out.append(f"{module} -> {target} ({room} must not import {hit})")
    return out


# --- the package as it is --------------------------------------------------------------------

def test_no_import_circle() -> None:
    assert cycles(import_graph(ROOT)) == []


def test_rooms_import_in_one_direction() -> None:
    assert violations(import_graph(ROOT)) == []


def test_every_room_says_what_lives_there() -> None:
    for room in ("training", "data", "engine", "record", "analysis", "testing"):
        init = ROOT / "tune_sana" / room / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.splitlines()) >= 2, room
        tree = ast.parse(init.read_text())
        assert not any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body), room


@pytest.mark.parametrize("module", ["tune_sana.analysis.report", "tune_sana.analysis.plots",
                                    "tune_sana.analysis.best", "tune_sana.record.writer"])
def test_analysis_and_record_load_without_torch_or_ray(module: str) -> None:
    code = (f"import sys, {module}; "
            "bad = sorted(m for m in ('torch', 'ray', 'diffusers', 'optuna') if m in sys.modules);"
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_drivers_preflight_loads_neither_diffusers_nor_a_tensorboard_logger(
        demo_base: Path) -> None:
    """The driver never trains: checking the demo space (demo base built) and making its run
    config import no diffusers (~3 s a sweep through training/models.py) and no tensorboardX
    (Ray's default TensorBoard logger imports torch's summary writers: engine/trackers.py)."""
    code = ("import sys; from tune_sana.engine import preflight, space, sweep; "
            "from tune_sana.record.storage import Location; "
            "from ray.tune.utils.callback import _create_default_callbacks as defaults; "
            "spec = space.load(None); preflight.check_local(spec); "
            "run = sweep._run_config(spec, Location.of('/tmp/x/y'), None); "
            "names = [type(c).__name__ for c in defaults(run.callbacks)]; "
            "assert 'TBXLoggerCallback' not in names, names; "
            "bad = sorted(m for m in ('diffusers', 'tensorboardX', 'peft') if m in sys.modules);"
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


# --- the checker itself fails where it should --------------------------------------------------

def _write(root: Path, files: Mapping[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checker_finds_a_circle_through_a_lazy_import(tmp_path: Path) -> None:
    root = _write(tmp_path, {
        "tune_sana/__init__.py": "",
        "tune_sana/analysis/__init__.py": "",
        "tune_sana/analysis/report.py": "from tune_sana.analysis.plots import draw\n",
        "tune_sana/analysis/plots.py": "def draw():\n    from tune_sana.analysis import report\n",
        "tune_sana/analysis/best.py": "from . import plots\n",
    })
    graph = import_graph(root, ["tune_sana"])
    assert graph["tune_sana.analysis.best"] == {"tune_sana.analysis.plots"}
    assert cycles(graph) == [["tune_sana.analysis.plots", "tune_sana.analysis.report"]]


def test_checker_finds_a_forbidden_direction(tmp_path: Path) -> None:
    root = _write(tmp_path, {
        "tune_sana/__init__.py": "",
        "tune_sana/training/__init__.py": "",
        "tune_sana/training/guard.py": "import ray.tune\nfrom tune_sana.engine import sweep\n",
        "tune_sana/record/__init__.py": "",
        "tune_sana/record/writer.py": "def f():\n    import torch\n",
        "tune_sana/engine/__init__.py": "",
        "tune_sana/engine/sweep.py": "import ray\nimport torch\n",
    })
    found = violations(import_graph(root, ["tune_sana"]))
    assert found == [
        "tune_sana.record.writer -> torch (tune_sana.record must not import torch)",
        "tune_sana.training.guard -> ray.tune (tune_sana.training must not import ray)",
        "tune_sana.training.guard -> tune_sana.engine.sweep "
        "(tune_sana.training must not import tune_sana.engine)",
    ]
