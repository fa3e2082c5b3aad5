"""Where the rows come from: a file, a folder (``datasets.save_to_disk`` or plain data files), or a hub dataset
already in the local Hugging Face cache. Nothing is ever downloaded.

:func:`resolve_source` turns what the user typed into the list of data files to read, in order.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from finetune_studio.core.model_spec import REPO_ID, cached_snapshot, datasets_cache_dir, hub_cache_dir
from finetune_studio.engine.datasets.problems import ProblemLog
from finetune_studio.engine.datasets.readers import BINARY_SUFFIXES, TEXT_SUFFIXES
from finetune_studio.engine.datasets.schema import DatasetError

DATA_SUFFIXES = set(TEXT_SUFFIXES) | set(BINARY_SUFFIXES)
# Files that sit next to data but are not data.
NOT_DATA = {
    "dataset_info.json",
    "state.json",
    "dataset_dict.json",
    "config.json",
    "dataset_infos.json",
    "metadata.json",
    "package.json",
}
HUB_ID = re.compile(r"^(?:hf://(?:datasets/)?)?" + REPO_ID.pattern.removeprefix("^"))  # owner/name, or hf://...


def resolve_source(spec: str | Path, log: ProblemLog, split: str | None = None) -> list[Path]:
    """The data files behind ``spec``: a file, a folder, or a hub id (``owner/name``) found in the local cache."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return _folder_files(path, log, split)
    match = HUB_ID.match(str(spec))
    if match and not path.exists():
        return _hub_files(match.group(1), match.group(2), log, split)
    raise DatasetError(f"dataset not found: {spec}")


def _folder_files(folder: Path, log: ProblemLog, split: str | None) -> list[Path]:
    """A ``save_to_disk`` folder (one split or a DatasetDict) or a folder of data files."""
    if (folder / "dataset_dict.json").is_file():
        splits = _json_file(folder / "dataset_dict.json").get("splits") or []
        chosen = _pick_split(splits, split, folder)
        others = [s for s in splits if s != chosen]
        if others:
            log.add(f"read split '{chosen}' (the folder also has: {', '.join(others)})", level="note")
        return _folder_files(folder / chosen, log, None)
    if (folder / "state.json").is_file():
        state = _json_file(folder / "state.json")
        files = [folder / f["filename"] for f in state.get("_data_files", []) if "filename" in f]
        missing = [f.name for f in files if not f.is_file()]
        if not files or missing:
            raise DatasetError(
                f"{folder} looks like a `datasets` folder but its data files are missing"
                + (f": {', '.join(missing)}" if missing else "")
            )
        return files
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in DATA_SUFFIXES
        and p.name not in NOT_DATA
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise DatasetError(f"{folder} holds no data files (expected .jsonl, .json, .csv, .tsv, .parquet or .arrow)")
    wanted = split or "train"
    in_split = [p for p in files if _names_split(p.relative_to(folder), wanted)]
    if in_split:
        files = in_split
    elif split:
        raise DatasetError(f"{folder} has no files for split '{split}'")
    kinds = {p.suffix.lower() for p in files}
    if len(kinds) > 1:
        raise DatasetError(
            f"{folder} mixes data files of several types ({', '.join(sorted(kinds))}): point to one file instead"
        )
    if len(files) > 1:
        log.add(
            f"read {len(files)} files: {', '.join(str(p.relative_to(folder)) for p in files[:5])}"
            + (" ..." if len(files) > 5 else ""),
            level="note",
        )
    return files


def _names_split(rel: Path, split: str) -> bool:
    """Whether a path inside a dataset folder belongs to ``split`` (``train.jsonl``, ``data/train-0000.parquet``)."""
    words = re.split(r"[^A-Za-z0-9]+", str(rel.with_suffix("")).lower())
    return split.lower() in words


def _pick_split(splits: list[str], wanted: str | None, where) -> str:
    if wanted:
        if wanted not in splits:
            raise DatasetError(f"{where} has no split '{wanted}' (it has: {', '.join(splits) or 'none'})")
        return wanted
    if not splits:
        raise DatasetError(f"{where} lists no splits")
    return "train" if "train" in splits else splits[0]


def _json_file(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    if not isinstance(value, dict):
        raise DatasetError(f"{path} is not a JSON object")
    return value


def _hub_files(owner: str, name: str, log: ProblemLog, split: str | None) -> list[Path]:
    snap = cached_snapshot(f"{owner}/{name}", repo_type="dataset")
    if snap is not None:
        log.add(f"read {owner}/{name} from the local Hugging Face cache ({snap})", level="note")
        return _folder_files(snap, log, split)
    processed = datasets_cache_dir() / f"{owner}___{name}"
    if processed.is_dir():
        wanted = split or "train"
        arrows = [p for p in processed.rglob("*.arrow") if _names_split(Path(p.name), wanted)]
        if arrows:
            newest = max(arrows, key=lambda p: p.stat().st_mtime).parent
            files = sorted(p for p in arrows if p.parent == newest)
            log.add(f"read {owner}/{name} split '{wanted}' from the `datasets` cache ({newest})", level="note")
            return files
    raise DatasetError(
        f"'{owner}/{name}' is not a file or folder here, and the hub dataset {owner}/{name} is not in "
        f"the local Hugging Face cache ({hub_cache_dir()}). The studio works offline: download it "
        "once with `huggingface-cli download --repo-type dataset "
        f"{owner}/{name}`, or point to a local file"
    )
