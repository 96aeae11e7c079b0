"""How far each kernel backend has been verified: a static record, edited by hand after a run.

Automatic backend choice on CUDA tensors follows it: a backend whose kernel suite has passed on
a GPU beats one that has only been checked on the CPU, and between two unverified backends the
one with the stronger CPU evidence wins. ``fastclu info`` prints it.
"""

from __future__ import annotations

from typing import NamedTuple


class Evidence(NamedTuple):
    """``gpu``: the GPU run that verified the backend (None: none has); ``cpu``: what runs in CI
    without a GPU; ``strength``: ranks CPU evidence between backends no GPU run has verified."""

    gpu: str | None
    cpu: str
    strength: int


EVIDENCE: dict[str, Evidence] = {
    "cuda": Evidence(
        gpu=None,
        cpu="the shared kernel suite on CPU tensors, the unchanged csrc kernels compiled by g++ with a host "
        "shim (csrc/cpu: real barriers and warp collectives, random block and thread orders, bit-exact "
        "fp16/bf16 rounding)",
        strength=2,
    ),
    "triton": Evidence(
        gpu=None,
        cpu="the shared kernel suite under TRITON_INTERPRET=1 (programs run one at a time, casts truncate: "
        "fp16/bf16 checked to a looser tolerance); kernels also compiled to sm_90 SASS",
        strength=1,
    ),
}


def auto_order(candidates: tuple[str, ...]) -> list[str]:
    """``candidates`` by evidence, strongest first (GPU-verified first; stable on ties)."""
    return sorted(candidates, key=lambda b: (EVIDENCE[b].gpu is None, -EVIDENCE[b].strength))


def summary() -> dict[str, dict[str, str | None]]:
    """Per backend: ``{"gpu": how it was verified on a GPU or None, "cpu": what runs without one}``."""
    return {b: {"gpu": e.gpu, "cpu": e.cpu} for b, e in EVIDENCE.items()}
