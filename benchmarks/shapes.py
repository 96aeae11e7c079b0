"""Recorded parameter shape lists of ResNet-18, ViT-B/16 and GPT-2 124M (no torchvision).

The lists are written out from the architectures in :mod:`fastclu.bench` (so the installed
``fastclu bench`` command has them too); this module re-exports them and dumps them as JSON:
``python benchmarks/shapes.py [OUT.json]``.
"""

from __future__ import annotations

import json
import math
import sys

from fastclu.bench import MODEL_SHAPES, gpt2_shapes, resnet18_shapes, vit_b16_shapes

__all__ = ["MODEL_SHAPES", "as_json", "gpt2_shapes", "resnet18_shapes", "vit_b16_shapes"]


def as_json() -> dict[str, dict[str, object]]:
    """``{model: {"numel": total, "shapes": [[...], ...]}}`` for every recorded model."""
    out: dict[str, dict[str, object]] = {}
    for name, fn in MODEL_SHAPES.items():
        shapes = fn()
        out[name] = {"numel": sum(math.prod(s) for s in shapes), "shapes": [list(s) for s in shapes]}
    return out


if __name__ == "__main__":
    text = json.dumps(as_json(), indent=1)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(text + "\n")
    else:
        for name, info in as_json().items():
            print(f"{name}: {info['numel']:,} parameters in {len(info['shapes'])} tensors")
