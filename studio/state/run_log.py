"""A run's ``engine.log`` read from the end and then as it grows: the Log tab of a run opened from the database
(a past run, or one that trains in the background after the app was closed) shows what the engine wrote."""

from __future__ import annotations

import os
from pathlib import Path

LOG_FILE = "engine.log"
FIRST_BYTES = 1 << 20  # the first read shows at most the last MiB of a long log


class LogFile:
    """Reads whole new lines of one log file; the first call starts from the last ``FIRST_BYTES``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.offset: int | None = None  # None: not read yet
        self._partial = b""

    @classmethod
    def of_run(cls, run_dir: str) -> LogFile | None:
        return cls(Path(run_dir) / LOG_FILE) if run_dir else None

    def read_new(self) -> list[str]:
        """The lines written since the last call (a line still being written waits for its end)."""
        try:
            with open(self.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if self.offset is None or size < self.offset:  # first read, or the file was replaced
                    self.offset = max(0, size - FIRST_BYTES)
                    self._partial = b""
                    skip_first = self.offset > 0  # we start in the middle of a line
                else:
                    skip_first = False
                fh.seek(self.offset)
                data = fh.read(size - self.offset)
        except OSError:
            return []
        self.offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        if skip_first and lines:
            lines = lines[1:]
        return [line.decode("utf-8", errors="replace").rstrip("\r") for line in lines]
