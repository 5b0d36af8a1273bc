"""Built-in tasks: how each model of `jattn.models` trains on the shared engine.

Each module of this package registers its task(s) with `@register_task(name)`; importing
the package imports them all (`jattn.train.task.build_task` does it on first use).
"""

from __future__ import annotations

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
