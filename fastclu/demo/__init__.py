"""The application on top of the library: ``fastclu demo`` scenarios, their tables and plots.

``digits`` holds the unlearning, continual-learning and CLU scenarios on scikit-learn's bundled
digits data (the default). The CLI calls :func:`main`.
"""

from __future__ import annotations

from fastclu.demo.digits import main, run_demo

__all__ = ["main", "run_demo"]
