"""The Triton kernels against their PyTorch paths on a CUDA GPU: milliseconds and peak extra memory.

    python benchmarks/kernels_bench.py [--quick] [--sweep]      # needs a CUDA GPU and triton
    python benchmarks/kernels_bench.py --compile-check [--arch 86 90]  # no GPU needed: compiles every kernel
    python benchmarks/kernels_bench.py --cpu [--threads 1]  # the PyTorch DoRA paths on the CPU

* Output head log-probs (``token_logprobs``), bfloat16, N trained tokens through heads of real models' sizes:
  'chunked' (the default PyTorch path) against 'triton', forward alone and forward + backward, with the head
  frozen (LoRA: grad of the hidden states only) and trained.
* DoRA weight norm, bfloat16 base weight, float32 adapter: peft's way (``lora_B(lora_A(eye)).T`` and the norm of
  ``W + s B A``, under no_grad as peft's forward uses it), 'chunked' and 'triton'; and forward + backward.

Each figure is the median of ``--repeats`` timed runs (CUDA events) after warm-up; memory is the peak allocated
above what the inputs hold. At the end it prints the ``kernels.selection.MEASURED_FASTER`` rows this GPU
supports: a kernel that was faster than its PyTorch path in every case, by 5% or more. Without a CUDA GPU it
says so and exits 0 (the kernels' correctness is tested on the CPU: tests/kernels/test_kernels_triton.py).

``--compile-check`` compiles every kernel for every dtype, with its default launch settings, to a cubin for each
``--arch`` (86: RTX 30xx, 89: RTX 40xx, 90: H100/H200) with Triton's own ptxas, without a GPU, and checks its
shared memory against the arch's limit: what the CPU interpreter cannot catch (layouts, shared memory, dtypes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

HEADS = [("SmolLM2-135M", 576, 49152), ("Qwen2.5-0.5B", 896, 151936), ("Llama-3-8B", 4096, 128256)]
DORA = [("SmolLM2 up_proj", 1536, 576, 16), ("8B q_proj", 4096, 4096, 16), ("8B up_proj r64", 14336, 4096, 64)]
SWEEP = [
    {"block_n": 64, "block_v": 128, "block_h": 64, "num_warps": 4},
    {"block_n": 64, "block_v": 128, "block_h": 64, "num_warps": 8},
    {"block_n": 128, "block_v": 128, "block_h": 64, "num_warps": 8},
    {"block_n": 64, "block_v": 256, "block_h": 64, "num_warps": 8},
    {"block_n": 32, "block_v": 128, "block_h": 128, "num_warps": 4},
    {"block_n": 128, "block_v": 64, "block_h": 64, "num_warps": 4},
]


def timed(fn, repeats: int, *args) -> float:
    """Median milliseconds of ``fn(*args)`` on the current CUDA stream, after two warm-up calls."""
    import torch

    fn(*args), fn(*args)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mib(fn, *args) -> float:
    """Peak CUDA memory allocated by ``fn(*args)`` above what was allocated before, in MiB."""
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*args)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_heads(n_tokens: int, repeats: int, heads, blocks=None) -> list[dict]:
    import torch

    rows = []
    for name, h, v in heads:
        g = torch.Generator(device="cuda").manual_seed(0)
        hidden = torch.randn(n_tokens, h, device="cuda", generator=g).bfloat16()
        weight = (torch.randn(v, h, device="cuda", generator=g) * h**-0.5).bfloat16()
        targets = torch.randint(0, v, (n_tokens,), device="cuda", generator=g)
        rows += _head_case(f"{name} N={n_tokens} H={h} V={v}", hidden, weight, targets, repeats, blocks)
    return rows


def _head_case(case, hidden, weight, targets, repeats, blocks) -> list[dict]:
    import torch

    from finetune_studio.kernels.linear_logprobs import token_logprobs

    def run(impl, trained_head=None):
        extra = {"blocks": blocks} if blocks and impl == "triton" else {}
        if trained_head is None:
            with torch.no_grad():
                return token_logprobs(hidden, weight, targets, impl=impl, **extra)
        hd, wd = hidden.detach().requires_grad_(), weight.detach().requires_grad_(trained_head)
        token_logprobs(hd, wd, targets, impl=impl, **extra).sum().backward()

    diff = (run("triton") - run("chunked")).abs().max().item()
    return [
        {
            "case": case,
            "impl": impl,
            "fwd ms": timed(run, repeats, impl),
            "fwd+bwd ms": timed(run, repeats, impl, False),
            "fwd+bwd head ms": timed(run, repeats, impl, True),
            "peak MiB": peak_mib(run, impl, False),
            "max |dlogp|": diff,
        }
        for impl in ("chunked", "triton")
    ]


def peft_norm(weight, lora_a, lora_b, scaling):
    """What peft's DoraLinearLayer.forward computes for the norm: B @ A via the layers, W + s B A, the row norm."""
    import torch

    eye = torch.eye(lora_a.shape[1], device=lora_a.device, dtype=lora_a.dtype)
    lora_weight = (eye @ lora_a.t() @ lora_b.t()).t().to(weight.dtype)  # lora_B(lora_A(eye)).T
    return torch.linalg.norm(weight + scaling * lora_weight, dim=1).to(weight.dtype)


def bench_dora(repeats: int) -> list[dict]:
    import torch

    rows = []
    for name, out_f, in_f, r in DORA:
        g = torch.Generator(device="cuda").manual_seed(0)
        weight = torch.randn(out_f, in_f, device="cuda", generator=g).bfloat16()
        lora_a = torch.randn(r, in_f, device="cuda", generator=g) * 0.01
        lora_b = torch.randn(out_f, r, device="cuda", generator=g) * 0.01
        rows += _dora_case(f"{name} {out_f}x{in_f} r{r}", weight, lora_a, lora_b, repeats)
    return rows


def _dora_case(case, weight, lora_a, lora_b, repeats) -> list[dict]:
    import torch

    from finetune_studio.kernels.dora_norm import dora_weight_norm

    def norm(impl):
        with torch.no_grad():
            if impl == "peft":
                return peft_norm(weight, lora_a, lora_b, 2.0)
            return dora_weight_norm(weight, lora_a, lora_b, 2.0, impl=impl)

    def step(impl):
        a, b = lora_a.detach().requires_grad_(), lora_b.detach().requires_grad_()
        dora_weight_norm(weight, a, b, 2.0, impl="torch" if impl == "peft" else impl).sum().backward()

    diff = (norm("triton") - norm("chunked")).abs().max().item()
    return [
        {
            "case": case,
            "impl": impl,
            "fwd ms": timed(norm, repeats, impl),
            "fwd+bwd ms": timed(step, repeats, impl),
            "peak MiB": peak_mib(norm, impl),
            "max |dnorm|": diff,
        }
        for impl in ("peft", "chunked", "triton")
    ]


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    cols = list(rows[0])
    widths = [max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(fmt(r[c]).ljust(w) for c, w in zip(cols, widths)))


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if value < 0.01 else f"{value:.2f}"
    return str(value)


def faster_everywhere(rows: list[dict], baseline: str, metric: str) -> bool:
    by_case: dict[str, dict[str, float]] = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["impl"]] = r[metric]
    return all(t["triton"] <= 0.95 * t[baseline] for t in by_case.values())


CPU_DORA = [("SmolLM2 q_proj", 576, 576, 16), ("SmolLM2 up_proj", 1536, 576, 16), ("SmolLM2 down_proj", 576, 1536, 16)]


def cpu_timed(fn, repeats: int, *args) -> float:
    """Median milliseconds of ``fn(*args)`` on the CPU, after one warm-up call."""
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_cpu(repeats: int, tokens: int) -> list[dict]:
    """The PyTorch paths on the CPU, float32: DoRA's norm (peft's way against 'chunked') and one DoRA layer's
    forward + backward on ``tokens`` rows with peft's forward and with the patched one
    (engine.train.model_patches.kernel_wiring)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from finetune_studio.engine.train.model_patches import kernel_wiring
    from finetune_studio.kernels.dora_norm import dora_weight_norm

    rows = []
    for name, out_f, in_f, r in CPU_DORA:
        g = torch.Generator().manual_seed(0)
        weight = torch.randn(out_f, in_f, generator=g)
        lora_a, lora_b = torch.randn(r, in_f, generator=g) * 0.01, torch.randn(out_f, r, generator=g) * 0.01

        def norm(impl, weight=weight, lora_a=lora_a, lora_b=lora_b):
            with torch.no_grad():
                if impl == "peft":
                    return peft_norm(weight, lora_a, lora_b, 2.0)
                return dora_weight_norm(weight, lora_a, lora_b, 2.0, impl=impl)

        torch.manual_seed(0)
        layer = get_peft_model(
            torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False)),
            LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], use_dora=True, init_lora_weights=False),
        )
        x = torch.randn(tokens, in_f, generator=g)

        def step(layer=layer, x=x):
            layer(x).sum().backward()

        peft_step = cpu_timed(step, repeats)
        kernel_wiring.install_dora_norm(layer, "chunked")
        rows.append(
            {
                "case": f"{name} {out_f}x{in_f} r{r}",
                "norm peft ms": cpu_timed(norm, repeats, "peft"),
                "norm chunked ms": cpu_timed(norm, repeats, "chunked"),
                f"layer fwd+bwd N={tokens} peft ms": peft_step,
                "layer patched ms": cpu_timed(step, repeats),
            }
        )
    return rows


# shared memory one block may use, by compute capability (CUDA programming guide): over it a launch fails
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}


def compile_check(archs: list[int]) -> int:
    """Compile each kernel with its default launch settings for each input dtype to a cubin for each sm_<arch>;
    0 when all compile and fit the arch's shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from finetune_studio.kernels import triton_dora_norm as dn
    from finetune_studio.kernels import triton_linear_logprobs as ll

    inputs = {"h_ptr", "w_ptr", "a_ptr", "b_ptr"}  # the pointers to the op's inputs; the rest are float32 buffers
    failed = 0
    for arch in archs:
        for dtype in ("fp32", "bf16", "fp16"):
            hb = {**ll.DEFAULT_BLOCKS, **(ll.FLOAT32_BLOCKS if dtype == "fp32" else {})}
            head = {"HAS_SOFTCAP": True, "IEEE": dtype == "fp32", "DOT_F32": False}
            head |= {"BLOCK_N": hb["block_n"], "BLOCK_V": hb["block_v"], "BLOCK_H": hb["block_h"]}
            dora = {"R": 16, "BLOCK_O": dn.DEFAULT_BLOCKS["block_o"], "BLOCK_I": dn.DEFAULT_BLOCKS["block_i"]}
            jobs = [
                (ll._forward_kernel, head, hb),
                (ll._backward_kernel, {**head, "NEED_H": True, "NEED_W": True}, hb),
                (dn._forward_kernel, dora, dn.DEFAULT_BLOCKS),
                (dn._backward_kernel, {**dora, "NEED_A": True, "NEED_B": True}, dn.DEFAULT_BLOCKS),
            ]
            for fn, consts, launch in jobs:
                sig = {}
                for p in fn.params:
                    if p.is_constexpr:
                        sig[p.name] = "constexpr"
                    elif p.name.endswith("_ptr"):
                        sig[p.name] = f"*{dtype}" if p.name in inputs else ("*i64" if p.name == "t_ptr" else "*fp32")
                    else:
                        sig[p.name] = "fp32" if p.name in ("softcap", "scaling") else "i32"
                options = {"num_warps": launch["num_warps"], "num_stages": launch["num_stages"]}
                label = f"sm_{arch} {fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.fn.__name__} {dtype}"
                start = time.perf_counter()
                try:
                    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
                    k = triton.compile(
                        src, target=GPUTarget("cuda", arch, 32), options={**options, "enable_fp_fusion": True}
                    )
                except Exception as exc:  # report every kernel, then fail
                    failed += 1
                    print(f"{label:54s} FAILED: {type(exc).__name__}: {str(exc)[:800]}")
                    continue
                shared, limit = k.metadata.shared, SHARED_LIMIT.get(arch)
                over = limit is not None and shared > limit
                failed += over
                verdict = "OVER the limit" if over else "ok"
                print(f"{label:54s} {verdict:14s} {time.perf_counter() - start:5.1f} s  shared memory {shared} B")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the smallest head and DoRA case only, fewer repeats")
    p.add_argument("--tokens", type=int, default=4096, help="trained tokens N through the head (default 4096)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--sweep", action="store_true", help="also time the head kernel's tile settings on one head")
    p.add_argument("--compile-check", action="store_true", help="compile every kernel for --arch; no GPU needed")
    p.add_argument("--cpu", action="store_true", help="time the PyTorch DoRA paths on the CPU instead")
    p.add_argument("--threads", type=int, default=1, help="torch threads for --cpu (default 1)")
    p.add_argument(
        "--arch", type=int, nargs="+", default=[86, 90], help="compute capabilities for --compile-check (86 90)"
    )
    args = p.parse_args(argv)
    if args.compile_check:
        return compile_check(args.arch)

    import torch

    if args.cpu:
        torch.set_num_threads(args.threads)
        print(f"CPU, {args.threads} torch thread(s), torch {torch.__version__}, median of {args.repeats}")
        print_table(
            "DoRA on the CPU, float32 (peft = peft's forward; chunked / patched = kernels.dora_norm)",
            bench_cpu(args.repeats, min(args.tokens, 1024)),
        )
        return 0
    if not torch.cuda.is_available():
        print("No CUDA GPU here: nothing to time. The kernels' correctness is tested on the CPU through Triton's")
        print(
            "interpreter (tests/kernels/test_kernels_triton.py); --compile-check compiles them for a GPU without one."
        )
        return 0
    try:
        import triton
    except ImportError:
        print("The triton package is not installed: pip install triton (PyTorch's CUDA wheels bring it along).")
        return 0
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}, torch {torch.__version__}, triton {triton.__version__}, N={args.tokens}, median of {args.repeats}")
    global HEADS, DORA
    if args.quick:
        HEADS, DORA, args.repeats = HEADS[:1], DORA[:1], min(args.repeats, 5)

    heads = bench_heads(args.tokens, args.repeats, HEADS)
    print_table("Output head log-probs, bfloat16 (chunked = the PyTorch path)", heads)
    dora = bench_dora(args.repeats)
    print_table("DoRA weight norm, bfloat16 weight, float32 adapter (peft = what peft's forward does)", dora)

    if args.sweep:
        name, h, v = HEADS[min(1, len(HEADS) - 1)]
        rows = []
        for blocks in SWEEP:
            r = bench_heads(args.tokens, args.repeats, [(name, h, v)], blocks=blocks)[1]
            rows.append({"tiles": str(blocks), **{k: r[k] for k in ("fwd ms", "fwd+bwd ms", "fwd+bwd head ms")}})
        print_table(f"Head kernel tile settings on {name}", rows)

    kind = f"cuda:{gpu}"
    print("\nMEASURED_FASTER rows this GPU supports (kernels/selection.py; record the tables in RESULTS.md):")
    found = False
    if faster_everywhere(heads, "chunked", "fwd+bwd ms"):
        print(f'    ("linear_logprobs", "{kind}"): "triton",')
        found = True
    if faster_everywhere(dora, "peft", "fwd ms") and faster_everywhere(dora, "chunked", "fwd ms"):
        print(f'    ("dora_norm", "{kind}"): "triton",')
        found = True
    if not found:
        print("    none: keep the PyTorch paths as auto's choice on this GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
