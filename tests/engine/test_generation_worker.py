"""The generation worker (``engine serve``) as a real subprocess with the tiny model: stream, cancel, adapters,
bad requests, a killed worker replaced."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
from tiny_model import build_adapter_dir

from finetune_studio.core.protocol import generation as gp
from finetune_studio.core.protocol.generation_client import GenerationClient, WorkerDied

PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: build_adapter_dir(tiny_model_dir, root / name, seed) for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="module")
def worker(tiny_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("worker-home")
    client = GenerationClient(env={"FINETUNE_STUDIO_HOME": str(home)}, threads=1)
    client.start()
    final = client.call(gp.LoadModel(id="load", model=str(tiny_model_dir)))[-1]
    assert isinstance(final, gp.Loaded), final
    yield client
    client.close()


def _final(client, request) -> gp.Reply:
    return client.call(request)[-1]


def _texts(replies) -> list[str]:
    done = sorted((r for r in replies if isinstance(r, gp.Done)), key=lambda r: r.candidate)
    return [d.text for d in done]


def _generate(client, rid, **kw) -> list[gp.Reply]:
    kw = {"prompt": PROMPT, "max_new_tokens": 16, **kw}
    return client.call(gp.Generate(id=rid, **kw))


def test_generate_streams_deltas_that_make_the_final_text(worker, tiny_model_dir):
    replies = _generate(worker, "g1", n=3, seed=7, temperature=0.9, top_k=40, top_p=0.95, max_new_tokens=20)
    final = replies[-1]
    assert isinstance(final, gp.Generated) and not final.cancelled
    assert final.candidates == 3 and final.new_tokens > 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    chat = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    assert final.prompt_tokens == len(tok(chat, add_special_tokens=False)["input_ids"])  # through the chat template
    for i in range(3):
        mine = [r for r in replies if getattr(r, "candidate", None) == i]
        deltas = [r for r in mine if isinstance(r, gp.Delta)]
        done = [r for r in mine if isinstance(r, gp.Done)]
        assert len(done) == 1 and mine[-1] is done[0]  # every delta came before the candidate's done
        assert len(deltas) >= 2  # streamed, not sent at the end
        assert "".join(d.text for d in deltas) == done[0].text
        assert 1 <= done[0].tokens <= 20 and done[0].finish_reason in ("stop", "length")
    assert sum(d.tokens for d in replies if isinstance(d, gp.Done)) == final.new_tokens
    assert len(set(_texts(replies))) > 1  # sampled candidates differ
    again = _generate(worker, "g2", n=3, seed=7, temperature=0.9, top_k=40, top_p=0.95, max_new_tokens=20)
    assert _texts(again) == _texts(replies)  # same seed, same candidates


def test_stop_strings_cut_the_text(worker):
    free = _texts(_generate(worker, "s0", temperature=0, max_new_tokens=30))[0]
    assert len(free) > 6
    stop = free[3:5]
    replies = _generate(worker, "s1", temperature=0, max_new_tokens=30, stop=[stop], stream_every=1)
    done = next(r for r in replies if isinstance(r, gp.Done))
    assert done.finish_reason == "stop" and done.text == free[: free.index(stop)]
    assert "".join(r.text for r in replies if isinstance(r, gp.Delta)) == done.text


def _plain_generate(model_dir, adapter_dir, **kw) -> list[str]:
    """What plain transformers (+ PEFT) generate makes for the prompt, decoded like the worker decodes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    torch.manual_seed(kw.pop("seed"))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=tok.pad_token_id, **kw)
    texts = []
    for row in out[:, ids.shape[1] :].tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        texts.append(tok.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=False))
    return texts


def test_adapters_switch_without_reloading_and_base_is_the_plain_base(worker, tiny_model_dir, adapters):
    sampled = dict(n=2, seed=3, temperature=0.8, top_p=0.9, max_new_tokens=16)
    base_before = _texts(_generate(worker, "b0", **sampled))
    attached = _final(worker, gp.AttachAdapter(id="at-a", name="a", source=str(adapters["a"])))
    assert isinstance(attached, gp.AdapterAttached) and attached.name == "a", attached
    with_a = _generate(worker, "ga", **sampled)
    assert {d.adapter for d in with_a if isinstance(d, gp.Done)} == {"a"}
    assert _final(worker, gp.AttachAdapter(id="at-b", name="b", source=str(adapters["b"]))).type == "adapter"
    with_b = _texts(_generate(worker, "gb", **sampled))
    assert _texts(with_a) != base_before and with_b != base_before and with_b != _texts(with_a)

    assert _final(worker, gp.SetActive(id="act-a", adapter="a")) == gp.Active(
        id="act-a", adapter="a", attached=("a", "b")
    )
    assert _texts(_generate(worker, "ga2", **sampled)) == _texts(with_a)
    assert _texts(_generate(worker, "gb2", adapter="b", **sampled)) == with_b  # a per-request choice
    assert _final(worker, gp.SetActive(id="act-base", adapter=gp.BASE)).adapter == gp.BASE
    base_after = _texts(_generate(worker, "b1", **sampled))
    assert base_after == base_before  # adapters attached but switched off: truly the base

    # The worker's own decode loop and sampler (tests/engine/test_sampling.py, tests/engine/test_decode.py): its random
    # stream is
    # not transformers', so the base and adapter outputs are pinned to plain (PEFT) generate by greedy decoding.
    plain = dict(seed=0, do_sample=False, max_new_tokens=16)
    greedy = _texts(_generate(worker, "bg", temperature=0, max_new_tokens=16))
    assert greedy == _plain_generate(tiny_model_dir, None, **plain)
    greedy_a = _texts(_generate(worker, "ag", adapter="a", temperature=0, max_new_tokens=16))
    assert greedy_a == _plain_generate(tiny_model_dir, adapters["a"], **plain) and greedy_a != greedy
    assert _texts(_generate(worker, "bg3", temperature=0, n=3, max_new_tokens=16)) == greedy * 3

    detached = _final(worker, gp.DetachAdapter(id="det-b", name="b"))
    assert detached == gp.Active(id="det-b", adapter=gp.BASE, attached=("a",))
    assert _texts(_generate(worker, "ga3", adapter="a", **sampled)) == _texts(with_a)


def test_adapters_from_a_run_and_its_checkpoints(worker, adapters, tmp_path):
    from finetune_studio.core.store import Store, new_run_id

    home = worker.env["FINETUNE_STUDIO_HOME"]
    run_dir = tmp_path / "run"
    shutil.copytree(adapters["a"], run_dir / "adapter")
    step = run_dir / "checkpoints" / "step-000003"
    shutil.copytree(adapters["b"], step)
    (step / "trainer_state.json").write_text(json.dumps({"step": 3, "consumed": 12, "run_id": "x"}))
    (run_dir / "config.json").write_text("{}")
    run_id = new_run_id()
    store = Store(os.path.join(home, "studio.sqlite3"))
    store.create_run({"model": "tiny"}, run_id=run_id, run_dir=str(run_dir))
    store.close()

    final = _final(worker, gp.AttachAdapter(id="r1", name="run", source=run_id))
    assert (final.path, final.run_id, final.step) == (str(run_dir / "adapter"), run_id, None)
    ckpt = _final(worker, gp.AttachAdapter(id="r2", name="run-3", source=run_id, checkpoint=3))
    assert (ckpt.path, ckpt.step) == (str(step), 3)
    missing = _final(worker, gp.AttachAdapter(id="r3", name="x", source=run_id, checkpoint=9))
    assert missing.type == "error" and missing.kind == "adapter" and "it has: 3" in missing.message
    sampled = dict(n=2, seed=3, temperature=0.8, top_p=0.9, max_new_tokens=16)
    by_folder = _texts(_generate(worker, "rf", adapter="run-3", **sampled))
    assert _final(worker, gp.AttachAdapter(id="r4", name="b-folder", source=str(adapters["b"]))).type == "adapter"
    assert _texts(_generate(worker, "rg", adapter="b-folder", **sampled)) == by_folder


def test_cancel_ends_a_generation_midway(worker):
    request = gp.Generate(id="long", prompt=PROMPT, n=4, temperature=1.0, max_new_tokens=480, stream_every=1)
    seen = []
    for reply in worker.stream(request):
        seen.append(reply)
        if len(seen) == 1:
            worker.send(gp.Cancel(id="c1", target="long"))
    assert isinstance(seen[-1], gp.Generated) and seen[-1].cancelled
    done = [r for r in seen if isinstance(r, gp.Done)]
    assert len(done) == 4
    assert any(d.finish_reason == "cancelled" and d.tokens < 480 for d in done)
    ack = next(worker.replies("c1"))
    assert ack == gp.Cancelled(id="c1", target="long", found=True)
    assert _final(worker, gp.Cancel(id="c2", target="nothing-running")) == gp.Cancelled(
        id="c2", target="nothing-running", found=False
    )
    assert _final(worker, gp.Generate(id="after", prompt=PROMPT, max_new_tokens=4)).type == "generated"


def test_bad_requests_get_errors_and_the_worker_stays_up(worker, tmp_path):
    worker.send_line("this is not json")
    err = next(worker.replies(""))
    assert err.type == "error" and err.kind == "bad_request" and "not JSON" in err.message
    worker.send_line(json.dumps({"v": 1, "id": "u1", "type": "teleport"}))
    err = next(worker.replies("u1"))
    assert err.kind == "bad_request" and "teleport" in err.message
    worker.send_line(json.dumps({"v": 1, "id": "n0", "type": "generate", "prompt": "x", "n": 0}))
    assert "'n'" in next(worker.replies("n0")).message

    unknown = _final(worker, gp.Generate(id="ua", prompt=PROMPT, adapter="nope"))
    assert unknown.kind == "adapter" and "nope" in unknown.message
    assert _final(worker, gp.SetActive(id="us", adapter="nope")).kind == "adapter"
    no_source = _final(worker, gp.AttachAdapter(id="ns", name="z", source=str(tmp_path / "missing")))
    assert no_source.kind == "adapter" and "missing" in no_source.message
    bad_adapter = tmp_path / "bad"
    bad_adapter.mkdir()
    (bad_adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["zz"]}))
    (bad_adapter / "adapter_model.safetensors").write_bytes(b"not safetensors")
    assert _final(worker, gp.AttachAdapter(id="ba", name="z", source=str(bad_adapter))).kind == "adapter"
    from tiny_model import build_tiny_model_dir

    before = _texts(_generate(worker, "pre", adapter="", temperature=0, max_new_tokens=8))
    other = build_adapter_dir(build_tiny_model_dir(tmp_path / "wider", hidden_size=96), tmp_path / "wider-adapter", 5)
    wrong = _final(worker, gp.AttachAdapter(id="wa", name="wider", source=str(other)))
    assert wrong.kind == "adapter" and "does not fit" in wrong.message
    assert _texts(_generate(worker, "post", adapter="", temperature=0, max_new_tokens=8)) == before
    long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 80)
    over = _final(worker, gp.Generate(id="ctx", prompt=long_prompt))
    assert over.kind == "context" and "512" in over.message

    still = _generate(worker, "ok", max_new_tokens=4)
    assert still[-1].type == "generated" and worker.alive


def test_a_model_that_fails_to_load_is_an_error_not_a_crash(worker, tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "model.safetensors").write_bytes(b"\0" * 16)
    err = _final(worker, gp.LoadModel(id="l1", model=str(broken)))
    assert err.type == "error" and err.kind == "model" and "broken" in err.message
    assert _final(worker, gp.Generate(id="g", prompt="hi")).kind == "no_model"  # the old model went first
    err = _final(worker, gp.LoadModel(id="l2", model=str(tmp_path / "nowhere")))
    assert err.kind == "model" and "not found" in err.message
    assert _final(worker, gp.LoadModel(id="l3", model=str(tiny_model_dir))).type == "loaded"
    assert _final(worker, gp.Generate(id="g2", prompt="hi", max_new_tokens=3)).type == "generated"
    assert _final(worker, gp.Unload(id="u")).type == "unloaded"
    assert _final(worker, gp.Generate(id="g3", prompt="hi")).kind == "no_model"
    assert _final(worker, gp.LoadModel(id="l4", model=str(tiny_model_dir))).type == "loaded"


BATCH = ["Hi", PROMPT, "Write a haiku about the sea, then translate it to French."]


def test_a_batch_of_prompts_gives_each_prompts_own_answers(worker, tiny_model_dir, adapters):
    """generate_batch: greedy answers are each prompt's answers alone, with the base and with an adapter; sampled
    ones come from each prompt's own seed; deltas and dones name their prompt and candidate."""
    assert _final(worker, gp.AttachAdapter(id="bt-at", name="a", source=str(adapters["a"]))).type == "adapter"
    for adapter in ("", "a"):
        batch = gp.GenerateBatch(
            id=f"bt-greedy-{adapter}",
            prompts=[gp.BatchPrompt(prompt=p, n=2, seed=i) for i, p in enumerate(BATCH)],
            temperature=0,
            max_new_tokens=12,
            adapter=adapter,
        )
        replies = worker.call(batch)
        final = replies[-1]
        assert isinstance(final, gp.Generated) and final.prompts == 3 and final.candidates == 6, final
        for i, prompt in enumerate(BATCH):
            alone = _texts(
                _generate(
                    worker,
                    f"bt-alone-{adapter}-{i}",
                    prompt=prompt,
                    n=2,
                    seed=i,
                    temperature=0,
                    max_new_tokens=12,
                    adapter=adapter,
                )
            )
            mine = sorted((r for r in replies if isinstance(r, gp.Done) and r.prompt == i), key=lambda r: r.candidate)
            assert [d.text for d in mine] == alone and {d.adapter for d in mine} == {adapter}
    sampled = dict(temperature=0.9, top_k=40, top_p=0.95, max_new_tokens=16)
    prompts = [gp.BatchPrompt(prompt=p, n=n, seed=s) for p, n, s in zip(BATCH, (2, 1, 3), (11, 12, 13), strict=True)]
    replies = worker.call(gp.GenerateBatch(id="bt-sampled", prompts=prompts, stream_every=2, **sampled))
    final = replies[-1]
    assert isinstance(final, gp.Generated) and final.candidates == 6 and not final.cancelled
    dones = [r for r in replies if isinstance(r, gp.Done)]
    assert sorted((d.prompt, d.candidate) for d in dones) == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (2, 2)]
    assert sum(d.tokens for d in dones) == final.new_tokens
    for d in dones:
        deltas = [r for r in replies if isinstance(r, gp.Delta) and (r.prompt, r.candidate) == (d.prompt, d.candidate)]
        assert "".join(x.text for x in deltas) == d.text and d.seed == prompts[d.prompt].seed
    for i, p in enumerate(prompts):
        alone = _texts(_generate(worker, f"bt-s-{i}", prompt=p.prompt, n=p.n, seed=p.seed, **sampled))
        assert sorted((d.candidate, d.text) for d in dones if d.prompt == i) == list(enumerate(alone))
    long_prompt = "hello " * 5000
    too_long = gp.GenerateBatch(id="bt-ctx", prompts=[{"prompt": "hi"}, {"prompt": long_prompt}])
    err = _final(worker, too_long)
    assert err.type == "error" and err.kind == "context" and "prompt 2" in err.message
    assert _final(worker, gp.LoadModel(id="bt-reload", model=str(tiny_model_dir))).type == "loaded"


def test_int8_weights_generate_and_take_adapters(worker, tiny_model_dir, adapters):
    loaded = _final(worker, gp.LoadModel(id="q8", model=str(tiny_model_dir), weights="int8", device="cpu"))
    assert isinstance(loaded, gp.Loaded) and loaded.weights == "int8", loaded
    base = _texts(_generate(worker, "q-base", temperature=0, max_new_tokens=12))
    assert _final(worker, gp.AttachAdapter(id="q-at", name="a", source=str(adapters["a"]))).type == "adapter"
    tuned = _texts(_generate(worker, "q-a", temperature=0, max_new_tokens=12))
    assert base[0] and tuned != base
    assert _texts(_generate(worker, "q-base2", adapter="", temperature=0, max_new_tokens=12)) == base
    assert _final(worker, gp.LoadModel(id="full-again", model=str(tiny_model_dir))).type == "loaded"


def test_int4_weights_generate_and_take_adapters(worker, tiny_model_dir, adapters):
    loaded = _final(worker, gp.LoadModel(id="q4", model=str(tiny_model_dir), weights="int4", device="cpu"))
    assert isinstance(loaded, gp.Loaded) and loaded.weights == "int4", loaded
    base = _texts(_generate(worker, "q4-base", temperature=0, max_new_tokens=12))
    assert _final(worker, gp.AttachAdapter(id="q4-at", name="a", source=str(adapters["a"]))).type == "adapter"
    tuned = _texts(_generate(worker, "q4-a", temperature=0, max_new_tokens=12))
    assert base[0] and tuned != base
    assert _texts(_generate(worker, "q4-base2", adapter="", temperature=0, max_new_tokens=12)) == base
    assert _final(worker, gp.LoadModel(id="full-again4", model=str(tiny_model_dir))).type == "loaded"


def test_a_killed_worker_is_seen_at_once_and_a_new_one_answers(tiny_model_dir):
    with GenerationClient(threads=1) as client:
        first = client.start()
        replies = client.stream(gp.LoadModel(id="l", model=str(tiny_model_dir)))  # takes seconds: still pending
        os.kill(first.pid, signal.SIGKILL)
        with pytest.raises(WorkerDied):
            next(replies)
        assert not client.alive
        second = client.call(gp.Generate(id="g", prompt=PROMPT))  # starts a new worker, which answers
        assert client.ready.pid != first.pid
        assert second[-1].type == "error" and second[-1].kind == "no_model"
