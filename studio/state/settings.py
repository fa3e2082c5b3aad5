"""The app's remembered choices: a small JSON file in the studio's data folder.

A JSON file (not QSettings) so that the tests' private ``FINETUNE_STUDIO_HOME``
isolates it too and a person can read it. Written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune_studio.core import paths

FILENAME = "studio-settings.json"


class Settings:
    def __init__(self, path: Path | None = None):
        self.path = path or paths.data_dir() / FILENAME
        self._data: dict[str, Any] = {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                self._data = data
        except (OSError, ValueError):
            pass  # first start, or a damaged file: start from defaults

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self._data[key] = value

    def save(self) -> None:
        try:
            paths.atomic_write_text(self.path, json.dumps(self._data, indent=2, sort_keys=True))
        except OSError:
            pass  # remembering choices is a convenience; never fail the app over it
