"""The pieces of multi-process training that need no second process: the per-process memory estimate, the
config's parallelism rules, the SLURM script, and how the launcher names the rank that failed first."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess

import pytest

from finetune_studio.core.config import ConfigError, TrainConfig
from finetune_studio.core.devices import DeviceInfo
from finetune_studio.core.memory.estimate import DTYPE_BYTES, GIB, ModelShape, estimate_training_memory
from finetune_studio.core.memory.parallel import estimate_per_process_memory, per_process_batch

GPU = DeviceInfo("cuda", "Test GPU", 80 * GIB, 80 * GIB, True)
DEFAULT = ModelShape.for_model_spec("default")


def test_one_process_is_the_plain_estimate():
    cfg = TrainConfig(dataset="x.jsonl")
    assert estimate_per_process_memory(DEFAULT, cfg, GPU, 1, "fsdp") == estimate_training_memory(DEFAULT, cfg, GPU)


def test_ddp_replicates_the_model_and_splits_the_batch():
    cfg = TrainConfig(dataset="x.jsonl", batch_size=8, gradient_accumulation_steps=1)
    one = estimate_training_memory(DEFAULT, cfg, GPU)
    four = estimate_per_process_memory(DEFAULT, cfg, GPU, 4, "ddp")
    quarter = estimate_training_memory(DEFAULT, cfg.replace(batch_size=2), GPU)
    assert per_process_batch(cfg, 4) == 2
    for term in ("base_weights", "adapter_weights", "gradients", "optimizer_states"):
        assert getattr(four, term) == getattr(one, term)
    assert four.activations == quarter.activations < one.activations
    assert four.logits == quarter.logits


def test_fsdp_keeps_a_shard_plus_the_gathered_layers():
    cfg = TrainConfig(dataset="x.jsonl", batch_size=4, gradient_accumulation_steps=2)  # 8 a step: 4 per process
    n = 2
    one = estimate_training_memory(DEFAULT, cfg, GPU)
    est = estimate_per_process_memory(DEFAULT, cfg, GPU, n, "fsdp")
    b = DTYPE_BYTES[one.compute_dtype]
    root = (DEFAULT.embedding_params + DEFAULT.lm_head_params + DEFAULT.hidden_size) * b
    layer = (one.base_weights - root) / DEFAULT.num_hidden_layers
    assert est.base_weights == int(one.base_weights / n + (1 - 1 / n) * (root + 2 * layer))
    assert est.optimizer_states == int(one.optimizer_states / n)
    assert est.activations == one.activations  # micro-batches of 4 rows either way
    assert est.base_weights < one.base_weights and est.total_bytes < one.total_bytes
    ddp = estimate_per_process_memory(DEFAULT, cfg, GPU, n, "ddp")
    assert est.total_bytes < ddp.total_bytes


def test_parallelism_is_validated_and_fsdp_takes_a_4bit_base_but_not_bfloat16_on_the_cpu():
    import torch

    from finetune_studio.engine.train.distributed.ranks import check_shardable

    assert TrainConfig(dataset="x").parallelism == "ddp"
    with pytest.raises(ConfigError, match="parallelism"):
        TrainConfig(dataset="x", parallelism="zero3")
    TrainConfig(dataset="x", parallelism="fsdp", method="dora")
    qlora = TrainConfig(dataset="x", parallelism="fsdp", method="qlora")
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16), ("cuda", torch.float16)):
        check_shardable(qlora, device, dtype)
    check_shardable(qlora.replace(parallelism="ddp"), "cpu", torch.bfloat16)
    with pytest.raises(ConfigError, match="compute_dtype") as err:
        check_shardable(qlora, "cpu", torch.bfloat16)
    assert "bitsandbytes repacks" in str(err.value) and "parallelism: ddp" in str(err.value)
    with pytest.raises(ConfigError, match="compute_dtype"):  # bf16-mixed loads in float32, its 4-bit layers bf16
        check_shardable(qlora.replace(compute_dtype="bf16-mixed"), "cpu", torch.float32)
    check_shardable(qlora.replace(compute_dtype="bf16-mixed", parallelism="ddp"), "cpu", torch.float32)


def test_a_shardable_4bit_base_stores_its_packed_weights_in_the_compute_dtype(tiny_model_dir):
    """What lets FSDP's mixed precision (which casts every parameter to the compute dtype) leave them intact."""
    import bitsandbytes as bnb
    import torch

    from finetune_studio.engine.models import load_causal_lm

    def storage(**kw) -> set:
        model = load_causal_lm(tiny_model_dir, dtype=torch.float32, device="cpu", quantize_4bit=True, **kw)
        return {m.weight.dtype for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}

    assert storage() == {torch.uint8}
    assert storage(shardable=True) == {torch.float32}


def test_the_memory_report_of_a_distributed_run_is_one_processs():
    from finetune_studio.core.memory.parallel import shared_device
    from finetune_studio.core.protocol.memory_report import memory_report

    for parallelism in ("ddp", "fsdp"):
        cfg = TrainConfig(dataset="x", batch_size=8, parallelism=parallelism, method="qlora")
        report = memory_report(DEFAULT, cfg, GPU, world_size=4)
        assert report.total_bytes == estimate_per_process_memory(DEFAULT, cfg, GPU, 4, parallelism).total_bytes
        assert f"per process, 4 processes ({parallelism.upper()})" in report.notes
        assert report.total_bytes < memory_report(DEFAULT, cfg, GPU).total_bytes
    # a change that makes it fit is judged per process too, FSDP with a 4-bit base among the candidates
    small = DeviceInfo("cuda", "Small GPU", 3 * GIB // 2, 3 * GIB // 2, True)
    big = TrainConfig(dataset="x", batch_size=32, max_length=2048, parallelism="fsdp")
    assert memory_report(DEFAULT, big, small).cheapest_change.startswith("use QLORA (4-bit base)")
    two = memory_report(DEFAULT, big, small, world_size=2)  # each process trains half the batch
    assert two.verdict == "does not fit" and two.cheapest_change.startswith("enable gradient checkpointing and lower")
    # gloo ranks on one machine share its RAM; a GPU is each process's own
    cpu = DeviceInfo("cpu", "CPU", 64 * GIB, 60 * GIB, True)
    assert shared_device(cpu, 4).free_bytes == 15 * GIB and shared_device(cpu, 4).total_bytes == 16 * GIB
    assert shared_device(GPU, 4) == GPU and shared_device(cpu, 1) == cpu


def test_slurm_script_runs_one_agent_per_node_with_a_rendezvous(tmp_path):
    from finetune_studio.core.slurm import sbatch_script

    config = tmp_path / "run config.yaml"
    text = sbatch_script(str(config), nodes=4, gpus_per_node=8, home="/shared/studio", python="/opt/py/bin/python")
    assert "#SBATCH --nodes=4" in text and "#SBATCH --gpus-per-node=8" in text
    assert "#SBATCH --ntasks-per-node=1" in text
    assert "export FINETUNE_STUDIO_HOME=/shared/studio" in text
    line = next(x for x in text.splitlines() if x.startswith("srun "))
    assert f"'{config}'" in line  # quoted: the path has a space
    assert "--nproc 8 --nnodes 4" in line and '--rdzv-endpoint "$head_node:29500"' in line
    assert "trap " in text  # SLURM's SIGTERM reaches srun, hence every rank
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def _failure(tmp_path, rank, exitcode, recorded=None):
    """torchelastic's own record of a rank's end, read from the error file the engine writes."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    path = tmp_path / f"error-{rank}.json"
    if recorded is not None:
        path.write_text(json.dumps({"message": recorded.to_json(), "timestamp": 100}), encoding="utf-8")
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(path))


def test_launcher_names_the_cause_not_the_rank_whose_collective_broke(tmp_path):
    from finetune_studio.engine.train.distributed.launch import describe_failure
    from finetune_studio.engine.train.distributed.ranks import RankFailure

    peer = RankFailure(rank=0, kind="error", message="Training failed at step 3: connection reset", peer=True)
    failures = {0: _failure(tmp_path, 0, 1, peer), 1: _failure(tmp_path, 1, -signal.SIGKILL)}
    kind, message, detail = describe_failure(failures, 2)
    assert message == "Rank 1 of 2 failed: the process (pid 1001) was killed by signal SIGKILL"
    assert "rank 0: exit 1" in detail and kind == "error"

    oom = RankFailure(rank=1, kind="oom", message="Out of memory at step 3. To fit: lower batch_size", step=3)
    failures = {0: _failure(tmp_path, 0, 1, peer), 1: _failure(tmp_path, 1, 1, oom)}
    kind, message, _ = describe_failure(failures, 2)
    assert kind == "oom" and message.startswith("Rank 1 of 2 failed: Out of memory at step 3")
