"""Triton backend: every op as fused multi-tensor Triton kernels (one launch per dtype group).

Importing this package registers the kernels; it is imported lazily by the registry so that
``TRITON_INTERPRET=1`` can be set before triton is first loaded.
"""

import importlib

from fastclu._registry import FAMILIES

# one module per op family (fastclu._registry.OPS): importing it registers its ops
for _family in FAMILIES:
    importlib.import_module(f"fastclu.ops.triton.{_family}")
