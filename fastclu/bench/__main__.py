"""``python -m fastclu.bench`` = ``fastclu bench``."""

from fastclu.bench.cli import main

raise SystemExit(main())
