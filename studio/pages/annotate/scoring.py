"""Scoring a session's answers in the generation worker, for the queue's order, never blocking the window.

Each prompt's answers go to the worker as one ``score`` request (:class:`core.protocol.generation.Score`), one prompt
at a time, answered with one reward per answer. A reward model is scored by its folder or run id (the worker loads
it beside the model); a DPO run's adapter by its implicit reward, ``beta * sum(log pi - log pi_ref)``: the adapter is
attached as ``scorer`` and the one the run started from (its reference) as ``scorer-ref`` (none: the base). The
worker is a separate process driven through Qt's event loop (:class:`GenerationWorker`): nothing here waits.
A failure (the worker's error, or the worker dying) ends the job with a message.
"""

from __future__ import annotations

from PySide6.QtCore import QObject, Signal

from finetune_studio.core.protocol import generation as gp
from finetune_studio.studio.services.generation_worker import AdapterSpec, GenerationWorker
from finetune_studio.studio.state import annotation as an
from finetune_studio.studio.state.annotate import ScoreJob

SCORER_ADAPTER, REFERENCE_ADAPTER = "scorer", "scorer-ref"


def adapters_for(scorer: an.Scorer) -> dict[str, AdapterSpec]:
    """The adapters the worker needs attached to score with ``scorer``."""
    if scorer.kind != "implicit_dpo":
        return {}
    out = {SCORER_ADAPTER: AdapterSpec(*an.split_adapter_ref(scorer.source))}
    if scorer.reference:
        out[REFERENCE_ADAPTER] = AdapterSpec(*an.split_adapter_ref(scorer.reference))
    return out


def score_request(request_id: str, scorer: an.Scorer, job: ScoreJob) -> gp.Score:
    if scorer.kind == "reward_model":
        return gp.Score(
            id=request_id, prompt=job.prompt, candidates=job.texts, scorer="reward_model", reward_model=scorer.source
        )
    return gp.Score(
        id=request_id,
        prompt=job.prompt,
        candidates=job.texts,
        scorer="implicit_dpo",
        adapter=SCORER_ADAPTER,
        reference=REFERENCE_ADAPTER if scorer.reference else gp.BASE,
        beta=scorer.beta,
    )


class SessionScorer(QObject):
    scored = Signal(object, object, object)  # Scorer, candidate ids (tuple), rewards (list[float])
    progress = Signal(int, int)  # prompts scored, prompts to score
    finished = Signal(str)  # '' when every prompt was scored, else why it stopped

    def __init__(self, worker: GenerationWorker, parent: QObject | None = None):
        super().__init__(parent)
        self.worker = worker
        self.scorer: an.Scorer | None = None
        self._todo: list[ScoreJob] = []
        self._total = 0
        self._prepare_ids: set[str] = set()
        self._current: tuple[str, ScoreJob] | None = None  # request id, job
        worker.reply.connect(self._on_reply)
        worker.died.connect(self._on_died)

    @property
    def running(self) -> bool:
        return self._current is not None or bool(self._prepare_ids) or bool(self._todo)

    def start(self, model: str, scorer: an.Scorer, jobs: list[ScoreJob]) -> bool:
        """Score ``jobs`` with ``scorer`` (the worker holding ``model``); False when a job runs already."""
        if self.running or not jobs:
            return False
        self.scorer, self._todo, self._total = scorer, list(jobs), len(jobs)
        self.progress.emit(0, self._total)
        adapters = adapters_for(scorer)
        # A reward model is loaded by the worker itself; a DPO adapter's reward needs its base and adapters.
        self._prepare_ids = set(self.worker.prepare(model, adapters)) if adapters else set()
        if not self._prepare_ids:
            self._next()
        return True

    def stop(self) -> None:
        """Score nothing more (the request running ends on its own; its answer is dropped)."""
        was = self.running
        self._todo, self._prepare_ids, self._current = [], set(), None
        if was:
            self.finished.emit("Scoring stopped.")

    def _next(self) -> None:
        if not self._todo:
            self._current = None
            self.finished.emit("")
            return
        assert self.scorer is not None
        job = self._todo.pop(0)
        request = score_request(self.worker.new_id("score"), self.scorer, job)
        self._current = (request.id, job)
        self.worker.send(request)

    def _fail(self, message: str) -> None:
        self._todo, self._prepare_ids, self._current = [], set(), None
        self.finished.emit(message)

    def _on_reply(self, reply: gp.Reply) -> None:
        if reply.id in self._prepare_ids:
            self._prepare_ids.discard(reply.id)
            if isinstance(reply, gp.Error):
                self._fail(f"The scorer could not be loaded: {reply.message}")
            elif not self._prepare_ids and self._current is None:
                self._next()
            return
        if self._current is None or reply.id != self._current[0]:
            return
        job = self._current[1]
        if isinstance(reply, gp.Error):
            self._fail(f"Scoring failed: {reply.message}")
        elif isinstance(reply, gp.Scores):
            if len(reply.scores) != len(job.candidates):
                self._fail(f"Scoring failed: {len(reply.scores)} scores for {len(job.candidates)} answers")
                return
            assert self.scorer is not None
            self.scored.emit(self.scorer, job.candidates, list(reply.scores))
            self.progress.emit(self._total - len(self._todo), self._total)
            self._next()

    def _on_died(self, message: str) -> None:
        if self.running:
            self._fail(message)
