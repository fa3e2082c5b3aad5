"""Early stopping on the eval loss, with the best adapter kept in ``<run_dir>/best/`` (PEFT's format).

Patience counts evaluations: training stops once ``patience`` evaluations in a row have not beaten the best one.
The best is the lowest eval loss, or, for an objective that chooses by one of its figures (GRPO: the held-out
reward, ``Objective.best_metric``), the highest of that figure: :meth:`EarlyStopping.observe` gets it as a score,
lower being better. The state travels in each checkpoint's ``trainer_state.json``, so a resumed run stops where an
uninterrupted one would. ``best/`` is written under a temporary name and renamed, so it always holds one whole adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune_studio.engine import checkpoint


@dataclass
class EarlyStopping:
    patience: int  # 0: off (nothing is tracked or saved)
    run_dir: Path
    best_eval_loss: float | None = None  # the best evaluation's eval loss
    best_step: int = 0
    bad_evals: int = 0  # evaluations since the best one
    best_score: float | None = None  # what chose it, lower being better (the eval loss unless told otherwise)
    criterion: str = ""  # "": the eval loss; else the name of the figure that chooses (the highest is the best)

    @property
    def best_dir(self) -> Path | None:
        folder = Path(self.run_dir) / "best"
        return folder if self.best_eval_loss is not None and folder.is_dir() else None

    @property
    def spent(self) -> bool:
        return bool(self.patience) and self.bad_evals >= self.patience

    def observe(
        self,
        step: int,
        eval_loss: float,
        model,
        extra: Callable[[Path], None] | None = None,
        score: float | None = None,
    ) -> bool:
        """Count one evaluation; True when it is the best so far (its adapter is then saved to best/, with the
        objective's own files written by ``extra(folder)``). ``score`` chooses the best, lower being better: the
        eval loss when None."""
        score = eval_loss if score is None else score
        best = self.best_score if self.best_score is not None else self.best_eval_loss  # (a checkpoint before scores)
        if best is not None and score >= best:
            self.bad_evals += 1
            return False
        self.best_eval_loss, self.best_score, self.best_step, self.bad_evals = eval_loss, score, step, 0
        best_dir = Path(self.run_dir) / "best"
        tmp = Path(tempfile.mkdtemp(prefix=".best-tmp-", dir=self.run_dir))  # a fresh name, never a planted one
        checkpoint.save_adapter(model, tmp)
        chosen = {"step": step, "eval_loss": eval_loss, "score": score}
        (tmp / "trainer_state.json").write_text(json.dumps(chosen), encoding="utf-8")
        if extra is not None:
            extra(tmp)
        shutil.rmtree(best_dir, ignore_errors=True)
        os.replace(tmp, best_dir)
        return True

    def note(self, step: int) -> str:
        what = f"the held-out {self.criterion}" if self.criterion else "the eval loss"
        best = -(self.best_score or 0.0) if self.criterion else self.best_eval_loss
        return (
            f"Stopped early at step {step}: {what} has not improved for {self.bad_evals} "
            f"evaluations; the best ({best:.4f}, step {self.best_step}) is kept in {self.best_dir}"
        )

    def state(self) -> dict:
        """For :class:`~engine.checkpoint.TrainerState`."""
        return {
            "best_eval_loss": self.best_eval_loss,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "best_score": self.best_score,
        }

    def restore(self, state: checkpoint.TrainerState) -> None:
        self.best_eval_loss, self.best_step, self.bad_evals = state.best_eval_loss, state.best_step, state.bad_evals
        self.best_score = state.best_score
