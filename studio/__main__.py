"""``finetune-studio`` (``python -m finetune_studio.studio``): open Finetune Studio."""

from __future__ import annotations

import sys


def main() -> int:
    # sqlite-utils imports pandas (and pyarrow) when they are installed: two seconds of start-up for
    # nothing, since the app never hands it a DataFrame. Marking it absent makes that import fail fast.
    if "pandas" not in sys.modules:
        sys.modules["pandas"] = None  # type: ignore[assignment]
    from finetune_studio.core.paths import drop_checkout_from_path

    drop_checkout_from_path()
    from finetune_studio.studio.app import run

    return run(sys.argv)


if __name__ == "__main__":
    sys.exit(main())
