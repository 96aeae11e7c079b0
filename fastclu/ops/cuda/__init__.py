"""CUDA backend: thin wrappers over the compiled extension ``fastclu._C``.

Importing this package registers every op for ``backend="cuda"``. The wrappers allocate
outputs with torch, build (and cache) the multi-tensor device tables, and pass addresses,
scalars and the current stream to the extension. fp64 operands never reach this backend
(``fastclu.ops`` routes them to the reference; the kernels compute in fp32). Importing needs
the extension but no GPU; calling an op with tensors that are not on a CUDA device raises
``ValueError``. Under ``torch.compile`` the public ops route through the custom ops of
:mod:`fastclu.ops.library`.
"""

import importlib

from fastclu._registry import FAMILIES

# one module per op family (fastclu._registry.OPS): importing it registers its ops
for _family in FAMILIES:
    importlib.import_module(f"fastclu.ops.cuda.{_family}")
