"""How long the Train page's rollouts table holds the event loop as a long online RL run's rollouts come in.

    python benchmarks/studio_rollouts.py [--steps N] [--per-step K]

Feeds the real table (studio/widgets/rollouts_view.py, offscreen) a run's history of N-1 steps of K rollouts at once
(opening a finished run), then one more step while a row is selected in the All steps view (a live run), and
prints the time each took (the median of 5 tries), for the incremental sorted view (the new rows inserted) and
for a full sort of every rollout per step, which it replaced.
Measured on the shared 2-core CPU under a load average of 12 (2026-12-07), 32,000 rollouts: history 332 ms
(full sort 538 ms); one more step 57 ms (full sort 270 ms).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--per-step", type=int, default=32, help="rollouts per step (prompts x G)")
    args = parser.parse_args()

    from PySide6.QtWidgets import QApplication

    from finetune_studio.studio.state.rollouts import Rollout, Rollouts
    from finetune_studio.studio.widgets.rollouts_view import RolloutsView

    app = QApplication([])
    rnd = random.Random(0)

    def items(n: int) -> list[dict]:
        return [
            {
                "prompt": f"prompt {i % 4}",
                "completion": "x" * rnd.randint(10, 300),
                "reward": rnd.choice([0.0, 0.5, 1.0, 2.0]) + rnd.random() / 10,
                "rewards": {"json_valid": rnd.random(), "exact": rnd.random()},
                "advantage": rnd.gauss(0, 1),
                "group": i % 4,
            }
            for i in range(n)
        ]

    history = [Rollout.of(s, i, it) for s in range(1, args.steps) for i, it in enumerate(items(args.per_step))]
    for incremental in (True, False):
        loads, steps = [], []
        for _ in range(5):
            rollouts = Rollouts()
            view = RolloutsView(rollouts)
            view.resize(700, 400)
            view.show()
            view.scope.setCurrentIndex(1)  # All steps
            t = time.perf_counter()
            rollouts.extend(history)
            app.processEvents()
            loads.append(time.perf_counter() - t)
            view.table.selectRow(3)
            app.processEvents()
            if not incremental:
                view.model.sorted._built = ()  # as before: every step sorts every rollout again
            t = time.perf_counter()
            rollouts.add(args.steps, items(args.per_step))
            app.processEvents()
            steps.append(time.perf_counter() - t)
            view.deleteLater()
        how = "inserted" if incremental else "full sort"
        print(
            f"{len(history) + args.per_step} rollouts ({how}): history {statistics.median(loads) * 1000:.0f} ms, "
            f"one more step {statistics.median(steps) * 1000:.0f} ms"
        )


if __name__ == "__main__":
    main()
