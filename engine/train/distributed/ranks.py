"""One training run as several processes, on PyTorch's own distributed engine (torchrun + torch.distributed).

``train CONFIG --nproc N`` starts N ranks through ``torch.distributed.run`` (see
:mod:`engine.train.distributed.launch`); each
rank runs the same recipe (:mod:`engine.train.recipe`) with a :class:`Ranks` handle. What differs between ranks:

- the data: every rank draws the same global batch (``batch_size x gradient_accumulation_steps`` examples, the
  single-process order) and trains on its contiguous share of ``G / N`` examples, in micro-batches of at most
  ``batch_size``;
- the loss: rank r computes ``sum_r(-log p) / T`` with T the token count of the whole global batch (all-reduced),
  and back-propagates it times N, because DDP and FSDP average gradients over ranks; the sum over ranks is then
  the single-process gradient ``sum(-log p) / T``;
- who speaks: rank 0 alone emits events, writes the run's rows and the adapter.

The model is wrapped by torch's DDP (adapters replicated, their gradients all-reduced; frozen weights take no
part) or by FSDP2 (``fully_shard`` on every decoder layer, then on the root): never by a home-made layer.

A run on one process is a world of size one (:class:`OneProcess`): the same calls, each the identity (a sum over
one rank is the value, a broadcast is the object, a barrier waits for nobody), so the recipe has one path.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from finetune_studio.engine import checkpoint
from finetune_studio.engine.train.batches import Batch
from finetune_studio.engine.train.distributed import checkpoint as dist_checkpoint
from finetune_studio.engine.train.forward import LogprobModel, TokenLogps

WORKER_ENV = "FINETUNE_STUDIO_RANK_WORKER"  # set by the launcher: this process is one rank of a run
LAUNCH_FILE_ENV = "FINETUNE_STUDIO_LAUNCH_FILE"  # rank 0 writes the run id there for the launcher
LAUNCHER_PID_ENV = "FINETUNE_STUDIO_LAUNCHER_PID"  # recorded as the run's process: SIGTERM to it reaches all
DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class RankFailure:
    """Why one rank ended; written to torchelastic's per-rank error file, read back by the launcher.

    ``peer`` marks a communication error (a collective broke because another rank died or hung): a consequence,
    not the cause, so the launcher names the rank that failed first for another reason.
    """

    rank: int
    kind: str
    message: str
    detail: str = ""
    peer: bool = False
    step: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_text(cls, text: str) -> RankFailure | None:
        try:
            data = json.loads(text)
            return (
                cls(**data)
                if isinstance(data, dict) and data.keys() <= {f.name for f in dataclasses.fields(cls)}
                else None
            )
        except (TypeError, ValueError):
            return None


class World(Protocol):
    """The processes training one run, as the recipe sees them: :class:`OneProcess` or :class:`Ranks`."""

    rank: int
    world_size: int
    is_main: bool  # rank 0: emits the events, writes the run's rows and the adapter
    parallelism: str

    @property
    def shards(self) -> bool:
        """Whether each process holds only a shard of the weights (FSDP)."""
        ...

    def device_share(self, device): ...
    def share(self, n: int) -> slice: ...
    def sum(self, values: list[float]) -> list[float]: ...
    def broadcast(self, obj): ...
    def barrier(self) -> None: ...
    def wrap(self, model, dtype: torch.dtype, device: str, kernels: str = "auto") -> torch.nn.Module: ...
    def check_shardable(self, config, device: str, dtype: torch.dtype) -> None: ...
    def adapter_state(self, model) -> dict[str, torch.Tensor] | None: ...
    def stopping(self, requested: bool, agreed: bool = False) -> bool: ...
    def run_pid(self) -> int: ...
    def announce_run(self, run_id: str, run_dir: str) -> None: ...
    def hand_failure_to_launcher(self, kind: str, message: str, exc: BaseException, step: int) -> bool: ...
    def save_checkpoint(
        self,
        run_dir: Path,
        module,
        model,
        optimizer,
        scheduler,
        state: checkpoint.TrainerState,
        scaler=None,
        extra=None,
    ) -> Path: ...


class OneProcess:
    """A run on one process: the world of size one, where every collective is the identity."""

    rank = 0
    world_size = 1
    local_rank = 0
    is_main = True
    shards = False

    def __init__(self) -> None:
        self.parallelism = ""  # nothing to split: DDP and FSDP are for several processes

    def device_share(self, device):
        """The whole ``device``: no other process shares it."""
        return device

    def share(self, n: int) -> slice:
        return slice(0, n)

    def sum(self, values: list[float]) -> list[float]:
        return list(values)

    def broadcast(self, obj):
        return obj

    def barrier(self) -> None:
        pass

    def wrap(self, model, dtype: torch.dtype, device: str, kernels: str = "auto") -> torch.nn.Module:
        """The training forward as one module (:class:`LogpsModule`), wrapped by nothing."""
        return LogpsModule(model, kernels)

    def check_shardable(self, config, device: str, dtype: torch.dtype) -> None:
        pass  # nothing is sharded

    def adapter_state(self, model) -> dict[str, torch.Tensor] | None:
        """None: the model holds its adapter's full weights, PEFT saves them as they are."""
        return None

    def stopping(self, requested: bool, agreed: bool = False) -> bool:
        """One process stops as soon as it is asked to (at a step, or between set-up stages)."""
        return requested

    def run_pid(self) -> int:
        """The process recorded as the run's (SIGTERM to it stops the run): this one."""
        return os.getpid()

    def announce_run(self, run_id: str, run_dir: str) -> None:
        pass  # no launcher waits to learn the run

    def hand_failure_to_launcher(self, kind: str, message: str, exc: BaseException, step: int) -> bool:
        """False: no launcher; the process marks its run failed itself."""
        return False

    def save_checkpoint(
        self,
        run_dir: Path,
        module,
        model,
        optimizer,
        scheduler,
        state: checkpoint.TrainerState,
        scaler=None,
        extra=None,
    ) -> Path:
        """A one-process checkpoint (:mod:`engine.checkpoint`); ``extra(folder)`` adds the objective's files."""
        return checkpoint.save_checkpoint(run_dir, model, optimizer, scheduler, state, scaler, extra)


class Ranks:
    """This process's place in a run on several processes and the few collectives the recipe needs."""

    def __init__(self, parallelism: str = "ddp"):
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.parallelism = parallelism
        self.is_main = self.rank == 0

    def device_share(self, device):
        """What one process can count on of ``device`` (a ``core.devices.DeviceInfo``): a GPU of its own, or its
        share of the RAM the ranks on this machine use together (``LOCAL_WORLD_SIZE``)."""
        from finetune_studio.core.memory.parallel import shared_device

        return shared_device(device, int(os.environ.get("LOCAL_WORLD_SIZE") or self.world_size))

    def share(self, n: int) -> slice:
        """This rank's contiguous share of a global batch of ``n`` examples (n divisible by the world size)."""
        per = n // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, on the backend's device)."""
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    @property
    def shards(self) -> bool:
        return self.parallelism == "fsdp"

    def check_shardable(self, config, device: str, dtype: torch.dtype) -> None:
        check_shardable(config, device, dtype)

    def adapter_state(self, model) -> dict[str, torch.Tensor] | None:
        """The adapter's full weights, gathered from every rank (every rank calls)."""
        return self.full_trainable_state(model)

    def stopping(self, requested: bool, agreed: bool = False) -> bool:
        """Several processes stop together, at a step whose all-reduce carried the request (``agreed``): never
        between set-up stages, and a request that comes later in a step waits for the next one."""
        return agreed

    def run_pid(self) -> int:
        """The process recorded as the run's: the launcher (SIGTERM to it reaches every rank)."""
        return int(os.environ.get(LAUNCHER_PID_ENV) or os.getpid())

    def announce_run(self, run_id: str, run_dir: str) -> None:
        write_launch_file(run_id, run_dir)

    def hand_failure_to_launcher(self, kind: str, message: str, exc: BaseException, step: int) -> bool:
        """Write this rank's failure for the launcher, which names the rank that failed first and marks the run."""
        record_failure(self.rank, kind, message, exc, step)
        return True

    def save_checkpoint(
        self,
        run_dir: Path,
        module,
        model,
        optimizer,
        scheduler,
        state: checkpoint.TrainerState,
        scaler=None,
        extra=None,
    ) -> Path:
        """A distributed (DCP) checkpoint; every rank calls at the same step (rank 0 calls ``extra(folder)``)."""
        return dist_checkpoint.save_checkpoint(run_dir, module, model, optimizer, scheduler, state, self, scaler, extra)

    def wrap(self, model, dtype: torch.dtype, device: str, kernels: str = "auto") -> torch.nn.Module:
        """The PEFT ``model`` in a :class:`LogpsModule`, wrapped by DDP or sharded by FSDP2."""
        module = LogpsModule(model, kernels)
        if self.parallelism == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else None
            kw: dict[str, Any] = {"mp_policy": mp} if mp is not None else {}
            for layer in decoder_layers(model):
                fully_shard(layer, **kw)
            fully_shard(module, **kw)
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(
            module,
            device_ids=[torch.cuda.current_device()] if device == "cuda" else None,
            broadcast_buffers=False,  # rotary tables and the like are computed, identical on every rank
            gradient_as_bucket_view=True,  # no second copy of the gradients in the buckets
        )

    def full_trainable_state(self, model) -> dict[str, torch.Tensor]:
        """{name: full tensor on the CPU} of the trainable parameters; FSDP all-gathers them (every rank calls)."""
        from torch.distributed.tensor import DTensor

        out = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                t = p.detach()
                out[name] = (t.full_tensor() if isinstance(t, DTensor) else t).cpu()
        return out


def check_shardable(config, device: str, dtype: torch.dtype) -> None:
    """FSDP shards a 4-bit base only as bitsandbytes' packed storage in the compute dtype (see
    ``engine.models.load_causal_lm``). On the CPU, bitsandbytes repacks 4-bit weights computing in bfloat16
    into a layout of its own CPU kernel, which FSDP cannot shard: refuse that case (also as ``bf16-mixed``, whose
    4-bit layers compute in bfloat16), before loading."""
    from finetune_studio.core import methods

    entry = methods.method(config.method)
    if not entry.allows(methods.DISTRIBUTED):
        from finetune_studio.core.config import ConfigError

        raise ConfigError("method", f"{entry.label} on several processes: {entry.refusal(methods.DISTRIBUTED)}")
    bf16_4bit = dtype != torch.float32 or config.compute_dtype == "bf16-mixed"
    if config.parallelism == "fsdp" and config.quantized and device == "cpu" and bf16_4bit:
        from finetune_studio.core.config import ConfigError

        raise ConfigError(
            "compute_dtype",
            f"FSDP with a 4-bit base on the CPU computes in float32: bitsandbytes repacks "
            f"{'bfloat16' if config.compute_dtype == 'bf16-mixed' else dtype} 4-bit "
            "weights for its CPU kernel into a layout FSDP cannot shard; use compute_dtype: auto or float32, "
            "or parallelism: ddp",
        )


class LogpsModule(torch.nn.Module):
    """The training forward (``LogprobModel``) as one module, so that DDP's and FSDP's hooks run around it.

    Its forward takes the batch's tensors and returns (log-probs [N], sequence of each [N]).
    """

    def __init__(self, model, kernels: str = "auto"):
        super().__init__()
        self.model = model
        self._logps = LogprobModel(model, kernels=kernels)

    def forward(self, input_ids, attention_mask, labels, position_ids=None):
        out = self._logps(Batch(input_ids, attention_mask, labels, position_ids=position_ids))
        return out.logps, out.rows


class WrappedLogps:
    """A drop-in for :class:`LogprobModel` that calls the wrapped module."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, batch: Batch) -> TokenLogps:
        logps, rows = self.module(batch.input_ids, batch.attention_mask, batch.labels, batch.position_ids)
        return TokenLogps(logps=logps, rows=rows, batch=batch.sequences)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks (``model.layers`` of Llama, Qwen, Mistral, Gemma, Phi-3 ...)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if layers is None:
        raise ValueError(f"FSDP: no decoder layers found in {type(base).__name__}; use parallelism: ddp")
    return list(layers)


# --- the process side: joining the group, dying with the launcher, reporting a failure -------------------------


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def init(timeout_s: float = DEFAULT_TIMEOUT_S) -> Ranks:
    """Join the process group torchrun set up (gloo on the CPU, NCCL on CUDA GPUs); die with the launcher."""
    _die_with_parent()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return Ranks()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _die_with_parent() -> None:
    """Linux: SIGKILL this rank when its parent (torchrun's agent) dies, so no rank outlives a killed launcher."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() == 1:  # the parent died before prctl
        os._exit(1)


def is_peer_error(exc: BaseException) -> bool:
    """A collective broke (another rank died, hung or closed its connection)."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(s in text for s in ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out"))


def record_failure(rank: int, kind: str, message: str, exc: BaseException, step: int) -> None:
    """Write this rank's failure where torchelastic looks for it (``TORCHELASTIC_ERROR_FILE``)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    failure = RankFailure(
        rank=rank,
        kind=kind,
        message=message,
        detail=f"{type(exc).__name__}: {exc}"[:2000],
        peer=is_peer_error(exc),
        step=step,
    )
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"message": failure.to_json(), "timestamp": int(time.time())}, f)
    os.replace(tmp, path)


def write_launch_file(run_id: str, run_dir: str) -> None:
    """Rank 0 tells the launcher which run it trains (atomically)."""
    path = os.environ.get(LAUNCH_FILE_ENV)
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"run_id": run_id, "run_dir": run_dir}, f)
    os.replace(tmp, path)


class QuietStore:
    """The store as ranks other than 0 see it: they never write the run's rows."""

    def update_run(self, *_args, **_kw) -> None:
        pass

    def delete_metrics_after(self, *_args, **_kw) -> None:
        pass

    def close(self) -> None:
        pass
