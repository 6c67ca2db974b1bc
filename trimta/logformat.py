"""Log set-up for the daemon: one line per record on stderr, cheaply.

Each accepted message logs about three records, so the cost of a record
shows in the accept rate. The logging HOWTO's "Optimization" section
names the switches used here: the daemon's format needs no thread,
process or caller information, so none is collected.
"""

from __future__ import annotations

import logging
import sys
import time

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class SecondCachingFormatter(logging.Formatter):
    """Format the timestamp like the default, formatting each second only once."""

    def __init__(self, fmt: str = LOG_FORMAT) -> None:
        super().__init__(fmt)
        self._second: int | None = None
        self._second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime(
                self.default_time_format, self.converter(second)
            )
        return f"{self._second_text},{int(record.msecs):03d}"


def configure_logging(level: int | str) -> None:
    """Send the daemon's log records to stderr at `level`."""
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # Documented in the HOWTO: skips the stack walk for the caller's file.
    logging._srcfile = None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SecondCachingFormatter())
    logging.basicConfig(level=level, handlers=[handler])
