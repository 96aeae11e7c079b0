"""``python -m fastclu ...``: same as the ``fastclu`` console script."""

from fastclu.cli import main

raise SystemExit(main())
