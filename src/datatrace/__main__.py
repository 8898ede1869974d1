"""``python -m datatrace``: the command line (same as the ``datatrace`` script)."""

from .app.cli import main

raise SystemExit(main())
