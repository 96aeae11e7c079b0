"""Recorded model shape lists and size sweeps."""

from __future__ import annotations

import math

import pytest

from fastclu import bench


def test_model_shape_lists_have_the_published_sizes() -> None:
    count = {name: sum(math.prod(s) for s in fn()) for name, fn in bench.MODEL_SHAPES.items()}
    # torchvision resnet18 / vit_b_16 and Hugging Face gpt2 (tied LM head) parameter counts.
    assert count == {"resnet18": 11_689_512, "vit_b16": 86_567_656, "gpt2_124m": 124_439_808}
    # The e2e network is an independent formulation (nn.Module) of the same architecture.
    for width in (4, 64):
        model_shapes = [tuple(p.shape) for p in bench.ResNet18(10, width).parameters()]
        assert model_shapes == bench.resnet18_shapes(10, width, stem="cifar")


@pytest.mark.parametrize("numel", [1, 7, 1000, 2**16, 2**20 + 3])
def test_split_shapes(numel: int) -> None:
    shapes = bench.split_shapes(numel)
    assert sum(math.prod(s) for s in shapes) == numel
    assert all(len(s) == 2 and min(s) > 0 for s in shapes)
    if numel >= 8:
        assert len(shapes) == 4
