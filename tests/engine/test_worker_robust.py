"""The generation worker (``engine serve``, a real subprocess with the tiny model) under malformed and oversized
request lines: each is answered with an error, after which the worker still answers a request and a cancel, and
still exits when its stdin closes; an oversized line or prompt never grows the worker by more than a bounded amount.
"""

from __future__ import annotations

import threading

import psutil
import pytest

from finetune_studio.core.protocol import generation as gp
from finetune_studio.core.protocol.generation_client import GenerationClient

PROMPT = "What is the capital of France?"
DIGITS = "7" * 5000  # past Python's limit on converting digits to an int (json.loads raises ValueError)
DEPTH = 10**6  # far past the interpreter's recursion limit (json.loads raises RecursionError)


@pytest.fixture
def worker(tiny_model_dir, studio_home):
    client = GenerationClient(threads=1)
    client.start()
    assert client.call(gp.LoadModel(id="load", model=str(tiny_model_dir)))[-1].type == "loaded"
    yield client
    client.close()


class PeakRss:
    """The highest resident size of a process while the block runs, sampled every 20 ms."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.before = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.before) / 2**20


def _still_serves(client: GenerationClient, tag: str) -> None:
    """A normal request is answered, a running generation is cancelled on request, and closing stdin ends it."""
    done = client.call(gp.Generate(id=f"{tag}-ok", prompt=PROMPT, max_new_tokens=4))[-1]
    assert isinstance(done, gp.Generated) and done.new_tokens > 0, done
    long = gp.Generate(id=f"{tag}-long", prompt=PROMPT, n=2, temperature=1.0, max_new_tokens=480, stream_every=1)
    seen = []
    for reply in client.stream(long):
        seen.append(reply)
        if len(seen) == 1:
            client.send(gp.Cancel(id=f"{tag}-cancel", target=long.id))
    assert isinstance(seen[-1], gp.Generated) and seen[-1].cancelled, seen[-1]
    assert next(client.replies(f"{tag}-cancel")) == gp.Cancelled(id=f"{tag}-cancel", target=long.id, found=True)
    proc = client.proc
    assert proc is not None and proc.stdin is not None
    proc.stdin.close()  # end of input, no shutdown request: the worker must end by itself
    assert proc.wait(timeout=60) == 0


def _error(client: GenerationClient, rid: str) -> gp.Error:
    reply = next(client.replies(rid, timeout=120))
    assert isinstance(reply, gp.Error) and reply.kind == "bad_request", reply
    return reply


def test_an_integer_past_the_digit_limit_is_a_bad_request(worker):
    worker.send_line(f'{{"v":1,"id":"digits","type":"generate","prompt":"x","seed":{DIGITS}}}')
    assert "digit" in _error(worker, "digits").message
    _still_serves(worker, "after-digits")


def test_nesting_past_the_recursion_limit_is_a_bad_request(worker):
    worker.send_line('{"v":1,"id":"deep","type":"generate","prompt":"x","extra":' + "[" * DEPTH + "]" * DEPTH + "}")
    assert "RecursionError" in _error(worker, "deep").message
    worker.send_line("[" * DEPTH)  # unclosed, and no id anywhere
    _error(worker, "")
    _still_serves(worker, "after-deep")


def test_a_line_over_the_limit_is_refused_unread_and_the_worker_stays_small(worker):
    prompt = "The quick brown fox jumps over the lazy dog. " * (40 * 2**20 // 45)  # a 40 MB prompt
    line = gp.Generate(id="huge", prompt=prompt).to_json()
    assert len(line) > 8 * gp.MAX_LINE_BYTES
    with PeakRss(worker.ready.pid) as rss:
        worker.send_line(line)
        error = _error(worker, "huge")
    print(f"40 MB prompt line: worker RSS {rss.before / 2**20:.0f} MiB -> peak {rss.peak / 2**20:.0f} MiB")
    assert "4 MiB" in error.message and "longer" in error.message
    assert rss.growth_mib < 64, f"the worker grew by {rss.growth_mib:.0f} MiB reading a line it refuses"
    _still_serves(worker, "after-huge")


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenising(worker):
    prompt = "The quick brown fox jumps over the lazy dog. " * (3 * 2**20 // 45)  # 3 MB: under the line limit
    batch = gp.GenerateBatch(id="long-batch", prompts=[{"prompt": "hi"}, {"prompt": prompt}])
    with PeakRss(worker.ready.pid) as rss:
        single = worker.call(gp.Generate(id="long", prompt=prompt))[-1]
        in_batch = worker.call(batch)[-1]
    print(f"3 MB prompt: worker RSS {rss.before / 2**20:.0f} MiB -> peak {rss.peak / 2**20:.0f} MiB")
    assert isinstance(single, gp.Error) and single.kind == "context", single
    assert "characters" in single.message and "512" in single.message
    assert isinstance(in_batch, gp.Error) and in_batch.kind == "context" and "prompt 2" in in_batch.message
    assert rss.growth_mib < 128, f"the worker grew by {rss.growth_mib:.0f} MiB refusing a prompt"
    _still_serves(worker, "after-long")


def test_out_of_range_numbers_are_refused_naming_the_field(worker):
    for rid, body, field in [
        ("seed", '"seed":1180591620717411303424', "seed"),  # 2**70
        ("inf", '"temperature":Infinity', "temperature"),
        ("nan", '"temperature":NaN', "temperature"),
        ("tokens", '"max_new_tokens":1000000000000000000000000000000', "max_new_tokens"),
    ]:
        worker.send_line(f'{{"v":1,"id":"{rid}","type":"generate","prompt":"x",{body}}}')
        assert f"'{field}'" in _error(worker, rid).message
    _still_serves(worker, "after-range")
