"""``python -m finetune_studio.engine db``: check the studio's database, or recover a damaged one.

python -m finetune_studio.engine db check      exit 0 when the database is fine, 1 (and why) when damaged
python -m finetune_studio.engine db recover    keep the damaged file (renamed *.corrupt-<time>), start a fresh
                                               database and copy into it every row that can still be read, of
                                               every table (runs, metrics, prompts, candidates, comparisons...);
                                               it prints per table what came back. Exit 0 when every row came
                                               back, 3 when some are only in the kept file (it names them)
"""

from __future__ import annotations

import argparse

from finetune_studio.core import db_recovery, paths


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_studio.engine db", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("check", "recover"))
    args = parser.parse_args(argv)
    path = paths.db_path()
    why = db_recovery.damage(path)
    if args.action == "check":
        print(f"{path}: damaged ({why})" if why else f"{path}: fine")
        return 1 if why else 0
    if not why:
        print(f"{path} is not damaged: nothing to recover")
        return 0
    result = db_recovery.recover(path)
    print(f"{path} was damaged ({why}); started a fresh database there.")
    print(result.summary())
    return 0 if result.complete else 3
