"""A bf16-mixed run's heap does not grow with the number of batch lengths it has seen.

Every bf16 matrix product on the CPU makes a oneDNN primitive for its exact shape, about 0.29 MiB in each of
oneDNN's and ideep's caches whatever the matrices' sizes, kept up to 1024 entries each by default: a run whose
batches keep bringing new padded lengths (steps and evaluations alike) kept 4.6-11.5 MiB more heap in use a length
on the default model, and the heap's freed blocks around them grew several times that
(``engine.train.memory_budget.bound_onednn_caches``). The caches read their size once per process, so the run is
measured in a fresh process, with the settings the user left unset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from reward_helpers import write_pairs

from finetune_studio.engine.train.memory_budget import ONEDNN_CACHE_ENTRIES, ONEDNN_CACHES
from finetune_studio.engine.train.model_patches.mixed_precision import cpu_has_fast_bf16

STEPS = 30  # one pair a step, every pair a length of its own: 30 padded lengths

RUN = r"""
import ctypes, json, sys
from finetune_studio.core.config import TrainConfig
from finetune_studio.engine.train.recipe import train_run
from finetune_studio.engine.train.reporting import Reporter

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
in_use = {}

def on_event(event):
    if event.type == "step":
        info = libc.mallinfo2()
        in_use[event.step] = info.uordblks + info.hblkhd

model, data, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = TrainConfig(model=model, dataset=data, objective="reward", max_steps=steps, batch_size=1,
                     learning_rate=1e-3, eval_every=steps // 3, validation_fraction=0.1, checkpoint_every=0,
                     lora_rank=8, lora_alpha=16, compute_dtype="bf16-mixed", num_threads=1, seed=0)
train_run(config, reporter=Reporter(extra=on_event))
print(json.dumps(in_use))
"""


def pairs_of_every_length(n: int) -> list[dict]:
    """Pair i's answers are i + 2 words long: each pair pads to a length no other pair has."""
    words = "quick brown lazy dog capital Paris sea waves salt wind gull hello".split()
    return [
        {
            "prompt": "Say something.",
            "chosen": " ".join(words[k % len(words)] for k in range(i + 2)),
            "rejected": " ".join(words[(k + 5) % len(words)] for k in range(i + 2)),
        }
        for i in range(n)
    ]


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="bf16-mixed's oneDNN products need AVX-512 BF16 or AMX")
def test_new_batch_lengths_do_not_grow_the_heap_of_a_bf16_mixed_run(tiny_model_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", pairs_of_every_length(STEPS + STEPS // 6))
    env = {k: v for k, v in os.environ.items() if k not in ONEDNN_CACHES}  # the run's own setting applies
    env.update(FINETUNE_STUDIO_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", RUN, str(tiny_model_dir), str(data), str(STEPS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    in_use = {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    # each new length brings at least 8 products' shapes into each cache: full within ONEDNN_CACHE_ENTRIES / 8 lengths
    full = STEPS // 3
    assert ONEDNN_CACHE_ENTRIES // 8 <= full
    growth = in_use[STEPS] - in_use[full]
    # without the bound the 20 lengths after it (and an evaluation) kept 190 MiB more (measured: 9.5 MiB a length)
    assert growth < 16 * 2**20, f"the heap in use grew {growth / 2**20:.0f} MiB from step {full} to {STEPS}"
