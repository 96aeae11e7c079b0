"""Pure-PyTorch reference backend: the specification every kernel is tested against.

Importing this package registers every reference op (the ``@register`` decorators run on import).
"""

from __future__ import annotations

from fastclu.ops.reference import combine, fisher, gram, hvp, lerp, masks, merge, perturb  # noqa: F401
