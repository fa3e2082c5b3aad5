"""Generating a labelling session's candidates in the worker, several prompts per request, never blocking.

The prompts that have no items yet go in chunks of :data:`BATCH_PROMPTS`: model 1's answers (side A) to a chunk and
then model 2's (side B) are requested from the :class:`~studio.services.generation_worker.GenerationWorker` as one
``generate_batch`` each (decoded as one batch); each answer is a candidate in the store the moment its ``done``
arrives, and the chunk's items (A_i against B_i, in the prompts' order) are added to the session file when side B's
batch is in. The model
loads with :attr:`SessionGenerator.weights` (:mod:`studio.state.generation_weights`: the options and what each
costs).
A killed worker stops the job with a message; the next :meth:`start` starts a new worker and goes on with the
prompts still missing (seeded sampling gives the same answers again, so nothing is stored twice).
"""

from __future__ import annotations

from PySide6.QtCore import QObject, Signal

from finetune_studio.core.preferences import PreferenceStore
from finetune_studio.core.protocol import generation as gp
from finetune_studio.studio.services.generation_worker import AdapterSpec, GenerationWorker
from finetune_studio.studio.state.annotation import Item, SessionSpec, Side
from finetune_studio.studio.state.generation_weights import default_weights

SIDE_NAMES = {"a": "side-a", "b": "side-b"}
BATCH_PROMPTS = 16  # prompts per request: one batch in the worker; items appear chunk by chunk


def adapter_specs(spec: SessionSpec) -> dict[str, AdapterSpec]:
    out = {}
    for key, side in (("a", spec.side_a), ("b", spec.side_b)):
        if side.adapter:
            out[SIDE_NAMES[key]] = AdapterSpec(side.adapter, side.checkpoint)
    return out


class SessionGenerator(QObject):
    progress = Signal(int, int)  # generations done, total
    streaming = Signal(str, str)  # heading ("Prompt 2/5, model 1, answer 1"), text so far
    items_added = Signal()
    finished = Signal(str)  # '' when every prompt has its items, else why it stopped

    def __init__(self, worker: GenerationWorker, parent: QObject | None = None):
        super().__init__(parent)
        self.worker = worker
        self.spec: SessionSpec | None = None
        self.prefs: PreferenceStore | None = None
        self.weights: gp.Weights | None = None  # LoadModel.weights for the next start; None: the model's default
        self._todo: list[tuple[list[int], str]] = []  # (prompt indices, side key)
        self._total = 0
        self._done_count = 0
        self._current: tuple[list[int], str, str] | None = None  # prompt indices, side, request id
        self._texts: dict[tuple[int, int], str] = {}  # (batch position, candidate) -> text so far
        self._left: dict[int, int] = {}  # batch position -> answers still to come
        self._finished: set[tuple[int, int]] = set()  # (batch position, candidate) recorded
        self._ids: dict[int, dict[str, list[str]]] = {}
        self._prepare_ids: set[str] = set()
        worker.reply.connect(self._on_reply)
        worker.died.connect(self._on_died)

    @property
    def running(self) -> bool:
        return self._current is not None or bool(self._prepare_ids)

    def missing_prompts(self, spec: SessionSpec, prefs: PreferenceStore) -> list[int]:
        have = {i.prompt_id for i in spec.items}
        return [i for i, p in enumerate(spec.prompts) if prefs.add_prompt(p, source=spec.source) not in have]

    def start(self, spec: SessionSpec, prefs: PreferenceStore) -> int:
        """Generate what the session still lacks; returns how many prompts that is (0: nothing to do)."""
        if self.running:
            return 0
        self.spec, self.prefs = spec, prefs
        missing = self.missing_prompts(spec, prefs)
        chunks = [missing[i : i + BATCH_PROMPTS] for i in range(0, len(missing), BATCH_PROMPTS)]
        self._todo = [(chunk, side) for chunk in chunks for side in ("a", "b")]
        self._total, self._done_count = 2 * len(missing), 0
        self._ids = {}
        if not self._todo:
            return 0
        weights = self.weights or default_weights(spec.side_a.model)
        self._prepare_ids = set(self.worker.prepare(spec.side_a.model, adapter_specs(spec), weights))
        self.progress.emit(0, self._total)
        if not self._prepare_ids:
            self._next()
        return len(missing)

    def stop(self) -> None:
        if self._current is not None:
            self.worker.cancel(self._current[2])
        self._todo = []

    # --- the queue ------------------------------------------------------------------
    def _side(self, key: str) -> Side:
        assert self.spec is not None
        return self.spec.side_a if key == "a" else self.spec.side_b

    def _next(self) -> None:
        if not self._todo:
            self._current = None
            self.finished.emit("")
            return
        indices, key = self._todo.pop(0)
        side = self._side(key)
        assert self.spec is not None
        s, n = self.spec.sampling, self.spec.pairs_per_prompt
        request = gp.GenerateBatch(
            id=self.worker.new_id("gen"),
            prompts=tuple(gp.BatchPrompt(prompt=self.spec.prompts[i], n=n, seed=side.seed) for i in indices),
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            max_new_tokens=s.max_new_tokens,
            adapter=SIDE_NAMES[key] if side.adapter else gp.BASE,
        )
        self._current = (indices, key, request.id)
        self._texts, self._left, self._finished = {}, dict.fromkeys(range(len(indices)), n), set()
        self.worker.send(request)

    def _heading(self, position: int, candidate: int) -> str:
        assert self._current is not None and self.spec is not None
        index, key = self._current[0][position], self._current[1]
        return f"Prompt {index + 1}/{len(self.spec.prompts)}, model {1 if key == 'a' else 2}, answer {candidate + 1}"

    def _followed(self) -> tuple[int, int] | None:
        """The answer the streaming view follows: the first of the batch not done yet."""
        assert self.spec is not None
        n = self.spec.pairs_per_prompt
        return next(((p, c) for p in sorted(self._left) for c in range(n) if (p, c) not in self._finished), None)

    def _on_reply(self, reply) -> None:
        if reply.id in self._prepare_ids:
            self._prepare_ids.discard(reply.id)
            if isinstance(reply, gp.Error):
                self._fail(f"{reply.message}")
            elif not self._prepare_ids and self._current is None and self._todo:
                self._next()
            return
        if self._current is None or reply.id != self._current[2]:
            return
        if isinstance(reply, gp.Delta):
            key = (reply.prompt, reply.candidate)
            self._texts[key] = self._texts.get(key, "") + reply.text
            if key == self._followed():
                self.streaming.emit(self._heading(*key), self._texts[key])
        elif isinstance(reply, gp.Done):
            if reply.finish_reason == "cancelled":
                return  # cut short by Stop: not an answer; the prompt is generated again next time
            self._finished.add((reply.prompt, reply.candidate))
            self._record(reply)
            self._left[reply.prompt] -= 1
            if not self._left[reply.prompt]:  # this prompt's side is done
                self._done_count += 1
                self.progress.emit(self._done_count, self._total)
        elif isinstance(reply, gp.Generated):
            if reply.cancelled:
                self._current = None
                self.finished.emit("Generation stopped; press Generate to continue with the prompts left.")
                return
            self._side_complete()
            self._next()
        elif isinstance(reply, gp.Error):
            self._fail(reply.message)

    def _record(self, done: gp.Done) -> None:
        assert self._current is not None and self.spec is not None and self.prefs is not None
        index, key = self._current[0][done.prompt], self._current[1]
        side, s = self._side(key), self.spec.sampling
        prompt_id = self.prefs.add_prompt(self.spec.prompts[index], source=self.spec.source)
        cid = self.prefs.add_candidate(
            prompt_id,
            done.text,
            model=side.model,
            adapter=side.adapter,
            run_id=side.adapter if side.adapter and "/" not in side.adapter else "",
            checkpoint="" if side.checkpoint is None else str(side.checkpoint),
            seed=done.seed,
            sampling={
                "temperature": s.temperature,
                "top_p": s.top_p,
                "top_k": s.top_k,
                "max_new_tokens": s.max_new_tokens,
                "candidate": done.candidate,
            },
            token_count=done.tokens,
            source=self.spec.source,
        )
        self.streaming.emit(self._heading(done.prompt, done.candidate), done.text)
        slots = self._ids.setdefault(index, {"a": [], "b": []})[key]
        slots.extend([""] * (done.candidate + 1 - len(slots)))
        slots[done.candidate] = cid

    def _side_complete(self) -> None:
        """After side B's batch: the items of its prompts, in the prompts' order."""
        assert self._current is not None and self.spec is not None and self.prefs is not None
        indices, key = self._current[0], self._current[1]
        if key != "b":
            return
        for index in indices:
            ids = self._ids.pop(index, {"a": [], "b": []})
            prompt_id = self.prefs.add_prompt(self.spec.prompts[index], source=self.spec.source)
            for a, b in zip(ids["a"], ids["b"], strict=False):
                if a and b and a != b:  # identical answers cannot be compared
                    self.spec.items.append(Item(prompt_id, a, b))
        self.spec.save()
        self.items_added.emit()

    def _fail(self, message: str) -> None:
        self._current = None
        self._prepare_ids.clear()
        self._todo = []
        self.finished.emit(message or "The generation failed.")

    def _on_died(self, message: str) -> None:
        if self.running or self._todo:
            self._fail(message)
