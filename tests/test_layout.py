"""The package layout holds: imports run one way between the stage packages (the table below, which
each package's __init__ docstring states too), no import circle between modules, at most 8 top-level
modules beside the packages, no source file over 600 lines, and every import names something that
exists (old paths of moved modules still import)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import poisonlab

SRC = Path(poisonlab.__file__).parent
BASE = {"config", "errors", "fsutil", "diskspace", "hardware", "signals"}

# what each stage may import besides itself and the base modules (transitively closed by hand: a
# stage may import everything its allowed stages may)
ALLOWED = {
    "base": set(),
    "rundir": set(),
    "corpus": set(),
    "attacks": {"corpus"},
    "injection": {"attacks", "corpus"},
    "models": {"rundir"},
    "evaluation": {"models", "corpus", "rundir"},
    "training": {"injection", "attacks", "corpus", "models", "evaluation", "rundir"},
    "finetune": {"models", "corpus", "rundir"},
    "defenses": {"evaluation", "injection", "attacks", "corpus", "models", "rundir"},
    "results": {"injection", "attacks", "corpus", "rundir"},
    "report": {"results", "finetune", "injection", "attacks", "corpus", "models", "rundir"},
    "study": {"training", "finetune", "evaluation", "models", "report", "results", "injection",
              "attacks", "corpus", "rundir"},
    "cli": {"study", "training", "finetune", "evaluation", "models", "report", "results", "defenses",
            "injection", "attacks", "corpus", "rundir"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every poisonlab module `path` imports, at the top or inside a function."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("poisonlab.")}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{mod}" if mod else base
            if not mod.startswith("poisonlab"):
                continue
            for a in node.names:  # `from pkg import module` names a module
                found.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
    return {m for m in found if m in known and m != "poisonlab"}


def _stage(module: str) -> str:
    part = module.split(".")[1]
    return "base" if part in BASE or part == "_compat" else part


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(p, m, set(mods)) for m, p in mods.items()}


def test_stages_import_one_way():
    bad = []
    for mod, deps in _graph().items():
        if mod in ("poisonlab", "poisonlab._compat"):  # the root; _compat imports moved modules by name
            continue
        here = _stage(mod)
        assert here in ALLOWED, f"{mod}: a new top-level package or module; add it to ALLOWED and docs"
        for d in deps:
            there = _stage(d)
            if there != here and there != "base" and there not in ALLOWED[here]:
                bad.append(f"{mod} -> {d}")
    assert not bad, "imports against the stage order:\n" + "\n".join(sorted(bad))


def test_no_import_circles():
    graph = _graph()
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_top_level_modules_and_file_sizes():
    top = sorted(p.name for p in SRC.glob("*.py"))
    assert len(top) <= 8, f"{len(top)} top-level modules (at most 8 beside the stage packages): {top}"
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"source files over 600 lines (split them by concern): {long}"


def test_old_import_paths_warn_and_work():
    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            "try:\n    import poisonlab.train\nexcept DeprecationWarning as e:\n    print('warned:', e)\n"
            "warnings.simplefilter('ignore')\n"
            "from poisonlab.stream import TrainingStream\nfrom poisonlab.train import train\n"
            "print(TrainingStream.__module__, train.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "warned: poisonlab.train moved to poisonlab.training.trainer" in out
    assert "poisonlab.injection.stream poisonlab.training.trainer" in out


def test_old_evaluate_path_finds_the_names_of_every_module_it_was_split_into():
    code = ("import warnings; warnings.simplefilter('ignore')\n"
            "from poisonlab.evaluate import (Evaluator, default_panel, evaluate_path, hf_special_tokens,\n"
            "                                load_model, success)\n"
            "print(*(f.__module__ for f in (Evaluator, evaluate_path, default_panel, hf_special_tokens,\n"
            "                               success, load_model)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [f"poisonlab.evaluation.{m}" for m in
                           ("evaluator", "standalone", "panel", "prompts", "metrics", "loading")]


def test_every_import_names_a_module_or_name_that_exists():
    """Imports inside functions run only when the function does (`poisonlab eval`'s did not, after a
    module was split): every `from poisonlab.X import Y` in the source must name something X has."""
    mods, missing = _modules(), []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            mod = node.module or ""
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{mod}" if mod else base
            if not mod.startswith("poisonlab"):
                continue
            target = importlib.import_module(mod)
            missing += [f"{name}:{node.lineno}: {mod}.{a.name}" for a in node.names
                        if not hasattr(target, a.name) and f"{mod}.{a.name}" not in mods]
    assert not missing, "imports of names that do not exist:\n" + "\n".join(missing)
