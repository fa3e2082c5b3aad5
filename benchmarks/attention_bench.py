"""Causal attention of a packed row: ``kernels.cpu_attention`` (one C call) against torch's SDPA per sequence.

    python benchmarks/attention_bench.py [--lengths 112 118 110 115] [--threads 1] [--repeats 50]

One layer of the bundled model (SmolLM2-135M: 9 query heads, 3 key/value heads, head dim 64) on a packed row of
sequences of ``--lengths`` tokens, float32, q/k/v as Llama's attention passes them (its projections viewed
[1, T, heads, D] and transposed), with a training step's allocator settings. Times (CPU ms, the median of
``--repeats`` after warm-up, the sides interleaved) the forward alone (no graph), the backward alone (one graph kept,
``autograd.grad`` with ``retain_graph``) and forward + backward of ``packed_attention`` with ``impl='torch'`` (SDPA's
float32 flash kernel, one call per sequence) and ``impl='auto'`` (the C kernel); prints GFLOP/s (the causal products'
FLOPs: 4 H D per query-key pair forward, 2.5x that backward), the ratios, and the largest differences of the outputs
and gradients.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[112, 118, 110, 115])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--heads", type=int, nargs=3, default=(9, 3, 64), metavar=("H", "KV", "D"))
    args = ap.parse_args(argv)

    import torch

    from finetune_studio.engine.train.memory_budget import reuse_memory_between_steps
    from finetune_studio.kernels import cpu_attention
    from finetune_studio.kernels.attention import packed_attention

    reuse_memory_between_steps()
    if not cpu_attention.available():
        print("cpu_attention: the kernel does not run here (AVX-512 and a C compiler needed)")
        return 0
    torch.set_num_threads(args.threads)
    h, kv, d = args.heads
    lengths, t = list(args.lengths), sum(args.lengths)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, t, h, d, generator=gen).transpose(1, 2).requires_grad_()
    k = torch.randn(1, t, kv, d, generator=gen).transpose(1, 2).requires_grad_()
    v = torch.randn(1, t, kv, d, generator=gen).transpose(1, 2).requires_grad_()
    grad = torch.randn(1, t, h, d, generator=gen).transpose(1, 2)

    def forward(impl: str) -> None:
        with torch.no_grad():
            packed_attention(q, k, v, lengths, impl=impl)

    def both(impl: str) -> None:
        packed_attention(q, k, v, lengths, impl=impl).backward(grad)
        q.grad = k.grad = v.grad = None

    graphs = {impl: packed_attention(q, k, v, lengths, impl=impl) for impl in ("torch", "auto")}

    def backward(impl: str) -> None:
        torch.autograd.grad(graphs[impl], (q, k, v), grad, retain_graph=True)

    flops = sum(4 * h * d * n * (n + 1) / 2 for n in lengths)
    print(f"packed row {lengths} ({t} tokens), {h}/{kv} heads, head dim {d}, {args.threads} thread(s)")
    steps = (("forward", forward, flops), ("backward", backward, 2.5 * flops), ("forward+backward", both, 3.5 * flops))
    for name, fn, work in steps:
        times: dict[str, list[float]] = {"torch": [], "auto": []}
        for impl in times:
            fn(impl)  # warm-up (the first call builds the kernel)
        for _ in range(args.repeats):
            for impl in times:
                t0 = time.process_time()
                fn(impl)
                times[impl].append(time.process_time() - t0)
        sdpa, native = (statistics.median(times[i]) * 1e3 for i in ("torch", "auto"))
        print(
            f"  {name:17s} SDPA {sdpa:6.3f} ms ({work / sdpa / 1e6:5.1f} GFLOP/s), C kernel {native:6.3f} ms "
            f"({work / native / 1e6:5.1f} GFLOP/s): {sdpa / native:.2f}x"
        )
    results = {}
    for impl in ("torch", "auto"):
        out = packed_attention(q, k, v, lengths, impl=impl)
        out.backward(grad)
        results[impl] = [out.detach(), q.grad, k.grad, v.grad]
        q.grad = k.grad = v.grad = None
    diffs = ", ".join(
        f"{n} {(a - b).abs().max().item():.1e}" for n, a, b in zip(("out", "dq", "dk", "dv"), *results.values())
    )
    print(f"  largest differences: {diffs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
