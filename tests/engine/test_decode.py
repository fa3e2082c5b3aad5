"""The worker's decode loop (engine.decoding.decode) on the tiny Llama: greedy equals transformers' generate, the fast
step
gives the model's own logits, every sampled token is one the filters keep given the plain model's logits, ended
candidates leave the batch without disturbing the others, cancel stops it."""

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from finetune_studio.engine.decoding.decode import _expand_cache, _fast_step, decode, decode_batch
from finetune_studio.engine.decoding.int4 import quantize_linears_int4
from finetune_studio.engine.decoding.int8 import quantize_linears_int8
from finetune_studio.engine.decoding.native_step import use_native_step
from finetune_studio.engine.decoding.token_sampling import Sampler

PROMPT = [5, 17, 42, 99, 7, 3, 250, 11, 60, 61]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


def _run(model, n, max_new, sampler, seed=0, end_at=None, fast_path=True, cancel=None):
    """Each candidate's tokens; ``end_at``: {candidate: step} ends that candidate after that many tokens."""
    seen: list[list[int]] = [[] for _ in range(n)]
    ended = [False] * n

    def on_tokens(tokens):
        for i, t in enumerate(tokens):
            if not ended[i]:
                seen[i].append(t)
                ended[i] = bool(end_at) and end_at.get(i) == len(seen[i])
        return ended

    steps = decode(model, PROMPT, n, max_new, sampler, on_tokens, seed, cancel, fast_path=fast_path)
    return seen, steps


def test_greedy_is_transformers_greedy_generate(model):
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        plain = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24)
    expected = plain[0, len(PROMPT) :].tolist()
    for fast in (True, False):
        seen, steps = _run(model, 2, 24, Sampler(temperature=0), fast_path=fast)
        assert seen == [expected, expected] and steps == 24


def test_the_fast_step_gives_the_models_own_logits(model, tiny_model_dir):
    int8 = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    quantize_linears_int8(int8)  # q/k/v and gate/up stacked into one int8 matmul each in the fast step
    int4 = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    quantize_linears_int4(int4)  # the same with int4 stacks (and an int8 head)
    for m in (model, int8, int4):
        with torch.inference_mode():
            out = m(input_ids=torch.tensor([PROMPT]), cache=DynamicCache(config=m.config), use_cache=True)
            fast_cache = _expand_cache(out.cache, 3, 40)
            step = _fast_step(m, fast_cache)
            assert step is not None
            reference = DynamicCache(config=m.config)
            m(input_ids=torch.tensor([PROMPT] * 3), cache=reference, use_cache=True)
            for t in range(5):
                nxt = torch.tensor([[t + 1], [t + 20], [t + 40]])
                ours = step(nxt)
                theirs = m(input_ids=nxt, cache=reference, use_cache=True).logits[:, -1, :]
                tol = 1e-4 if m is int8 else 1e-5  # int8: the step in C, its sums in another order, requantised
                assert torch.allclose(ours, theirs, atol=tol, rtol=tol)


def test_sampled_tokens_are_kept_by_the_filters_on_the_plain_models_logits(model):
    sampler = Sampler(temperature=0.9, top_k=40, top_p=0.9)
    seen, _ = _run(model, 4, 12, sampler, seed=5, end_at={1: 3})  # candidate 1 leaves the batch after 3 tokens
    assert [len(s) for s in seen] == [12, 3, 12, 12]
    assert len({tuple(s) for s in seen}) > 1
    for tokens in seen:  # teacher forcing: the plain model's logits at each position, filtered like the worker's
        ids = torch.tensor([PROMPT + tokens])
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, len(PROMPT) - 1 : -1]  # (len(tokens), vocab)
        allowed = sampler.mask(logits)
        assert allowed[torch.arange(len(tokens)), torch.tensor(tokens)].all()
    again, _ = _run(model, 4, 12, sampler, seed=5, end_at={1: 3})
    assert again == seen  # one seed, one set of candidates
    generic, _ = _run(model, 4, 12, sampler, seed=5, end_at={1: 3}, fast_path=False)
    assert generic == seen  # the fast step and the model's forward give the same draws


def test_cancel_stops_the_loop(model):
    cancel = threading.Event()
    seen: list[int] = []

    def on_tokens(tokens):
        seen.append(tokens[0])
        if len(seen) == 3:
            cancel.set()
        return [False, False]

    steps = decode(model, PROMPT, 2, 50, Sampler(1.0), on_tokens, 0, cancel)
    assert steps == 3 and len(seen) == 3


PROMPTS = [PROMPT, [9, 8, 7], PROMPT[:6] + [77, 78, 79, 80, 81, 82, 83], [300, 4]]  # 10, 3, 13 and 2 tokens


def _run_batch(model, prompts, ns, max_new, sampler, seeds, end_at=None, fast_path=True):
    """Each prompt's candidates' tokens from one decode_batch; ``end_at``: {(prompt, candidate): tokens}."""
    seen = [[[] for _ in range(n)] for n in ns]
    ended = [[False] * n for n in ns]

    def handler(p):
        def on_tokens(tokens):
            assert len(tokens) == ns[p]
            for i, t in enumerate(tokens):
                if not ended[p][i]:
                    seen[p][i].append(t)
                    ended[p][i] = bool(end_at) and end_at.get((p, i)) == len(seen[p][i])
            return ended[p]

        return on_tokens

    handlers = [handler(p) for p in range(len(prompts))]
    decode_batch(model, prompts, ns, max_new, sampler, handlers, seeds, fast_path=fast_path)
    return seen


@pytest.mark.parametrize("weights", ["full", "int8", "int4"])
def test_greedy_answers_of_a_batch_of_prompts_are_each_prompt_decoded_alone(model, tiny_model_dir, weights):
    m = model
    if weights != "full":
        m = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
        (quantize_linears_int8 if weights == "int8" else quantize_linears_int4)(m)
    greedy = Sampler(temperature=0)
    max_new = [20, 14, 20, 9]
    alone = [_run_batch(m, [p], [2], [k], greedy, [0])[0] for p, k in zip(PROMPTS, max_new, strict=True)]
    for fast in (True, False):
        batch = _run_batch(m, PROMPTS, [2, 2, 2, 2], max_new, greedy, [0, 1, 2, 3], fast_path=fast)
        assert batch == alone
    assert [len(a[0]) for a in alone] == max_new and len({tuple(a[0]) for a in alone}) == 4


def test_a_batch_of_prompts_samples_each_prompts_own_stream(model):
    """Each prompt draws from its own seed as if alone (the same numbers per step); the answers match the prompt
    decoded alone here (the batch's logits differ from those alone by rounding only), ended candidates leave the
    batch without disturbing the others, and every token is one the filters keep."""
    sampler = Sampler(temperature=0.9, top_k=40, top_p=0.9)
    ns, seeds, max_new = [3, 1, 2, 2], [5, 6, 7, 5], [12, 12, 8, 12]
    end_at = {(0, 1): 3, (2, 0): 1}
    batch = _run_batch(model, PROMPTS, ns, max_new, sampler, seeds, end_at)
    alone = [
        _run_batch(model, [p], [n], [k], sampler, [s], {(0, c): t for (q, c), t in end_at.items() if q == i})[0]
        for i, (p, n, s, k) in enumerate(zip(PROMPTS, ns, seeds, max_new, strict=True))
    ]
    assert batch == alone
    assert [[len(c) for c in p] for p in batch] == [[12, 3, 12], [12], [1, 8], [12, 12]]
    assert batch[0][0] != batch[3][0]  # same seed, other prompt: other answers
    assert _run_batch(model, PROMPTS, ns, max_new, sampler, seeds, end_at, fast_path=False) == batch
    for p, answers in zip(PROMPTS, batch, strict=True):
        for tokens in answers:
            ids = torch.tensor([p + tokens])
            with torch.inference_mode():
                logits = model(input_ids=ids).logits[0, len(p) - 1 : -1]
            assert sampler.mask(logits)[torch.arange(len(tokens)), torch.tensor(tokens)].all()


def test_prompt_lookup_drafts_the_tokens_after_the_latest_earlier_occurrence():
    from finetune_studio.engine.decoding.decode import draft_tokens

    history = [1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 2, 3]
    assert draft_tokens(history, 4) == [5, 6, 7, 2]  # "2 3" last seen before 5 6 7 (3-gram "x 2 3" never repeats)
    assert draft_tokens(history, 2) == [5, 6]
    assert draft_tokens([1, 2, 3, 1, 2, 3, 8, 1, 2, 3], 3) == [8, 1, 2]  # the 3-gram, its latest occurrence
    assert draft_tokens([1, 2, 3, 4], 4) == [] and draft_tokens([5, 5], 0) == []


@pytest.mark.parametrize("weights", ["full", "int8"])
def test_greedy_with_drafted_tokens_gives_the_same_answer_in_fewer_forwards(tiny_model_dir, weights):
    m = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    if weights == "int8":
        quantize_linears_int8(m)
    forwards = []
    m.lm_head.register_forward_hook(lambda module, args, out: forwards.append(args[0].shape[1]))
    prompt = PROMPT * 3  # a prompt that repeats itself: the lookup finds drafts in it
    answers = {}
    native = use_native_step(False)  # drafting runs the Python step (its head's forwards are counted): both sides
    for draft in (0, 4):
        seen: list[int] = []

        def on_tokens(tokens, seen=seen):
            seen.append(tokens[0])
            return [False, False]

        forwards.clear()
        steps = decode(m, prompt, 2, 40, Sampler(temperature=0), on_tokens, draft=draft)
        answers[draft] = (seen, steps, len(forwards), max(forwards))
    use_native_step(native)
    plain, drafted = answers[0], answers[4]
    assert drafted[0] == plain[0] and drafted[1] == plain[1] == 40  # the same 40 tokens
    assert plain[2] == 40 and plain[3] == 1  # the prefill (its last position), then one position per forward
    assert drafted[3] > 1 and drafted[2] < plain[2]  # several positions checked at once: fewer forwards
