"""Test configuration: headless Qt, a private studio home per test, a tiny model built offline."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The Triton kernels run through Triton's interpreter on CPU tensors. Triton reads this when a kernel is
# decorated, so it must be set before any test module imports a kernel module (TRITON_INTERPRET=0 on a GPU).
os.environ.setdefault("TRITON_INTERPRET", "1")

# The project is imported as finetune_studio.* (an editable install). The checkout's root is no import root:
# under ``python -m pytest`` it would make ``import kernels`` land in this project's kernels/ folder.
from finetune_studio.core.paths import drop_checkout_from_path

drop_checkout_from_path()
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def studio_home(tmp_path, monkeypatch):
    """Every test gets its own data directory (database, runs, models)."""
    home = tmp_path / "studio-home"
    home.mkdir()
    monkeypatch.setenv("FINETUNE_STUDIO_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with hidden size 64 and a 320-token BPE tokenizer, as a safetensors folder."""
    from tiny_model import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def peaked_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its (tied) embeddings ten times larger. The plain tiny model's logits are all within about
    +-1 (embeddings of std 0.02 read a normalised hidden state), so no adapter can make any answer likely: an online
    RL reward could hardly rise. Larger embeddings let its distributions peak, as a real model's do."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("peaked-model")
    for f in tiny_model_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)
    model.save_pretrained(out, safe_serialization=True)
    return out
