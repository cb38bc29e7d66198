"""``python -m npystream``: the same as the ``npystream`` command."""

from npystream.cli import main

raise SystemExit(main())
