"""Old import paths of the Python API (from before the stage packages: `poisonlab.train`,
`poisonlab.stream`, ...) still import, with a DeprecationWarning that names the new place.

Each old name is a thin module that forwards attribute lookups to the new one, so the new module
keeps its own name and spec (pickles and tracebacks name the real place). An old module split since
into several forwards to each of them in turn (the first that has the name).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

# only the modules a user of the README's and docs' API examples imported; internal modules moved
# without an alias
MOVED: dict[str, str | tuple[str, ...]] = {
    "poisonlab.train": "poisonlab.training.trainer",
    "poisonlab.stream": "poisonlab.injection.stream",
    "poisonlab.placement": "poisonlab.injection.placement",
    "poisonlab.evaluate": ("poisonlab.evaluation.evaluator", "poisonlab.evaluation.standalone",
                           "poisonlab.evaluation.panel", "poisonlab.evaluation.prompts",
                           "poisonlab.evaluation.metrics", "poisonlab.evaluation.loading"),
    "poisonlab.sweep": "poisonlab.study.sweep",
    "poisonlab.model": "poisonlab.models.llama",
    "poisonlab.export": "poisonlab.models.export",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name: str, path=None, target=None):  # noqa: ANN001 (the finder protocol)
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):  # noqa: ANN001
        return None  # the default: a fresh module object

    def exec_module(self, module: types.ModuleType) -> None:
        new = MOVED[module.__name__]
        places = (new,) if isinstance(new, str) else new
        warnings.warn(f"{module.__name__} moved to {', '.join(places)}; import it from there (the old "
                      "path will go)", DeprecationWarning, stacklevel=2)  # warn() skips importlib's frames
        reals = [importlib.import_module(m) for m in places]

        def forward(attr: str) -> object:
            for real in reals:
                if hasattr(real, attr):
                    return getattr(real, attr)
            raise AttributeError(f"module {module.__name__!r} has no attribute {attr!r}")

        module.__getattr__ = forward
        module.__dir__ = lambda: sorted({n for real in reals for n in dir(real)})
        module.__all__ = list(dict.fromkeys(
            n for real in reals
            for n in getattr(real, "__all__", [n for n in vars(real) if not n.startswith("_")])))


def install() -> None:
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
