"""``python -m decograph``: the same as the ``decograph`` command."""
from __future__ import annotations

from decograph.cli import main

raise SystemExit(main())
