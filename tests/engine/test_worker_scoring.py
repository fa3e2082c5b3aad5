"""The generation worker's score request, through the real worker process: a reward model's scores, and a DPO
adapter's implicit reward against its base."""

from __future__ import annotations

import pytest
import torch
from reward_helpers import MARK, train_reward_model
from tiny_model import build_adapter_dir

from finetune_studio.core.protocol import generation as gp
from finetune_studio.core.protocol.generation_client import GenerationClient, RequestFailed
from finetune_studio.engine import reward_model as rm

PROMPT = "Say something about item 7."
CANDIDATES = (f"quick {MARK} dog", "quick brown dog", f"the sea and the {MARK}", "")


@pytest.fixture(scope="module")
def reward_folder(tiny_model_dir, tmp_path_factory):
    result, _events, _config = train_reward_model(tiny_model_dir, tmp_path_factory.mktemp("reward"), max_steps=20)
    return result.adapter_dir


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """'zero': a fresh LoRA adapter (B = 0: the model is its base); 'random': one that changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    zero = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    zero.save_pretrained(str(root / "zero"))
    return {"zero": root / "zero", "random": build_adapter_dir(tiny_model_dir, root / "random", seed=1)}


@pytest.fixture(scope="module")
def worker(tiny_model_dir, tmp_path_factory, adapters):
    client = GenerationClient(env={"FINETUNE_STUDIO_HOME": str(tmp_path_factory.mktemp("home"))}, threads=1)
    client.start()
    assert isinstance(client.call(gp.LoadModel(id="load", model=str(tiny_model_dir)))[-1], gp.Loaded)
    for name, folder in adapters.items():
        assert isinstance(
            client.call(gp.AttachAdapter(id=f"a-{name}", name=name, source=str(folder)))[-1], gp.AdapterAttached
        )
    yield client
    client.close()


def test_the_worker_scores_with_a_reward_model(worker, reward_folder):
    reply = worker.score(gp.Score(id="s1", prompt=PROMPT, candidates=CANDIDATES, reward_model=str(reward_folder)))
    assert reply.scorer == "reward_model" and reply.source == str(reward_folder.resolve())
    expected = rm.RewardModel.load(reward_folder).score([PROMPT] * len(CANDIDATES), list(CANDIDATES))
    assert list(reply.scores) == pytest.approx(expected, abs=1e-4)
    assert reply.scores[0] > reply.scores[1] and reply.scores[2] > reply.scores[1]  # the learnt preference
    again = worker.score(gp.Score(id="s2", prompt=PROMPT, candidates=CANDIDATES[:2], reward_model=str(reward_folder)))
    assert list(again.scores) == pytest.approx(list(reply.scores[:2]), abs=1e-5)  # the kept model, same answers


def test_implicit_dpo_is_zero_for_an_adapter_equal_to_its_base(worker):
    reply = worker.score(gp.Score(id="z", prompt=PROMPT, candidates=CANDIDATES, scorer="implicit_dpo", adapter="zero"))
    assert reply.scores == (0.0,) * len(CANDIDATES)


def test_implicit_dpo_is_beta_times_the_answers_log_ratio(worker, tiny_model_dir, adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    beta = 0.25
    req = gp.Score(id="r", prompt=PROMPT, candidates=CANDIDATES[:3], scorer="implicit_dpo", adapter="random", beta=beta)
    scores = worker.score(req).scores
    # directly: the chat-rendered prompt, then each answer's tokens' log-probs with and without the adapter
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32), str(adapters["random"])
    ).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    expected = []
    for answer in CANDIDATES[:3]:
        full = tok.apply_chat_template(
            [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": answer}], tokenize=False
        )
        ids = tok(full, add_special_tokens=False, return_tensors="pt")["input_ids"]
        start = len(tok(prompt, add_special_tokens=False)["input_ids"])

        def answer_logp(m, ids=ids, start=start) -> float:
            with torch.no_grad():
                logps = torch.log_softmax(m(input_ids=ids).logits[0, :-1].float(), -1)
            return logps[torch.arange(start - 1, ids.shape[1] - 1), ids[0, start:]].sum().item()

        policy = answer_logp(model)
        with model.disable_adapter():
            reference = answer_logp(model)
        expected.append(beta * (policy - reference))
    assert list(scores) == pytest.approx(expected, abs=1e-4)
    assert any(abs(s) > 1e-2 for s in scores)  # the adapter does change the model


def test_score_requests_that_cannot_be_served_are_errors(worker, adapters, tmp_path):
    with pytest.raises(RequestFailed, match="not a reward model"):
        worker.score(gp.Score(id="e1", prompt=PROMPT, candidates=("a",), reward_model=str(adapters["random"])))
    with pytest.raises(RequestFailed, match="no adapter or run"):
        worker.score(gp.Score(id="e2", prompt=PROMPT, candidates=("a",), reward_model=str(tmp_path / "none")))
    with pytest.raises(RequestFailed, match="unknown adapter 'dpo'"):
        worker.score(gp.Score(id="e3", prompt=PROMPT, candidates=("a",), scorer="implicit_dpo", adapter="dpo"))
    with pytest.raises(RequestFailed, match="both are the base model"):
        worker.score(gp.Score(id="e4", prompt=PROMPT, candidates=("a",), scorer="implicit_dpo", adapter=""))
    final = worker.call(gp.Generate(id="g", prompt=PROMPT, max_new_tokens=4, temperature=0))[-1]
    assert isinstance(final, gp.Generated)  # the worker is still up and generates
