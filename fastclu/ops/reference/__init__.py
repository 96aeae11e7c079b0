"""Pure-PyTorch reference backend: the specification every kernel is tested against.

Importing this package registers every reference op (the ``@register`` decorators run on import).
"""

from __future__ import annotations

import importlib

from fastclu._registry import FAMILIES

# one module per op family (fastclu._registry.OPS): importing it registers its ops
for _family in FAMILIES:
    importlib.import_module(f"fastclu.ops.reference.{_family}")
