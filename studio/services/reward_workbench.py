"""The reward workbench's work, never on the UI thread: sample answers in the generation worker, then score them.

1. The model (and the run's starting adapter, attached as ``workbench``) answers the prompts in the shared
   :class:`~studio.services.generation_worker.GenerationWorker`: one ``generate_batch`` with ``n`` answers each,
   sampled at the run's temperature.
2. The answers are scored with :class:`core.rewards.RewardSet` in a background thread (a ``python`` reward runs in
   its own sandboxed process there, never in the app's), and the ``reward_model`` rewards by the worker's ``score``
   request, one per prompt. A length in tokens counts the model's own tokens (the worker's ``done.tokens``).
3. :attr:`WorkbenchJob.finished` carries a :class:`~studio.state.reward_workbench.WorkbenchResult`;
   :attr:`WorkbenchJob.failed` a message for a person (a reward's error, the worker's), never a traceback.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QObject, Signal

from finetune_studio.core.config import ConfigError
from finetune_studio.core.protocol import generation as gp
from finetune_studio.core.rewards import RewardError, RewardSet, RewardSpec, parse_rewards
from finetune_studio.studio.services.generation_worker import AdapterSpec, GenerationWorker
from finetune_studio.studio.state.reward_workbench import (
    PromptRow,
    WorkbenchRequest,
    WorkbenchResult,
    columns_per_answer,
    in_words,
    starting_adapter,
)

ADAPTER_NAME = "workbench"
_WORDS = re.compile(r"\w+|[^\w\s]")


class _Relay(QObject):
    """Carries the scoring thread's answer to the UI thread. No parent: the thread may answer after the job is
    gone (its connection then goes with it)."""

    done = Signal(object, object)  # the job's token, the scores (dict) or a message (str)


def score_answers(
    specs: list[RewardSpec], prompts: list[PromptRow], answers: list[list[str]], tokens: dict[str, int]
) -> dict[str, list[float]]:
    """Every non-``reward_model`` reward's scores for ``answers`` (prompt-major), as ``RewardSet.score`` gives them.
    Raises :class:`RewardError`. Slow rewards (``python``) make this slow: call it off the UI thread."""
    flat_prompts = [p.text for p, group in zip(prompts, answers, strict=True) for _ in group]
    flat_answers = [a for group in answers for a in group]
    if not specs or not flat_answers:
        return {}

    def count(text: str) -> int:
        return tokens[text] if text in tokens else len(_WORDS.findall(text))

    with RewardSet(specs, count_tokens=count) as rewards:
        scored = rewards.score(flat_prompts, flat_answers, columns_per_answer(prompts, answers))
    return scored.by_function


class WorkbenchJob(QObject):
    status = Signal(str)  # what it is doing, for a person
    finished = Signal(object)  # WorkbenchResult
    failed = Signal(str)  # why, for a person

    def __init__(
        self,
        worker: GenerationWorker,
        parent: QObject | None = None,
        *,
        find_run_dir: Callable[[str], str | None] | None = None,
    ):
        super().__init__(parent)
        self.worker = worker
        # run id -> its folder (for RUN:best); None asks the data home's store
        self.find_run_dir: Callable[[str], str | None] = find_run_dir or _run_dir_from_store
        self.request: WorkbenchRequest | None = None
        self.specs: list[RewardSpec] = []
        self._token = 0
        self._stage = ""  # "prepare", "generate", "score" or "" (idle)
        self._waiting: set[str] = set()  # request ids whose final reply is awaited
        self._generate_id = ""
        self._texts: dict[tuple[int, int], str] = {}
        self._tokens: dict[str, int] = {}
        self._answers: list[list[str]] = []
        self._scores: dict[str, list[float]] = {}
        self._learned: dict[str, dict[int, list[float]]] = {}  # reward name -> prompt -> scores
        self._score_ids: dict[str, tuple[str, int]] = {}  # score request id -> (reward name, prompt)
        self._unscored: dict[str, str] = {}  # reward name -> why it has no scores here
        self._verified = False
        self._relay: _Relay | None = None
        worker.reply.connect(self._on_reply)
        worker.died.connect(self._on_died)

    @property
    def running(self) -> bool:
        return bool(self._stage)

    # --- starting and stopping ---------------------------------------------------------
    def start(self, request: WorkbenchRequest) -> None:
        if self.running:
            return
        try:
            self.specs = parse_rewards(request.rewards)
        except ConfigError as exc:
            self.failed.emit(_sentence(str(exc).removeprefix("rewards: ")))
            return
        if not self.specs:
            self.failed.emit("Add a reward function first: there is nothing to score the answers with.")
            return
        if not request.prompts:
            self.failed.emit("There are no prompts to answer.")
            return
        source, checkpoint, best = starting_adapter(request.init_adapter)
        if best:
            folder = self.find_run_dir(source)
            if not folder:
                self.failed.emit(f"No run {source!r} was found for the starting adapter {request.init_adapter!r}.")
                return
            source = str(Path(folder) / "best")
        adapters = {ADAPTER_NAME: AdapterSpec(source, checkpoint)} if source else {}
        self._token += 1
        self.request = request
        self._texts, self._tokens, self._answers, self._scores = {}, {}, [], {}
        self._learned, self._score_ids, self._verified, self._unscored = {}, {}, False, {}
        self._stage = "prepare"
        self.status.emit("Loading the model…")
        self._waiting = set(self.worker.prepare(request.model, adapters))
        if not self._waiting:
            self._generate()

    def cancel(self) -> None:
        """Stop sampling (what was answered is dropped) or stop waiting for the scores."""
        if not self.running:
            return
        if self._stage == "generate" and self._generate_id:
            self.worker.cancel(self._generate_id)
        self._end()
        self.failed.emit("Stopped.")

    def _end(self) -> None:
        self._stage, self._waiting, self._generate_id = "", set(), ""
        self._token += 1  # a scoring thread still running answers into the void

    # --- sampling -------------------------------------------------------------------
    def _generate(self) -> None:
        request = self.request
        assert request is not None
        self._stage = "generate"
        batch = gp.GenerateBatch(
            id=self.worker.new_id("workbench"),
            prompts=tuple(
                gp.BatchPrompt(
                    prompt="" if p.messages else p.text,
                    messages=tuple(gp.ChatTurn(role, content) for role, content in p.messages),
                    n=request.answers_per_prompt,
                    seed=request.seed + i,
                )
                for i, p in enumerate(request.prompts)
            ),
            temperature=request.temperature,
            max_new_tokens=request.max_new_tokens,
            adapter=ADAPTER_NAME if self.worker.adapters.get(ADAPTER_NAME) else gp.BASE,
            stream_every=0,
        )
        self._generate_id = self.worker.send(batch)
        self._waiting = {self._generate_id}
        self._progress()

    def _progress(self) -> None:
        request = self.request
        assert request is not None
        total = len(request.prompts) * request.answers_per_prompt
        self.status.emit(f"Sampling answers: {len(self._texts)} of {total}…")

    def _on_reply(self, reply: gp.Reply) -> None:
        if not self.running or reply.id not in self._waiting:
            return
        if isinstance(reply, gp.Error) and self._stage == "score":
            self._learned_failed(reply)
            return
        if isinstance(reply, gp.Error):
            what = "The model could not be loaded" if self._stage == "prepare" else "Sampling failed"
            self._end()
            self.failed.emit(f"{what}: {reply.message}")
            return
        if self._stage == "prepare":
            if gp.is_final(reply):
                self._waiting.discard(reply.id)
                if not self._waiting:
                    self._generate()
        elif self._stage == "generate":
            self._on_generation(reply)
        elif self._stage == "score" and isinstance(reply, gp.Scores):
            self._waiting.discard(reply.id)
            name, prompt = self._score_ids.pop(reply.id)
            self._learned.setdefault(name, {})[prompt] = list(reply.scores)
            self._maybe_finish()

    def _on_generation(self, reply: gp.Reply) -> None:
        if isinstance(reply, gp.Done):
            if reply.finish_reason != "cancelled":
                self._texts[(reply.prompt, reply.candidate)] = reply.text
                self._tokens[reply.text] = reply.tokens
                self._progress()
        elif isinstance(reply, gp.Generated):
            if reply.cancelled:
                self._end()
                self.failed.emit("Stopped.")
                return
            request = self.request
            assert request is not None
            self._answers = [
                [self._texts.get((p, c), "") for c in range(request.answers_per_prompt)]
                for p in range(len(request.prompts))
            ]
            self._score()

    def _on_died(self, message: str) -> None:
        if self.running:
            self._end()
            self.failed.emit(message)

    # --- scoring --------------------------------------------------------------------
    def _score(self) -> None:
        request = self.request
        assert request is not None
        self._stage, self._waiting = "score", set()
        self.status.emit("Scoring the answers…")
        for spec in self.specs:
            if spec.kind != "reward_model":
                continue
            for p, (prompt, group) in enumerate(zip(request.prompts, self._answers, strict=True)):
                rid = self.worker.send(
                    gp.Score(
                        id=self.worker.new_id("wbscore"),
                        prompt="" if prompt.messages else prompt.text,
                        messages=tuple(gp.ChatTurn(role, content) for role, content in prompt.messages),
                        candidates=tuple(group),
                        scorer="reward_model",
                        reward_model=str(spec.params["adapter"]),
                    )
                )
                self._waiting.add(rid)
                self._score_ids[rid] = (spec.name, p)
        verifiers = [s for s in self.specs if s.kind != "reward_model"]
        relay = _Relay()
        self._relay = relay
        relay.done.connect(self._scored)
        token = self._token
        prompts, answers, tokens = list(request.prompts), [list(a) for a in self._answers], dict(self._tokens)

        def work() -> None:
            try:
                out: object = score_answers(verifiers, prompts, answers, tokens)
            except RewardError as exc:
                out = in_words(str(exc))
            except Exception as exc:  # a reward's own failure, told in words; the app goes on
                out = f"The rewards could not be scored: {type(exc).__name__}: {exc}"
            relay.done.emit(token, out)

        threading.Thread(target=work, name="reward-workbench", daemon=True).start()

    def _learned_failed(self, reply: gp.Error) -> None:
        """A reward model's score request failed: the other rewards' scores still show, this one is left out with
        the reason (a worker without ``score``: it is scored during training only)."""
        self._waiting.discard(reply.id)
        name, _ = self._score_ids.pop(reply.id)
        if reply.kind == "bad_request" and "unknown request" in reply.message:
            why = "scored during training: this generation worker cannot score with a reward model"
        else:
            why = f"not scored here: {reply.message}"
        self._unscored.setdefault(name, why)
        for rid in [r for r, (n, _) in self._score_ids.items() if n == name]:  # its other prompts: no use waiting
            self._waiting.discard(rid)
            del self._score_ids[rid]
        self._maybe_finish()

    def _scored(self, token: int, out: object) -> None:
        if token != self._token or not self.running:
            return
        if isinstance(out, str):
            self._end()
            self.failed.emit(out)
            return
        assert isinstance(out, dict)
        self._scores, self._verified = out, True
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if not self._verified or self._waiting:
            return
        request = self.request
        assert request is not None
        scores = dict(self._scores)
        for name, by_prompt in self._learned.items():
            if name not in self._unscored:
                scores[name] = [s for p in range(len(request.prompts)) for s in by_prompt[p]]
        result = WorkbenchResult(
            prompts=list(request.prompts),
            answers=self._answers,
            names=[s.name for s in self.specs],
            weights=[s.weight for s in self.specs],
            scores={n: scores[n] for n in (s.name for s in self.specs) if n in scores},
            unscored=dict(self._unscored),
        )
        self._end()
        self.finished.emit(result)


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] if text else text


def _run_dir_from_store(run: str) -> str | None:
    from finetune_studio.core.store import Store

    try:
        record = Store().find_run(run)
    except Exception:
        return None
    return str(record.run_dir) if record is not None else None
