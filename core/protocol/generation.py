"""The generation worker's protocol: typed, frozen requests and replies as JSON lines.

``python -m finetune_studio.engine serve`` is a long-lived child process. The caller writes one request per line
on its stdin; the worker writes replies and events, one per line, on its stdout (logs go to stderr). Every object
has ``"v"`` (:data:`PROTOCOL_VERSION`), ``"type"`` and ``"id"``: a request's id is chosen by the caller, and every
reply to it carries the same id.

The rules a caller can rely on:

* At start the worker writes :class:`Ready` (id ``""``).
* Requests run one at a time, in the order they arrive; only :class:`Cancel` is acted on at once.
* Every request gets exactly one *final* reply (:data:`FINAL_TYPES`): its own (``loaded``, ``adapter``,
  ``active``, ``generated``, ``scores``, ``cancelled``, ``unloaded``, ``bye``) or an :class:`Error` naming the
  problem.
  After an error the worker is still up and takes the next request.
* A :class:`Generate` streams :class:`Delta` events (new text every few tokens, per candidate), then one
  :class:`Done` per candidate (``finish_reason`` ``stop`` | ``length`` | ``cancelled``), then its final
  :class:`Generated`. The deltas of a candidate concatenate to its ``Done.text``.
* A :class:`GenerateBatch` (several prompts, each with its ``n`` and seed, decoded as one batch) streams the same
  events, each naming its ``prompt`` (the index in the request's ``prompts``) and ``candidate``; one ``Done`` per
  (prompt, candidate), in the order they end, then one :class:`Generated` for the whole request.
* A :class:`Score` (a prompt and candidate answers) is answered with one :class:`Scores`: one float per candidate,
  in order, from a reward model or from an adapter's implicit DPO reward.
* A line that is not a valid request is answered with an :class:`Error` (id ``""`` when none could be read).

Unknown fields are ignored on reading, so an older reader can read a newer writer's optional extras.
Version 1 grows by addition only: ``generate_batch`` and the ``prompt`` field of ``delta`` / ``done`` (0 for a
plain ``generate``) were added without a version change; a worker that predates them answers ``generate_batch``
with an :class:`Error` (``bad_request``, "unknown request type"), so a caller can fall back to one ``generate`` per
prompt. ``score`` and its ``scores`` reply were added the same way: an older worker answers ``score`` with that
error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

from finetune_studio.core.protocol.message import ProtocolError as ProtocolError  # this protocol's errors too
from finetune_studio.core.protocol.message import load_message

PROTOCOL_VERSION = 1

FinishReason = Literal["stop", "length", "cancelled"]
# ``stop``: the model ended its answer (end-of-turn token) or wrote a stop string (not included in the text).
FINISH_REASONS = ("stop", "length", "cancelled")
Scorer = Literal["reward_model", "implicit_dpo"]  # Score.scorer
SCORERS: tuple[Scorer, ...] = ("reward_model", "implicit_dpo")
Weights = Literal["full", "int8", "int4"]  # LoadModel.weights
WEIGHTS: tuple[Weights, ...] = ("full", "int8", "int4")
ErrorKind = Literal["bad_request", "model", "adapter", "context", "no_model", "oom", "error"]
ERROR_KINDS = ("bad_request", "model", "adapter", "context", "no_model", "oom", "error")
BASE = ""  # the adapter name meaning "the base model, adapters switched off"
MAX_LINE_BYTES = 4 * 2**20  # the longest request line the worker reads; a longer one is answered with an Error
MAX_SEED = 2**32 - 1
MAX_NEW_TOKENS = 2**20


def _body(obj: Message) -> dict[str, Any]:
    out = {"v": PROTOCOL_VERSION, "type": obj.type}
    out.update(dataclasses.asdict(obj))
    return out


@dataclass(frozen=True)
class Message:
    """Base of requests and replies: ``id`` ties replies to their request."""

    type: ClassVar[str] = ""
    id: str

    def to_json(self) -> str:
        return json.dumps(_body(self), separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ProtocolError(message)


# --- requests --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request(Message):
    pass


@dataclass(frozen=True)
class LoadModel(Request):
    """Load a base model, replacing the one loaded (and its adapters).

    ``model`` is any model spec the engine takes: ``default``, a model folder, a ``.gguf`` file, or a hub id in
    the local cache. ``dtype`` ``auto``: bfloat16/float16 on a GPU, float32 on the CPU.
    """

    type: ClassVar[str] = "load"
    model: str = "default"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    quantize_4bit: bool = False  # NF4 base (the one a QLoRA adapter was trained on); CUDA only
    # "int8": weight-only int8 copies of the linear layers for faster CPU decoding (outputs close to, not
    # equal to, full precision). "int4": group-wise int4 (int8 for the output head and where int4 does not fit):
    # faster still, further from full precision. "full": the weights as loaded. Both are CPU speed-ups: with
    # device "auto" on a GPU the model loads with "full" weights (``Loaded.weights`` says which were used);
    # with device "cuda" or a 4-bit base they are an error. WEIGHTS_CHOICES describes them for a person.
    weights: Weights = "full"
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _check(isinstance(self.model, str) and self.model.strip() != "", "load: 'model' must name a model")
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16"), f"load: unknown dtype {self.dtype!r}")
        _check(self.device in ("auto", "cpu", "cuda"), f"load: unknown device {self.device!r}")
        _check(
            self.weights in WEIGHTS,
            f"load: 'weights' must be 'full', 'int8' or 'int4', not {self.weights!r}",
        )


@dataclass(frozen=True)
class AttachAdapter(Request):
    """Attach an adapter under ``name`` (replacing one of that name) and make it the active one.

    ``source``: a run id (or unique prefix) or run folder, whose final adapter is used (the newest checkpoint of a
    run that has none yet); or an adapter folder (an export, or a checkpoint folder ``.../checkpoints/step-N``).
    ``checkpoint``: with a run as source, the step of one of its checkpoints instead of the final adapter.
    """

    type: ClassVar[str] = "attach"
    name: str = ""
    source: str = ""
    checkpoint: int | None = None

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and self.name.strip() != "", "attach: 'name' must be a non-empty name")
        _check(isinstance(self.source, str) and self.source.strip() != "", "attach: 'source' must name an adapter")
        _check(
            self.checkpoint is None or (isinstance(self.checkpoint, int) and self.checkpoint >= 0),
            "attach: 'checkpoint' must be a step number",
        )


@dataclass(frozen=True)
class SetActive(Request):
    """Make ``adapter`` the one :class:`Generate` uses by default; ``""`` (:data:`BASE`) switches adapters off."""

    type: ClassVar[str] = "set_active"
    adapter: str = BASE


@dataclass(frozen=True)
class DetachAdapter(Request):
    """Drop an attached adapter (the base is active afterwards if it was the active one)."""

    type: ClassVar[str] = "detach"
    name: str = ""


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True)
class Generate(Request):
    """Sample ``n`` candidates for one prompt, as one batch.

    Give ``prompt`` (a user message) or ``messages`` (a conversation); either goes through the model's chat
    template with the generation prompt added. ``raw: true`` sends ``prompt`` as plain text instead (completion).
    ``temperature`` 0 is greedy decoding. ``top_k`` 0 and ``top_p`` 1 switch those filters off. ``adapter``:
    ``None`` uses the active adapter, ``""`` the base, a name that attached adapter (for this request only).
    Candidate i of a request with seed s is reproducible: the same request gives the same texts.
    """

    type: ClassVar[str] = "generate"
    prompt: str = ""
    messages: tuple[ChatTurn, ...] = ()
    raw: bool = False
    n: int = 1
    seed: int = 0
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    adapter: str | None = None
    stream_every: int = 4  # tokens per Delta (per candidate); 0: no deltas, only Done

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages", _turns(self.messages, "generate"))
        _check_prompt(self, "generate")
        _check(not (self.raw and self.messages), "generate: 'raw' applies to 'prompt' only")
        _check_sampling(self, "generate")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class BatchPrompt:
    """One prompt of a :class:`GenerateBatch`: a user message (``prompt``) or a conversation (``messages``), its
    ``n`` candidates and their ``seed`` (what one :class:`Generate` for it alone would carry)."""

    prompt: str = ""
    messages: tuple[ChatTurn, ...] = ()
    n: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages", _turns(self.messages, "generate_batch"))
        _check_prompt(self, "generate_batch")


@dataclass(frozen=True)
class GenerateBatch(Request):
    """Sample ``n`` candidates for each of several prompts, all decoded as one batch (one forward per token for
    every (prompt, candidate) row; prompts of different lengths are left-padded, each row at its own positions).

    The sampling settings, ``raw``, ``stop``, ``adapter`` and ``stream_every`` are :class:`Generate`'s, shared by
    every prompt. Each prompt draws from its own random stream, seeded with its ``seed`` as a :class:`Generate` of
    it alone would: greedy decoding gives each prompt's answers alone; sampled answers are those of the prompt
    alone except where the batch's arithmetic (other matmul shapes, the padding mask) moves a logit by a rounding
    error across a draw's boundary (rare; the same request always gives the same texts). Replies name the prompt:
    ``Delta.prompt`` and ``Done.prompt`` index ``prompts``.
    """

    type: ClassVar[str] = "generate_batch"
    prompts: tuple[BatchPrompt, ...] = ()
    raw: bool = False
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    adapter: str | None = None
    stream_every: int = 4

    MAX_ROWS: ClassVar[int] = 256  # candidates over all prompts

    def __post_init__(self) -> None:
        items = self.prompts
        _check(isinstance(items, (list, tuple)) and len(items) >= 1, "generate_batch: 'prompts' must list prompts")
        prompts = []
        for item in items:
            if isinstance(item, dict):
                names = {f.name for f in dataclasses.fields(BatchPrompt)}
                item = BatchPrompt(**{k: v for k, v in item.items() if k in names})
            _check(isinstance(item, BatchPrompt), "generate_batch: each prompt needs 'prompt' or 'messages'")
            prompts.append(item)
        object.__setattr__(self, "prompts", tuple(prompts))
        _check(len(prompts) <= 64, "generate_batch: at most 64 prompts per request")
        rows = sum(p.n for p in prompts)
        _check(rows <= self.MAX_ROWS, f"generate_batch: at most {self.MAX_ROWS} candidates in all, not {rows}")
        _check(not (self.raw and any(p.messages for p in prompts)), "generate_batch: 'raw' applies to 'prompt' only")
        _check_sampling(self, "generate_batch")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _turns(msgs: object, what: str) -> tuple[ChatTurn, ...]:
    _check(isinstance(msgs, (list, tuple)), f"{what}: 'messages' must be a list of {{role, content}}")
    assert isinstance(msgs, (list, tuple))
    turns = []
    for m in msgs:
        if isinstance(m, dict):
            _check(
                isinstance(m.get("role"), str) and isinstance(m.get("content"), str),
                f"{what}: each message needs a string 'role' and 'content'",
            )
            m = ChatTurn(role=m["role"], content=m["content"])
        _check(isinstance(m, ChatTurn), f"{what}: each message needs a string 'role' and 'content'")
        turns.append(m)
    return tuple(turns)


def _check_prompt(obj: Generate | BatchPrompt, what: str) -> None:
    _check(isinstance(obj.prompt, str), f"{what}: 'prompt' must be text")
    _check(bool(obj.prompt) != bool(obj.messages), f"{what}: give either 'prompt' or 'messages' (one of them)")
    _check(_is_int(obj.n) and 1 <= obj.n <= 64, f"{what}: 'n' must be between 1 and 64")
    _check(
        _is_int(obj.seed) and 0 <= obj.seed <= MAX_SEED,
        f"{what}: 'seed' must be a whole number from 0 to {MAX_SEED:,}",
    )


def _check_sampling(obj: Generate | GenerateBatch, what: str) -> None:
    stop = obj.stop
    _check(
        isinstance(stop, (list, tuple)) and all(isinstance(s, str) and s for s in stop),
        f"{what}: 'stop' must be a list of non-empty strings",
    )
    object.__setattr__(obj, "stop", tuple(stop))
    _check(_is_num(obj.temperature) and obj.temperature >= 0, f"{what}: 'temperature' must be a finite number >= 0")
    _check(_is_num(obj.top_p) and 0 < obj.top_p <= 1, f"{what}: 'top_p' must be in (0, 1]")
    _check(_is_int(obj.top_k) and 0 <= obj.top_k <= 2**31 - 1, f"{what}: 'top_k' must be >= 0 (0: off)")
    _check(
        _is_int(obj.max_new_tokens) and 1 <= obj.max_new_tokens <= MAX_NEW_TOKENS,
        f"{what}: 'max_new_tokens' must be a whole number from 1 to {MAX_NEW_TOKENS:,}",
    )
    _check(_is_int(obj.stream_every) and obj.stream_every >= 0, f"{what}: 'stream_every' must be >= 0")
    _check(obj.adapter is None or isinstance(obj.adapter, str), f"{what}: 'adapter' must be a name or null")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    """A finite real number (JSON's ``Infinity`` and ``NaN`` are not)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


@dataclass(frozen=True)
class Score(Request):
    """Score ``candidates`` (answers) to one prompt: one float per candidate, higher is better (:class:`Scores`).

    The prompt is ``prompt`` (a user message) or ``messages`` (a conversation); each candidate is the assistant's
    answer after it, rendered with the model's chat template as training renders a preference pair.

    ``scorer`` ``"reward_model"``: the reward model ``reward_model`` (a reward run's adapter folder, holding
    ``reward_head.safetensors``, or a run id) scores each answer: the scalar its head reads at the last token. The
    worker loads it once, beside the loaded model (which it needs not be), and keeps it for later requests.

    ``scorer`` ``"implicit_dpo"``: a DPO adapter's implicit reward, ``beta * sum over the answer's tokens of
    (log pi - log pi_ref)``, with pi the loaded model with ``adapter`` (``None``: the active adapter) and pi_ref
    the ``reference``: ``""`` (:data:`BASE`) the base with adapters off, or another attached adapter (a DPO run
    started from an adapter had that adapter as its reference). ``beta`` is the DPO run's ``dpo_beta``.
    """

    type: ClassVar[str] = "score"
    prompt: str = ""
    messages: tuple[ChatTurn, ...] = ()
    candidates: tuple[str, ...] = ()
    scorer: Scorer = "reward_model"
    reward_model: str = ""  # scorer "reward_model": the reward model's folder or run id
    adapter: str | None = None  # scorer "implicit_dpo": the policy's adapter (None: the active one)
    reference: str = BASE  # scorer "implicit_dpo": the reference ("": the base with adapters off)
    beta: float = 0.1  # scorer "implicit_dpo": the DPO run's dpo_beta

    MAX_CANDIDATES: ClassVar[int] = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages", _turns(self.messages, "score"))
        _check(isinstance(self.prompt, str), "score: 'prompt' must be text")
        _check(bool(self.prompt) != bool(self.messages), "score: give either 'prompt' or 'messages' (one of them)")
        cands = self.candidates
        _check(
            isinstance(cands, (list, tuple)) and all(isinstance(c, str) for c in cands),
            "score: 'candidates' must be a list of answers (text)",
        )
        _check(
            1 <= len(cands) <= self.MAX_CANDIDATES,
            f"score: give from 1 to {self.MAX_CANDIDATES} candidates, not {len(cands)}",
        )
        object.__setattr__(self, "candidates", tuple(cands))
        _check(self.scorer in SCORERS, f"score: 'scorer' must be one of {', '.join(SCORERS)}, not {self.scorer!r}")
        _check(isinstance(self.reward_model, str), "score: 'reward_model' must be a folder or run id")
        _check(
            self.scorer != "reward_model" or self.reward_model.strip() != "",
            "score: scorer 'reward_model' needs 'reward_model': a reward model's folder or run id",
        )
        _check(self.adapter is None or isinstance(self.adapter, str), "score: 'adapter' must be a name or null")
        _check(isinstance(self.reference, str), "score: 'reference' must be an adapter name ('' for the base)")
        _check(_is_num(self.beta) and self.beta > 0, "score: 'beta' must be a finite number above 0 (typical: 0.1)")


@dataclass(frozen=True)
class Cancel(Request):
    """Stop request ``target``: a running generation ends with its candidates so far (``cancelled``)."""

    type: ClassVar[str] = "cancel"
    target: str = ""


@dataclass(frozen=True)
class Unload(Request):
    """Free the model and its adapters."""

    type: ClassVar[str] = "unload"


@dataclass(frozen=True)
class Shutdown(Request):
    """Cancel what runs, answer ``bye`` and exit. Closing the worker's stdin does the same."""

    type: ClassVar[str] = "shutdown"


REQUEST_TYPES: dict[str, type[Request]] = {
    cls.type: cls
    for cls in (
        LoadModel,
        AttachAdapter,
        SetActive,
        DetachAdapter,
        Generate,
        GenerateBatch,
        Score,
        Cancel,
        Unload,
        Shutdown,
    )
}


# --- replies and events ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply(Message):
    pass


@dataclass(frozen=True)
class Ready(Reply):
    """The worker is up and reads requests (id ``""``)."""

    type: ClassVar[str] = "ready"
    pid: int = 0
    device: str = "cpu"  # where models go with device "auto"
    threads: int = 1  # torch's CPU threads


@dataclass(frozen=True)
class Loaded(Reply):
    type: ClassVar[str] = "loaded"
    model: str = ""  # the spec as given
    path: str = ""  # the resolved safetensors folder
    device: str = "cpu"
    dtype: str = ""
    weights: str = "full"
    context_length: int = 0
    parameters: int = 0
    chat_template: bool = False  # False: prompts are sent as plain text
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class AdapterAttached(Reply):
    type: ClassVar[str] = "adapter"
    name: str = ""
    path: str = ""  # the adapter folder that was loaded
    run_id: str = ""  # the run it came from, when known
    step: int | None = None  # the checkpoint's step; None for a run's final adapter or an export
    base_model: str = ""  # what the adapter's config names as its base


@dataclass(frozen=True)
class Active(Reply):
    """The adapter now active (``""``: the base), and those attached. Answers set_active and detach."""

    type: ClassVar[str] = "active"
    adapter: str = BASE
    attached: tuple[str, ...] = ()


@dataclass(frozen=True)
class Delta(Reply):
    """New text of one candidate since its previous delta."""

    type: ClassVar[str] = "delta"
    candidate: int = 0
    text: str = ""
    tokens: int = 0  # the candidate's new tokens so far
    prompt: int = 0  # a generate_batch's prompt (index in its prompts); 0 for a generate


@dataclass(frozen=True)
class Done(Reply):
    """One candidate is complete."""

    type: ClassVar[str] = "done"
    candidate: int = 0
    text: str = ""
    tokens: int = 0  # new tokens generated (a stop string's tokens included, the end-of-turn token too)
    finish_reason: FinishReason = "stop"
    elapsed_s: float = 0.0  # from the start of the request
    adapter: str = BASE  # the adapter that produced it ("" for the base)
    seed: int = 0  # the seed of its prompt
    prompt: int = 0  # a generate_batch's prompt (index in its prompts); 0 for a generate


@dataclass(frozen=True)
class Generated(Reply):
    """The final reply to a generate (or generate_batch) request, after every candidate's :class:`Done`."""

    type: ClassVar[str] = "generated"
    candidates: int = 0  # over all prompts
    prompt_tokens: int = 0  # over all prompts
    new_tokens: int = 0  # over all candidates
    elapsed_s: float = 0.0
    tokens_per_s: float = 0.0  # new tokens per second over the whole request
    cancelled: bool = False
    prompts: int = 1  # how many prompts the request carried


@dataclass(frozen=True)
class Scores(Reply):
    """The final reply to a score request: ``scores[i]`` is candidate i's (higher is better)."""

    type: ClassVar[str] = "scores"
    scores: tuple[float, ...] = ()
    scorer: str = ""
    source: str = ""  # the reward model's folder, or "adapter against reference" for implicit_dpo
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class Cancelled(Reply):
    """Answers a cancel request at once; ``found`` tells whether ``target`` was running or queued."""

    type: ClassVar[str] = "cancelled"
    target: str = ""
    found: bool = False


@dataclass(frozen=True)
class Unloaded(Reply):
    type: ClassVar[str] = "unloaded"


@dataclass(frozen=True)
class Bye(Reply):
    type: ClassVar[str] = "bye"


@dataclass(frozen=True)
class Error(Reply):
    """The request failed; ``message`` tells a person what is wrong. The worker stays up."""

    type: ClassVar[str] = "error"
    message: str = ""
    kind: ErrorKind = "error"
    detail: str = ""  # the exception text, for the log view


REPLY_TYPES: dict[str, type[Reply]] = {
    cls.type: cls
    for cls in (Ready, Loaded, AdapterAttached, Active, Delta, Done, Generated, Scores, Cancelled, Unloaded, Bye, Error)
}
FINAL_TYPES = frozenset(
    {"loaded", "adapter", "active", "generated", "scores", "cancelled", "unloaded", "bye", "error"}
)  # one of these ends each request


def is_final(reply: Reply) -> bool:
    return reply.type in FINAL_TYPES


# --- parsing ---------------------------------------------------------------------------------------------------


def _load(line: str | bytes) -> dict[str, Any]:
    try:
        data = load_message(line, PROTOCOL_VERSION)
    except ProtocolError:
        raise
    except (ValueError, RecursionError, MemoryError) as exc:
        # what json.loads raises beyond JSONDecodeError: an integer past Python's digit limit (ValueError),
        # nesting deeper than the interpreter's stack (RecursionError)
        raise ProtocolError(f"unreadable JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(data.get("id"), str):
        raise ProtocolError("every message needs a string 'id'")
    return data


_M = TypeVar("_M", bound=Message)


def _build(cls: type[_M], data: dict[str, Any]) -> _M:
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in names})
    except TypeError as exc:
        raise ProtocolError(f"bad {cls.type} message: {exc}") from None


def parse_request(line: str | bytes) -> Request:
    """Parse one JSON line into its request class (:class:`ProtocolError` names the problem)."""
    data = _load(line)
    cls = REQUEST_TYPES.get(data.get("type", ""))
    if cls is None:
        raise ProtocolError(f"unknown request type {data.get('type')!r}; known: {', '.join(sorted(REQUEST_TYPES))}")
    return _build(cls, data)


def parse_reply(line: str | bytes) -> Reply:
    """Parse one JSON line from the worker into its reply class."""
    data = _load(line)
    cls = REPLY_TYPES.get(data.get("type", ""))
    if cls is None:
        raise ProtocolError(f"unknown reply type {data.get('type')!r}")
    if cls is Active and isinstance(data.get("attached"), list):
        data = {**data, "attached": tuple(data["attached"])}
    if cls is Scores and isinstance(data.get("scores"), list):
        data = {**data, "scores": tuple(data["scores"])}
    return _build(cls, data)


_ID = re.compile(r'"id"\s*:\s*("(?:[^"\\]|\\.)*")')  # a JSON "id" key and its string value


def request_id_of(line: str | bytes) -> str:
    """The id of a line that did not parse, when it has one (so its error reply can carry it): read as JSON, or
    when that fails (a line cut at :data:`MAX_LINE_BYTES`, nesting too deep), the first ``"id": "..."`` in it.
    Never raises."""
    try:
        data = json.loads(line)
    except Exception:
        data = None
    else:
        return data["id"] if isinstance(data, dict) and isinstance(data.get("id"), str) else ""
    text = line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line
    match = _ID.search(text[:MAX_LINE_BYTES])
    if match is None:
        return ""
    try:
        found = json.loads(match.group(1))
    except Exception:
        return ""
    return found if isinstance(found, str) else ""
