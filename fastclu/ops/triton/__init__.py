"""Triton backend: every op as fused multi-tensor Triton kernels (one launch per dtype group).

Importing this package registers the kernels; it is imported lazily by the registry so that
``TRITON_INTERPRET=1`` can be set before triton is first loaded.
"""

from fastclu.ops.triton import combine, fisher, gram, hvp, lerp, masks, merge, perturb  # noqa: F401
