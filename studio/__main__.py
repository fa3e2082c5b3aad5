"""``python -m studio`` / ``finetune-studio``: open Finetune Studio."""

from __future__ import annotations

import sys


def main() -> int:
    # sqlite-utils imports pandas (and pyarrow) when they are installed: two seconds of start-up for
    # nothing, since the app never hands it a DataFrame. Marking it absent makes that import fail fast.
    if "pandas" not in sys.modules:
        sys.modules["pandas"] = None  # type: ignore[assignment]
    from studio.app import run

    return run(sys.argv)


if __name__ == "__main__":
    sys.exit(main())
