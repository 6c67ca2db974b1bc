"""syncfs(2), which Python's os module lacks, through the C library.

Kept free of Trio so that the configuration checks can ask whether the
``filesystem`` sync mode is available without importing the daemon.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

SYNC_MODES = ("filesystem", "file")


def _load() -> Callable[[int], None] | None:
    """Return a syncfs wrapper, or None where the C library lacks it."""
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]

    def syncfs(fd: int) -> None:
        """Sync the whole file system that contains the open file fd."""
        if function(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return syncfs


syncfs = _load()


def default_sync_mode() -> str:
    """Return "filesystem" where syncfs exists, else "file"."""
    return "filesystem" if syncfs is not None else "file"
