"""The rotary embedding of q and k: ``kernels.cpu_rotary`` against transformers' ``apply_rotary_pos_emb`` on the CPU.

    python benchmarks/rotary_bench.py [--tokens 455] [--threads 1] [--repeats 200]

One layer of the bundled model (SmolLM2-135M: 9 query heads, 3 key/value heads, head dim 64) on a packed row of
``--tokens`` tokens, float32, q and k as Llama's attention passes them (its projections viewed [B, T, H, D] and
transposed), cos/sin [1, T, D], with a training step's allocator settings. Times (CPU ms, the median of
``--repeats`` after warm-up) the forward alone (under autograd, as in training), the backward alone (the gradients
of the projections' outputs from SDPA-like contiguous [B, H, T, D] gradients) and both, for each side, the sides
interleaved; prints the ratios and checks that both give the same numbers bit for bit.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=455)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--heads", type=int, nargs=3, default=(9, 3, 64), metavar=("H", "KV", "D"))
    args = ap.parse_args(argv)

    import torch
    import transformers.models.llama.modeling_llama as modeling

    from finetune_studio.engine.train.memory_budget import reuse_memory_between_steps
    from finetune_studio.kernels import cpu_rotary

    reuse_memory_between_steps()  # a training step's allocator settings: temporaries reuse the heap (no page faults)
    if not cpu_rotary.available():
        print("cpu_rotary: the kernel does not run here (AVX-512 and a C compiler needed)")
        return 0
    torch.set_num_threads(args.threads)
    h, kv, d = args.heads
    t = args.tokens
    hf = getattr(modeling.apply_rotary_pos_emb, "_fs_original", modeling.apply_rotary_pos_emb)
    g = torch.Generator().manual_seed(0)
    qp = torch.randn(1, t, h * d, generator=g, requires_grad=True)
    kp = torch.randn(1, t, kv * d, generator=g, requires_grad=True)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.arange(t).float()[None, :, None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    grads = torch.randn(1, h, t, d, generator=g), torch.randn(1, kv, t, d, generator=g)

    def forward(fn):
        return fn(qp.view(1, t, h, d).transpose(1, 2), kp.view(1, t, kv, d).transpose(1, 2), cos, sin)

    def backward(out):
        return torch.autograd.grad(out, (qp, kp), grads)

    sides = {"transformers": hf, "cpu_rotary": cpu_rotary.rotary_native}
    results = {name: [forward(fn), None] for name, fn in sides.items()}
    for name in sides:
        results[name][1] = backward(forward(sides[name]))
    a, b = results["transformers"], results["cpu_rotary"]
    same = all(torch.equal(x, y) for x, y in zip((*a[0], *a[1]), (*b[0], *b[1])))

    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.repeats + 10):
        for name in sides if r % 2 == 0 else reversed(list(sides)):
            fn = sides[name]
            t0 = time.process_time()
            out = forward(fn)
            t1 = time.process_time()
            backward(out)
            t2 = time.process_time()
            if r >= 10:
                times.setdefault((name, "forward"), []).append(t1 - t0)
                times.setdefault((name, "backward"), []).append(t2 - t1)
                times.setdefault((name, "both"), []).append(t2 - t0)
    print(
        f"rotary embedding of q [1, {h}, {t}, {d}] and k [1, {kv}, {t}, {d}], float32, {args.threads} thread(s), "
        f"median of {args.repeats} (ms); bit for bit the same: {same}"
    )
    for part in ("forward", "backward", "both"):
        hf_ms = statistics.median(times[("transformers", part)]) * 1e3
        native_ms = statistics.median(times[("cpu_rotary", part)]) * 1e3
        print(f"  {part:<9} transformers {hf_ms:7.3f}   cpu_rotary {native_ms:7.3f}   ratio {native_ms / hf_ms:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
