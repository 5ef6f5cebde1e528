"""Poison recipes behind a registry. A new recipe is one file here with `@register_attack("name")`.

Every module of this package is imported below, so a recipe file registers itself without any edit
to this file, the stream or the trainer.
"""

from __future__ import annotations

import importlib
import pkgutil

from poisonlab.attacks.base import (
    ATTACKS,
    DataContext,
    Poison,
    Recipe,
    get_attack,
    iter_poisons,
    make_poisons,
    read_poisons,
    read_poisons_header,
    register_attack,
    trigger_patterns,
    write_poisons,
)

__all__ = [
    "ATTACKS",
    "DataContext",
    "Poison",
    "Recipe",
    "get_attack",
    "iter_poisons",
    "make_poisons",
    "read_poisons",
    "read_poisons_header",
    "register_attack",
    "trigger_patterns",
    "write_poisons",
]

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_") and _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")
