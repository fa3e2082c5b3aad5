"""What a model spec is and where the Hugging Face caches are: one module, and every user agrees with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune_studio.core import paths
from finetune_studio.core.model_spec import (
    DEFAULT_CONVERTED,
    SpecKind,
    cached_snapshot,
    converted_folder,
    datasets_cache_dir,
    hub_cache_dir,
    hub_repo_dir,
    parse_spec,
)

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 300,
    "max_position_embeddings": 256,
}
CACHE_VARS = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "HF_DATASETS_CACHE")


@pytest.fixture
def no_cache_env(monkeypatch):
    for name in CACHE_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_what_a_spec_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "org" / "name").mkdir(parents=True)  # a relative folder that looks like a hub id
    (tmp_path / "m.GGUF").write_bytes(b"GGUF")
    cases = {
        "default": SpecKind.DEFAULT,
        "  default ": SpecKind.DEFAULT,
        "m.GGUF": SpecKind.GGUF,
        "missing.gguf": SpecKind.GGUF,  # a GGUF spec even before the file exists (the engine says it is missing)
        str(tmp_path / "folder"): SpecKind.FOLDER,
        "org/name": SpecKind.FOLDER,  # an existing path wins over a hub id
        "config.json": SpecKind.FILE,
        "HuggingFaceTB/SmolLM2-135M": SpecKind.HUB,
        "./org/other": SpecKind.MISSING,
        "~/no/such": SpecKind.MISSING,
        "/abs/path": SpecKind.MISSING,
        "a/b/c": SpecKind.MISSING,
        "has space/x": SpecKind.MISSING,
        "": SpecKind.MISSING,
    }
    assert {text: parse_spec(text).kind for text in cases} == cases
    hub = parse_spec("HuggingFaceTB/SmolLM2-135M")
    assert hub.repo_id == "HuggingFaceTB/SmolLM2-135M" and hub.path is None
    assert parse_spec("~/x.gguf").path == Path(os.path.expanduser("~")) / "x.gguf"


def test_converted_folders(tmp_path):
    assert converted_folder(parse_spec("default")) == paths.models_dir() / DEFAULT_CONVERTED
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF one")
    first = converted_folder(parse_spec(str(gguf)))
    assert first.parent == paths.models_dir() and first.name.startswith("model-")
    assert converted_folder(parse_spec(str(gguf))) == first
    gguf.write_bytes(b"GGUF two, longer")
    assert converted_folder(parse_spec(str(gguf))) != first  # an edited file is converted again
    assert converted_folder(parse_spec(str(tmp_path / "missing.gguf"))) is None


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"XDG_CACHE_HOME": "{tmp}/xdg"},
        {"XDG_CACHE_HOME": "{tmp}/xdg", "HF_HOME": "{tmp}/hf-home"},
        {"HF_HOME": "{tmp}/hf-home", "HUGGINGFACE_HUB_CACHE": "{tmp}/legacy"},
        {"HF_HOME": "{tmp}/hf-home", "HUGGINGFACE_HUB_CACHE": "{tmp}/legacy", "HF_HUB_CACHE": "{tmp}/hub"},
    ],
)
def test_hub_cache_is_where_huggingface_hub_looks(tmp_path, env):
    """Both read the environment at import, in a fresh interpreter each."""
    full = {k: v for k, v in os.environ.items() if k not in CACHE_VARS}
    full.update({k: v.format(tmp=tmp_path) for k, v in env.items()})
    code = (
        "import huggingface_hub.constants as c\n"
        "from finetune_studio.core.model_spec import hub_cache_dir\n"
        "print(c.HF_HUB_CACHE); print(hub_cache_dir())\n"
    )
    done = subprocess.run([sys.executable, "-P", "-c", code], env=full, capture_output=True, text=True, timeout=60)
    theirs, ours = done.stdout.split()
    assert ours == theirs, done.stderr


def test_datasets_cache(tmp_path, no_cache_env):
    no_cache_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datasets_cache_dir() == tmp_path / "xdg" / "huggingface" / "datasets"
    no_cache_env.setenv("HF_HOME", str(tmp_path / "home"))
    assert datasets_cache_dir() == tmp_path / "home" / "datasets"
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    no_cache_env.setenv("HF_DATASETS_CACHE", "~/ds")
    assert datasets_cache_dir() == Path(os.path.expanduser("~/ds"))


def _snapshot(repo, commit: str, files: dict[str, str]):
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, text in files.items():
        (snap / name).write_text(text)
    return snap


def test_cached_snapshot_is_the_one_huggingface_hub_uses_offline(tmp_path, no_cache_env):
    from huggingface_hub import snapshot_download

    no_cache_env.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = hub_repo_dir("org/model")
    assert repo == tmp_path / "hub" / "models--org--model"
    assert cached_snapshot("org/model") is None
    main = _snapshot(repo, "a" * 40, {"config.json": "{}"})
    newer = _snapshot(repo, "b" * 40, {"config.json": "{}"})
    os.utime(newer, (time.time() + 60, time.time() + 60))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    theirs = snapshot_download("org/model", local_files_only=True, cache_dir=str(tmp_path / "hub"))
    assert cached_snapshot("org/model", needs="config.json") == main == Path(theirs)
    (repo / "refs" / "main").unlink()  # no ref: the newest snapshot that has the file
    assert cached_snapshot("org/model", needs="config.json") == newer
    assert cached_snapshot("org/model", needs="tokenizer.json") is None


def test_engine_studio_and_estimator_resolve_a_hub_id_alike(tmp_path, no_cache_env):
    from finetune_studio.core.memory.estimate import ModelShape
    from finetune_studio.engine.datasets.problems import ProblemLog
    from finetune_studio.engine.datasets.sources import resolve_source
    from finetune_studio.engine.models import ModelError, resolve_model
    from finetune_studio.studio.state.model_info import local_folder

    no_cache_env.setenv("HF_HOME", str(tmp_path / "home"))
    snap = _snapshot(hub_repo_dir("org/tiny"), "c" * 40, {"config.json": json.dumps(CONFIG), "model.safetensors": ""})
    assert resolve_model("org/tiny") == snap == local_folder("org/tiny")
    assert ModelShape.for_model_spec("org/tiny").num_hidden_layers == 3
    data = _snapshot(hub_repo_dir("org/data", "dataset"), "d" * 40, {"train.jsonl": '{"text": "x"}\n'})
    assert resolve_source("org/data", ProblemLog()) == [data / "train.jsonl"]
    # Not cached: the engine says where it looked; the studio and the estimator simply have nothing.
    with pytest.raises(ModelError, match=str(tmp_path / "home" / "hub")):
        resolve_model("org/absent")
    assert local_folder("org/absent") is None and ModelShape.for_model_spec("org/absent") is None


def test_default_is_found_where_the_engine_converts_it():
    from finetune_studio.studio.state.model_info import local_folder

    folder = converted_folder(parse_spec("default"))
    assert local_folder("default") is None  # not converted yet: the studio asks the engine
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    assert local_folder("default") == folder
