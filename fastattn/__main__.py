"""``python -m fastattn ...``: the command line of :mod:`fastattn.cli`."""

from fastattn.cli import main

raise SystemExit(main())
