"""Files written atomically (a temporary name, then a rename) get the permissions a plain
``open`` or ``mkdir`` would give them: ``tempfile.mkstemp``/``mkdtemp`` make them private."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["plain_permissions"]


def plain_permissions(path: str | Path) -> None:
    """``path`` (a file, or a directory) gets mode 0666 (0777) less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)
