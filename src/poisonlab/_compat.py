"""Old import paths of the Python API (from before the stage packages: `poisonlab.train`,
`poisonlab.stream`, ...) still import, with a DeprecationWarning that names the new place.

Each old name is a thin module that forwards attribute lookups to the new one, so the new module
keeps its own name and spec (pickles and tracebacks name the real place).
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
MOVED = {
    "poisonlab.train": "poisonlab.training.trainer",
    "poisonlab.stream": "poisonlab.injection.stream",
    "poisonlab.placement": "poisonlab.injection.placement",
    "poisonlab.evaluate": "poisonlab.evaluation.evaluator",
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
        warnings.warn(f"{module.__name__} moved to {new}; import it from there (the old path will go)",
                      DeprecationWarning, stacklevel=2)  # warn() skips importlib's frames
        real = importlib.import_module(new)
        module.__getattr__ = lambda attr: getattr(real, attr)
        module.__dir__ = lambda: dir(real)
        module.__all__ = getattr(real, "__all__", [n for n in vars(real) if not n.startswith("_")])


def install() -> None:
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
