"""Export a run: the PEFT adapter with its model card, and optionally the merged model, GGUF files and an
Ollama Modelfile; then a check in a fresh process that each written form answers like the trained model.

A completed run exports its final adapter; a stopped, interrupted or failed run its newest checkpoint
(``core.run_status.is_exportable``, the rule the studio's buttons follow too). Everything is written to a
temporary folder next to the target and renamed at the end, so a failed or cancelled export leaves nothing under
the final name. An existing folder is replaced only when it is a
previous export (see ``core/export_target.py``). A failed check keeps the files and marks the export failed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_studio.core import export_target
from finetune_studio.core.export_target import MARKER, ExportTargetError
from finetune_studio.core.run_status import export_refusal, is_exportable
from finetune_studio.core.store import RunRecord, Store
from finetune_studio.engine import bottleneck, checkpoint, reward_model
from finetune_studio.engine.export import build as export_build
from finetune_studio.engine.export import card as export_card
from finetune_studio.engine.export import check as export_check
from finetune_studio.engine.export import gguf as export_gguf
from finetune_studio.engine.export import methods as export_methods
from finetune_studio.engine.export import ollama as export_ollama
from finetune_studio.engine.export.errors import ExportCancelled, ExportError
from finetune_studio.engine.models import FULL_MODEL_MARKER, ModelError, is_full_model_folder, resolve_model

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
FULL_MODEL_EXTRA = ("generation_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
FORMATS = ("adapter", "merged", "gguf", "ollama")
MERGED_DTYPES = ("auto", "float16", "float32", "bfloat16")

ProgressFn = Callable[[str, int, int, str], None]  # (stage, done, total, message)


@dataclass(frozen=True)
class Source:
    """The adapter to export: a run's final adapter or one of its checkpoints."""

    folder: Path
    run: RunRecord | dict[str, Any]  # the run's row ({} for a run folder the database does not know)
    config: dict
    label: str  # "final" or "step-000050"
    step: int
    run_dir: Path

    @property
    def run_id(self) -> str:
        return self.run.get("id", "")


@dataclass
class ExportRequest:
    run: str
    out: str | Path | None = None  # None: <data dir>/exports/<run>-<checkpoint>
    formats: tuple[str, ...] = ("adapter",)
    quants: tuple[str, ...] = ("q8_0",)
    checkpoint: str | None = None  # None: final adapter (or newest checkpoint); "best"; a step number
    force: bool = False
    dtype: str = "auto"  # of the merged model: auto (float16 where the update survives it, else float32) or a dtype
    check: bool = True


@dataclass
class ExportOutcome:
    path: Path
    source: Source
    formats: list[str]
    files: list[str]
    report: dict = field(default_factory=dict)  # check.json's content

    @property
    def passed(self) -> bool:
        return bool(self.report.get("passed"))


# --- which adapter ---------------------------------------------------------------


def _run_and_dir(run_ref: str) -> tuple[RunRecord | dict[str, Any], Path]:
    store = Store()
    try:
        run = store.find_run(run_ref)
    finally:
        store.close()
    run_dir = Path(run["run_dir"]) if run else Path(run_ref)
    if not run and not (run_dir / "config.json").is_file():
        raise ExportError(f"no run named {run_ref!r}: give a run id from the runs list or a run folder")
    if run and not is_exportable(run.get("status")):
        raise ExportError(f"run {run['id']} has no adapter to export: {export_refusal(run.get('status'))}")
    return run or {}, run_dir


def _adapter_files(folder: Path) -> tuple[str, ...]:
    """A PEFT adapter's files, a bottleneck adapter's (``engine.bottleneck``), or a full fine-tune's whole model
    (its marker, config, weights and tokenizer: the model itself)."""
    if is_full_model_folder(folder):
        weights = sorted(p.name for p in folder.glob("model*.safetensors")) or ["model.safetensors"]
        present = [n for n in (*FULL_MODEL_EXTRA, *export_build.TOKENIZER_COPY) if (folder / n).is_file()]
        return (FULL_MODEL_MARKER, "config.json", *weights, *present)
    return (
        (bottleneck.CONFIG_FILE, bottleneck.WEIGHTS_FILE) if bottleneck.is_bottleneck_folder(folder) else ADAPTER_FILES
    )


def _has_adapter(folder: Path) -> bool:
    return all((folder / f).is_file() for f in _adapter_files(folder))


def _step_of(folder: Path) -> int:
    state = folder / "trainer_state.json"
    if state.is_file():
        return int(json.loads(state.read_text(encoding="utf-8")).get("step", 0))
    return 0


def find_source(run_ref: str, which: str | None = None) -> Source:
    """The adapter folder for ``which``: None (final, else newest checkpoint), ``best`` or a step number."""
    run, run_dir = _run_and_dir(run_ref)
    config = json.loads(run["config"]) if run.get("config") else _read_json(run_dir / "config.json")
    final = run_dir / "adapter"
    ckpts = {_step_of(p): p for p in checkpoint.list_checkpoints(run_dir)}
    final_step = int(run.get("step") or 0)
    candidates: dict[int, tuple[Path, str]] = {s: (p, p.name) for s, p in ckpts.items()}
    if _has_adapter(final):
        candidates[final_step] = (final, "final")

    def make(step: int) -> Source:
        folder, label = candidates[step]
        return Source(folder=folder, run=run, config=config, label=label, step=step, run_dir=run_dir)

    available = ", ".join(f"{s}" for s in sorted(candidates)) or "none"
    if which in (None, "", "final", "latest"):
        if which == "final" and not _has_adapter(final):
            raise ExportError(f"run {run_ref} has no final adapter (it did not complete); checkpoints: {available}")
        if _has_adapter(final):
            return make(final_step)
        if ckpts:
            return make(max(ckpts))
        status = run.get("status", "unknown") if run else "unknown"
        raise ExportError(f"run {run_ref} ({status}) has no adapter yet: it saved no checkpoint before it ended")
    if which == "best":
        evals = {}
        if run:
            store = Store()
            try:
                evals = {m["step"]: m.get("eval_loss") for m in store.metrics(run["id"], "eval")}
            finally:
                store.close()
        scored = [(evals[s], s) for s in candidates if evals.get(s) is not None]
        if not scored:
            raise ExportError(
                f"run {run_ref} has no evaluation at a saved step (saved: {available}), so no best checkpoint: "
                f"give a step with --checkpoint N, or train with eval_every equal to checkpoint_every"
            )
        return make(min(scored)[1])
    try:
        step = int(str(which).removeprefix("step-"))
    except ValueError:
        raise ExportError(f"--checkpoint takes a step number or 'best', not {which!r}") from None
    if step not in candidates:
        raise ExportError(f"run {run_ref} has no checkpoint at step {step}; saved steps: {available}")
    return make(step)


def find_adapter(run_ref: str) -> tuple[Path, RunRecord | dict[str, Any]]:
    """(adapter folder, run row or {}) for a run id, id prefix or run folder: final adapter or newest checkpoint."""
    source = find_source(run_ref)
    return source.folder, source.run


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# --- writing ---------------------------------------------------------------------


def _normalise_formats(formats) -> list[str]:
    wanted = set()
    for f in formats:
        for part in str(f).split(","):
            part = part.strip().lower()
            if not part:
                continue
            if part not in FORMATS:
                raise ExportError(f"unknown format {part!r}; choose from {', '.join(FORMATS)}")
            wanted.add(part)
    wanted.add("adapter")  # always: it is small and every other form is built from it
    if "ollama" in wanted:
        wanted.add("gguf")
    return [f for f in FORMATS if f in wanted]


def _disk_message(exc: OSError, where: Path) -> str:
    if exc.errno == errno.ENOSPC:
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            free = 0
        return (
            f"the disk holding {where} is full ({free / 2**20:.0f} MiB free): free some space or choose another place"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write to {where}: {exc.strerror}; choose a folder you can write to"
    return f"cannot write the export to {where}: {exc.strerror or exc}"


def export(request: ExportRequest, progress: ProgressFn | None = None, cancel: Callable[[], bool] | None = None):
    """Write and check an export; returns an :class:`ExportOutcome`. Raises :class:`ExportError`."""
    formats = _normalise_formats(request.formats)
    quants = tuple(q.strip().lower() for q in request.quants for q in q.split(",") if q.strip())
    if "gguf" in formats:
        export_gguf.check_quants(quants)
    source = find_source(request.run, request.checkpoint)
    if any(f in export_methods.FOLDED for f in formats):  # before any work: what this method's adapter cannot be
        method = export_methods.method_of(source.folder, source.config)
        base = _base_folder(source) if method == "bitfit" else None
        export_methods.refuse_unfoldable(method, formats, source.folder, base)
    run_name = source.run.get("name") or source.run_id or source.run_dir.name
    out = Path(request.out) if request.out else export_target.default_export_dir(run_name, source.label)
    try:
        out = export_target.check_target(out, force=request.force)
    except ExportTargetError as exc:
        raise ExportError(str(exc)) from None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(_disk_message(exc, out.parent)) from None
    tmp: Path | None = None
    if request.dtype not in MERGED_DTYPES:
        raise ExportError(f"--dtype takes {', '.join(MERGED_DTYPES)}, not {request.dtype!r}")
    stages = ["adapter"] + (["merge"] if len(formats) > 1 else []) + [f for f in formats if f != "adapter"]
    stages += ["card"] + (["check"] if request.check else [])
    done = 0

    def step(message: str) -> None:
        nonlocal done
        if cancel is not None and cancel():
            raise ExportCancelled("export cancelled; nothing was written")
        if progress:
            progress("export", done, len(stages), message)
        done += 1

    try:
        # a fresh name (never one a planted symlink could redirect), then the mode of a folder a person made
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        tmp.chmod(0o755)
        outcome = _write(source, request, formats, quants, tmp, step, cancel)
        if cancel is not None and cancel():
            raise ExportCancelled("export cancelled; nothing was written")
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        (tmp / MARKER).write_text(
            export_target.marker_text(files, run_id=source.run_id, checkpoint=source.label, formats=formats),
            encoding="utf-8",
        )
        _replace(tmp, out)
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(_disk_message(exc, out.parent)) from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        progress("export", len(stages), len(stages), f"Written to {out}")
    outcome.path = out
    outcome.files = files
    return outcome


def _replace(tmp: Path, out: Path) -> None:
    """Put ``tmp`` at ``out``; an existing ``out`` was checked to be an empty folder or a previous export."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.replace(tmp, out)
        return
    if export_target.read_marker(out) is None:  # checked before writing; re-checked before removing anything
        raise ExportError(f"{out} changed while exporting and is no longer a previous export; nothing was replaced")
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _write(
    source: Source, request: ExportRequest, formats: list[str], quants: tuple[str, ...], tmp: Path, step, cancel
):
    whole = is_full_model_folder(source.folder)  # a full fine-tune: the folder is the model
    step("Copying the fully tuned model" if whole else "Copying the adapter")
    for name in _adapter_files(source.folder):
        shutil.copy2(source.folder / name, tmp / name)
    for name in (reward_model.HEAD_WEIGHTS, reward_model.HEAD_INFO):  # a reward model's head, and what it reads
        if (source.folder / name).is_file():
            shutil.copy2(source.folder / name, tmp / name)
    (tmp / "training_config.json").write_text(json.dumps(source.config, indent=1, sort_keys=True), encoding="utf-8")
    base_folder = _base_folder(source)
    if request.check or len(formats) > 1:
        build = export_build.Builder(source, base_folder)
        build.copy_tokenizer_if_changed(tmp)
    else:
        build = None
    written: list[dict] = [{"kind": "adapter", "path": str(tmp), "qlora": source.config.get("method") == "qlora"}]
    if "gguf" in formats:
        export_gguf.preflight(base_folder)
    if "ollama" in formats:
        assert build is not None  # every form but the adapter makes len(formats) > 1
        export_ollama.learn_pieces(build.tokenizer)
    merged = None
    notes: list[str] = []
    merge: dict | None = None
    dtype = request.dtype
    if len(formats) > 1:
        step("Loading the fully tuned model" if whole else "Merging the adapter into the base model")
        assert build is not None  # every form but the adapter makes len(formats) > 1
        merged, note = build.merged_model()
        notes.append(note)
        assert build.rounding is not None
        if "merged" in formats:  # refused here, before anything else is written, when the dtype loses the update
            dtype = export_build.choose_dtype(request.dtype, build.rounding)
            merge = build.rounding.report(dtype, request.dtype)
        if "gguf" in formats and "f16" in quants and not build.rounding.holds("float16"):
            notes.append(
                f"GGUF f16 {build.rounding.describe('float16')}: choose f32 to keep the whole update in the GGUF"
            )
    modelfiles: list[str] = []
    if "gguf" in formats:  # from the float32 merge, before the merged copy is rounded to its dtype
        step(f"Writing GGUF ({', '.join(quants)})")
        assert build is not None  # every form but the adapter makes len(formats) > 1
        (tmp / "gguf").mkdir()
        stem = export_target.safe_name(source.run.get("name") or source.run_id or "model")
        for quant in quants:
            path = tmp / "gguf" / f"{stem}-{quant}.gguf"
            export_gguf.write_gguf(merged, build.tokenizer, path, quant, base_folder=base_folder)
            approximate = build.qlora or quant not in ("f32", "f16")
            written.append({"kind": "gguf", "path": str(path), "quant": quant, "approximate": approximate})
    if "ollama" in formats:
        step("Writing the Ollama Modelfiles")
        assert build is not None  # every form but the adapter makes len(formats) > 1
        for i, form in enumerate(w for w in written if w["kind"] == "gguf"):
            name = "Modelfile" if i == 0 else f"Modelfile.{form['quant']}"  # the first one has the plain name
            export_ollama.write_modelfile(build.tokenizer, Path(form["path"]), tmp / "gguf" / name)
            modelfiles.append(name)
    if "merged" in formats:
        step(f"Writing the merged model ({dtype})")
        assert build is not None  # every form but the adapter makes len(formats) > 1
        notes.append(build.save_merged(merged, tmp / "merged", dtype))
        written.insert(1, {"kind": "merged", "path": str(tmp / "merged"), "approximate": build.qlora})
    del merged
    step("Writing the model card")
    card_note = export_card.write_card(
        tmp, source, base_folder, formats, quants, dtype, merge=merge, modelfiles=modelfiles
    )
    notes.append(card_note)
    if (tmp / reward_model.HEAD_INFO).is_file():
        reward_model.add_to_card(tmp)  # what a score is and how to score
    report: dict = {"passed": None, "checked": False, "merge": merge, "notes": [n for n in notes if n]}
    if request.check:
        step("Checking the export in a fresh process")
        report = export_check.check(build, written, tmp, notes=report["notes"], cancel=cancel, merge=merge)
    (tmp / "check.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    return ExportOutcome(path=tmp, source=source, formats=formats, files=[], report=report)


def _base_folder(source: Source) -> Path:
    if is_full_model_folder(source.folder):  # a full fine-tune: the saved folder is the model
        return source.folder
    config_file = bottleneck.CONFIG_FILE if bottleneck.is_bottleneck_folder(source.folder) else "adapter_config.json"
    config = _read_json(source.folder / config_file)
    base = config.get("base_model_name_or_path") or ""
    if base and Path(base).is_dir():
        return Path(base)
    try:
        return resolve_model(source.config.get("model") or base)
    except ModelError as exc:
        raise ExportError(f"the adapter's base model is not on this machine: {exc}") from None


def export_adapter(run_ref: str, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """The adapter alone, unchecked (the engine's tests and scripts); see :func:`export` for the full export."""
    return export(ExportRequest(run=run_ref, out=out_dir, force=overwrite, check=False)).path
