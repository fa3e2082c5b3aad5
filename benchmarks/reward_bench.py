"""What rewards cost a GRPO step: the built-in verifiers per answer, and a Python reward in its sandbox.

    python benchmarks/reward_bench.py [--batch 64] [--calls 20]

Prints, for a batch of demo-task-like answers (JSON objects, a third of them broken): each built-in verifier's time
per answer; then a Python reward function's cost run in the sandbox (``core.rewards.sandbox``) against the same
function called in this process: the worker's start (first call), the time per call after it, and the overhead per
call (sandboxed minus in-process), for several batch sizes. Wall-clock medians; the machine's load average is
printed with them, since other work on the machine moves them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import textwrap
import time
from pathlib import Path

from finetune_studio.core.rewards import RewardSet
from finetune_studio.core.rewards.sandbox import SandboxedReward

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
    "required": ["name", "age", "city"],
}
BUILT_IN = [
    {"kind": "json_valid"},
    {"kind": "json_schema", "schema": SCHEMA},
    {"kind": "exact_match", "column": "answer", "json": True},
    {"kind": "token_f1", "column": "answer"},
    {"kind": "regex", "pattern": r'"age":\s*\d+'},
    {"kind": "length", "max_chars": 80},
    {"kind": "contains", "text": ["name", "city"]},
    {"kind": "not_contains", "text": "sorry"},
    {"kind": "think_answer"},
]
FUNCTION = """
import json

def reward(prompts, completions, answer, **kwargs):
    out = []
    for text, ref in zip(completions, answer):
        try:
            got = json.loads(text)
        except ValueError:
            out.append(0.0)
            continue
        want = json.loads(ref)
        out.append(sum(got.get(k) == v for k, v in want.items()) / len(want) if isinstance(got, dict) else 0.0)
    return out
"""


def answers(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts, refs = [], []
    for i in range(n):
        ref = {"name": f"Person {i}", "age": rng.randint(18, 90), "city": rng.choice(["Oslo", "Lima", "Pune"])}
        got = dict(ref, age=ref["age"] + rng.choice([0, 0, 1]))
        text = json.dumps(got)
        texts.append(text if i % 3 else text[:-3])  # a third of them cut short: not JSON
        refs.append(json.dumps(ref))
    return texts, refs


def median_s(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}; batch {args.batch}; median of {args.calls} calls")

    texts, refs = answers(args.batch)
    prompts = ["Extract the person as JSON."] * args.batch
    print(f"\n{'verifier':<14}{'us/answer':>12}")
    for spec in BUILT_IN:
        rewards = RewardSet([spec])
        seconds = median_s(lambda r=rewards: r.score(prompts, texts, {"answer": refs}), args.calls)
        print(f"{spec['kind']:<14}{seconds / args.batch * 1e6:>12.1f}")

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fields.py"
        path.write_text(textwrap.dedent(FUNCTION))
        namespace: dict = {}
        exec(compile(path.read_text(), str(path), "exec"), namespace)
        local = namespace["reward"]
        print(f"\n{'batch':>6}{'start ms':>10}{'sandboxed ms':>14}{'in-process ms':>15}{'overhead ms':>13}{'ratio':>8}")
        for batch in (8, 64, 256):
            texts, refs = answers(batch)
            prompts = ["p"] * batch
            fn = SandboxedReward(path)
            start = time.perf_counter()
            first = fn(prompts=prompts, completions=texts, answer=refs)
            started = time.perf_counter() - start
            assert first == local(prompts=prompts, completions=texts, answer=refs)
            boxed = median_s(lambda f=fn, t=texts, r=refs, p=prompts: f(prompts=p, completions=t, answer=r), args.calls)
            plain = median_s(lambda t=texts, r=refs, p=prompts: local(prompts=p, completions=t, answer=r), args.calls)
            fn.close()
            print(
                f"{batch:>6}{started * 1e3:>10.1f}{boxed * 1e3:>14.2f}{plain * 1e3:>15.3f}"
                f"{(boxed - plain) * 1e3:>13.2f}{boxed / plain:>7.1f}x"
            )


if __name__ == "__main__":
    main()
