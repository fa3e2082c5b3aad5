"""Plot ``demo --rl``'s curves and scores into a PNG (the README's figure, ``docs/demo_rl.png``).

``python docs/plot_demo_rl.py REPORT.json [--loop LOOP.json] [--out docs/demo_rl.png]``

``REPORT.json`` is what ``finetune-engine demo --rl --json`` printed (one ``demo_rl_report`` event); ``--loop``, a
``demo --loop --json`` answer (``demo_loop_report``) whose after-DPO score stands in when the RL report has none
(``--no-dpo`` or ``--dpo-run`` left it to an earlier loop run). Drawn with pyqtgraph (the app's charting library)
off screen, so it needs no display and nothing beyond the app's own packages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _event(path: str) -> dict[str, Any]:
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"{path}: no JSON line (run the demo with --json)")
    return dict(json.loads(lines[-1]))


def _smooth(values: list[float], k: int) -> list[float]:
    """Trailing mean over ``k`` steps (a group's reward is noisy step to step)."""
    return [sum(values[max(0, i - k + 1) : i + 1]) / len(values[max(0, i - k + 1) : i + 1]) for i in range(len(values))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report")
    ap.add_argument("--loop", help="a demo --loop --json answer: its after-DPO score")
    ap.add_argument("--out", default=str(HERE / "demo_rl.png"))
    ap.add_argument("--smooth", type=int, default=5, help="steps in the trailing mean drawn over the reward")
    args = ap.parse_args(argv)

    report = _event(args.report)
    best = report.get("grpo_best_step")  # the step chosen by the validation reward
    grpo = f"GRPO (step {best})" if best else "GRPO"
    scores = {"SFT": report.get("after_sft"), "DPO (loop)": report.get("after_dpo"), grpo: report.get("after_grpo")}
    if scores["DPO (loop)"] is None and args.loop:
        scores["DPO (loop)"] = _event(args.loop).get("after_dpo")
    if report.get("before"):
        scores = {"base": report["before"], **scores}
    curves: dict[str, list[float]] = report.get("curves", {})
    steps = list(range(1, len(curves.get("reward", [])) + 1))
    if not steps:
        raise SystemExit(f"{args.report}: no GRPO curves")

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import pyqtgraph as pg
    import pyqtgraph.exporters as exporters

    pg.mkQApp()
    pg.setConfigOptions(background="w", foreground="k", antialias=True)
    win = pg.GraphicsLayoutWidget()
    win.resize(1600, 360)
    blue, orange, grey, green = (31, 119, 180), (255, 127, 14), (140, 140, 140), (44, 160, 44)

    top = 2.0 if max(curves["reward"]) > 1 else 1.0  # the exact reward is 0 or 1; earlier reports summed two
    p = win.addPlot(title=f"GRPO: mean reward of the sampled answers (0..{top:g})")
    p.addLegend(offset=(-10, -10))
    p.plot(steps, curves["reward"], pen=pg.mkPen(grey, width=1), name="per step")
    p.plot(steps, _smooth(curves["reward"], args.smooth), pen=pg.mkPen(blue, width=3), name=f"mean of {args.smooth}")
    if "reward/exact" in curves and curves["reward/exact"] != curves["reward"]:
        p.plot(steps, curves["reward/exact"], pen=pg.mkPen(orange, width=2), name="share exact")
    if "reward/fields" in curves and top == 1.0:
        p.plot(steps, curves["reward/fields"], pen=pg.mkPen(orange, width=2), name="share of fields right")
    if curves.get("eval_reward"):  # the validation prompts' greedy answers, at each evaluation
        p.plot(
            curves["eval_step"],
            curves["eval_reward"],
            pen=pg.mkPen(green, width=2),
            symbol="o",
            symbolBrush=green,
            name="validation (greedy)",
        )
    p.setLabel("bottom", "step")
    p.setXRange(1, steps[-1], padding=0.02)
    p.setYRange(0, top, padding=0.02)

    for key, title, scale in (
        ("kl", "KL to the SFT model per answer token (x 1000)", 1000.0),
        ("completion_length", "answer length (tokens)", 1.0),
    ):
        values = [v * scale for v in curves.get(key, [])]
        if not values:
            continue
        p = win.addPlot(title=title)
        p.plot(steps, values, pen=pg.mkPen(green if key == "completion_length" else blue, width=2))
        p.setLabel("bottom", "step")
        p.setXRange(1, steps[-1], padding=0.02)
        p.setYRange(0, max(values + [1e-3]) * 1.15, padding=0)

    p = win.addPlot(title=f"held-out exact match ({report.get('eval_prompts', 0)} prompts)")
    names = [n for n, s in scores.items() if s]
    values = [100 * scores[n]["exact"] for n in names]
    colors = [grey if n == "base" else orange if n.startswith("GRPO") else blue for n in names]
    p.addItem(pg.BarGraphItem(x=list(range(len(names))), height=values, width=0.6, brushes=colors))
    for i, v in enumerate(values):
        label = pg.TextItem(f"{v:.1f}%", color="k", anchor=(0.5, 1.0))
        label.setPos(i, v)
        p.addItem(label)
    p.getAxis("bottom").setTicks([list(enumerate(names))])
    p.setYRange(0, 105, padding=0)
    p.setXRange(-0.6, len(names) - 0.4, padding=0)
    p.setLabel("left", "%")

    win.show()  # off screen: lays the plots out at the window's size
    pg.mkQApp().processEvents()
    out = Path(args.out)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    exporter = exporters.ImageExporter(win.scene())
    exporter.parameters()["width"] = 1600
    exporter.export(str(tmp))
    os.replace(tmp, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
