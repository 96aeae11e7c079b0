"""Parameter shape lists: recorded models (written out from the architectures, no torchvision) and
size sweeps."""

from __future__ import annotations

import math
import re
from collections.abc import Callable


def resnet18_shapes(num_classes: int = 1000, width: int = 64, stem: str = "imagenet") -> list[tuple[int, ...]]:
    """ResNet-18 trainable parameters in ``named_parameters`` order (BatchNorm weight and bias).

    ``stem="imagenet"``: 7x7 conv (torchvision's resnet18, 11,689,512 parameters at 1000 classes);
    ``stem="cifar"``: 3x3 conv (the CIFAR variant used by SFR-on).
    """
    out: list[tuple[int, ...]] = []
    k = 7 if stem == "imagenet" else 3
    out += [(width, 3, k, k), (width,), (width,)]
    cin = width
    for stage, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
        for block in range(2):
            stride = 2 if (stage > 0 and block == 0) else 1
            out += [(cout, cin, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if stride != 1 or cin != cout:
                out += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    out += [(num_classes, cin), (num_classes,)]
    return out


def vit_b16_shapes(
    num_classes: int = 1000, dim: int = 768, depth: int = 12, mlp: int = 3072, patch: int = 16, image: int = 224
) -> list[tuple[int, ...]]:
    """ViT-B/16 parameters as torchvision's ``vit_b_16`` holds them (86,567,656 at the defaults)."""
    tokens = (image // patch) ** 2 + 1
    out: list[tuple[int, ...]] = [(1, 1, dim), (dim, 3, patch, patch), (dim,), (1, tokens, dim)]
    for _ in range(depth):
        out += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,), (dim,), (dim,)]
        out += [(mlp, dim), (mlp,), (dim, mlp), (dim,)]
    out += [(dim,), (dim,), (num_classes, dim), (num_classes,)]
    return out


def gpt2_shapes(vocab: int = 50257, ctx: int = 1024, dim: int = 768, depth: int = 12) -> list[tuple[int, ...]]:
    """GPT-2 parameters (Conv1D layout, LM head tied to ``wte``): 124,439,808 at the defaults."""
    out: list[tuple[int, ...]] = [(vocab, dim), (ctx, dim)]
    for _ in range(depth):
        out += [(dim,), (dim,), (dim, 3 * dim), (3 * dim,), (dim, dim), (dim,)]
        out += [(dim,), (dim,), (dim, 4 * dim), (4 * dim,), (4 * dim, dim), (dim,)]
    out += [(dim,), (dim,)]
    return out


MODEL_SHAPES: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "resnet18": resnet18_shapes,
    "vit_b16": vit_b16_shapes,
    "gpt2_124m": gpt2_shapes,
}

DEFAULT_LOG2_SIZES = (16, 18, 20, 22, 24, 26, 28)
QUICK_GPU_LOG2_SIZES = (16, 20, 24)
CPU_LOG2_SIZES = (10, 14)  # harness check only


def split_shapes(numel: int, parts: int = 4) -> list[tuple[int, ...]]:
    """``numel`` elements split into ``parts`` 2-d tensors of halving sizes (1/2, 1/4, ..., rest).

    Unequal sizes so multi-tensor tables are exercised; 2-d so per-row ops see rows.
    """
    sizes, left = [], numel
    for _i in range(parts - 1):
        s = max(left // 2, 1) if left > 1 else 0
        if s == 0:
            break
        sizes.append(s)
        left -= s
    if left:
        sizes.append(left)
    out = []
    for s in sizes:
        cols = math.gcd(s, 1024)
        out.append((s // cols, cols))
    return out


def size_shapes(size: str) -> list[tuple[int, ...]]:
    """Shape list for a size label: ``"2^k"`` (split in a few tensors) or a model name."""
    if size in MODEL_SHAPES:
        return MODEL_SHAPES[size]()
    m = re.fullmatch(r"2\^(\d+)", size)
    if not m:
        raise ValueError(f"size must be '2^k' or one of {sorted(MODEL_SHAPES)}, got {size!r}")
    return split_shapes(2 ** int(m.group(1)))
