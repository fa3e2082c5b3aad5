"""Early stopping on the eval loss, with the best adapter kept in ``<run_dir>/best/`` (PEFT's format).

Patience counts evaluations: training stops once ``patience`` evaluations in a row have not beaten the best eval
loss. The state travels in each checkpoint's ``trainer_state.json``, so a resumed run stops where an uninterrupted
one would. ``best/`` is written under a temporary name and renamed, so it always holds one whole adapter.
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
    best_eval_loss: float | None = None
    best_step: int = 0
    bad_evals: int = 0  # evaluations since the best one

    @property
    def best_dir(self) -> Path | None:
        folder = Path(self.run_dir) / "best"
        return folder if self.best_eval_loss is not None and folder.is_dir() else None

    @property
    def spent(self) -> bool:
        return bool(self.patience) and self.bad_evals >= self.patience

    def observe(self, step: int, eval_loss: float, model, extra: Callable[[Path], None] | None = None) -> bool:
        """Count one evaluation; True when it is the best so far (its adapter is then saved to best/, with the
        objective's own files written by ``extra(folder)``)."""
        if self.best_eval_loss is not None and eval_loss >= self.best_eval_loss:
            self.bad_evals += 1
            return False
        self.best_eval_loss, self.best_step, self.bad_evals = eval_loss, step, 0
        best = Path(self.run_dir) / "best"
        tmp = Path(tempfile.mkdtemp(prefix=".best-tmp-", dir=self.run_dir))  # a fresh name, never a planted one
        checkpoint.save_adapter(model, tmp)
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "eval_loss": eval_loss}), encoding="utf-8")
        if extra is not None:
            extra(tmp)
        shutil.rmtree(best, ignore_errors=True)
        os.replace(tmp, best)
        return True

    def note(self, step: int) -> str:
        return (
            f"Stopped early at step {step}: the eval loss has not improved for {self.bad_evals} "
            f"evaluations; the best ({self.best_eval_loss:.4f}, step {self.best_step}) is kept in {self.best_dir}"
        )

    def state(self) -> dict:
        """For :class:`~engine.checkpoint.TrainerState`."""
        return {"best_eval_loss": self.best_eval_loss, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def restore(self, state: checkpoint.TrainerState) -> None:
        self.best_eval_loss, self.best_step, self.bad_evals = state.best_eval_loss, state.best_step, state.bad_evals
