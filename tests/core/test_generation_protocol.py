"""The generation worker's protocol (core/protocol/generation.py): round trips, validation, and parse errors."""

import json

import pytest

from finetune_studio.core.protocol import generation as gp


def test_every_request_round_trips():
    requests = [
        gp.LoadModel(id="1", model="default", dtype="float32", weights="int8"),
        gp.AttachAdapter(id="2", name="sft", source="20260101-000000-abcdef", checkpoint=50),
        gp.SetActive(id="3", adapter=gp.BASE),
        gp.DetachAdapter(id="4", name="sft"),
        gp.Generate(id="5", messages=[{"role": "user", "content": "hi"}], n=4, seed=1, stop=["\n\n"], adapter=""),
        gp.Generate(id="6", prompt="Once upon", raw=True, temperature=0),
        gp.Cancel(id="7", target="5"),
        gp.Unload(id="8"),
        gp.Shutdown(id="9"),
        gp.LoadModel(id="10", model="default", weights="int4"),
        gp.GenerateBatch(
            id="11",
            prompts=[{"prompt": "Hi", "n": 2, "seed": 4}, {"messages": [{"role": "user", "content": "Yo"}]}],
            temperature=0,
            stop=["\n"],
            adapter="sft",
        ),
    ]
    for req in requests:
        line = req.to_json()
        assert json.loads(line)["v"] == gp.PROTOCOL_VERSION
        assert gp.parse_request(line) == req
    assert requests[4].messages == (gp.ChatTurn(role="user", content="hi"),) and requests[4].stop == ("\n\n",)
    assert requests[5].greedy
    batch = requests[10]
    assert batch.prompts == (
        gp.BatchPrompt(prompt="Hi", n=2, seed=4),
        gp.BatchPrompt(messages=(gp.ChatTurn(role="user", content="Yo"),)),
    )
    assert batch.greedy and batch.stop == ("\n",)


def test_every_reply_round_trips():
    replies = [
        gp.Ready(id="", pid=12, device="cuda", threads=4),
        gp.Loaded(id="1", model="default", path="/m", device="cpu", dtype="float32", context_length=8192),
        gp.AdapterAttached(id="2", name="sft", path="/r/adapter", run_id="r", step=None, base_model="/m"),
        gp.Active(id="3", adapter="sft", attached=("sft", "dpo")),
        gp.Delta(id="5", candidate=2, text="Hé", tokens=4),
        gp.Delta(id="11", candidate=1, text="x", tokens=4, prompt=1),
        gp.Done(id="11", candidate=0, text="y", tokens=3, prompt=1, seed=9),
        gp.Generated(id="11", candidates=3, prompt_tokens=20, new_tokens=9, prompts=2),
        gp.Done(id="5", candidate=2, text="Hé!", tokens=5, finish_reason="length", elapsed_s=0.5, adapter="sft"),
        gp.Generated(id="5", candidates=4, prompt_tokens=10, new_tokens=20, elapsed_s=1.0, tokens_per_s=20.0),
        gp.Scores(id="12", scores=(0.5, -1.25), scorer="reward_model", source="/r/adapter", elapsed_s=0.1),
        gp.Cancelled(id="7", target="5", found=True),
        gp.Unloaded(id="8"),
        gp.Bye(id="9"),
        gp.Error(id="x", message="unknown adapter 'z'", kind="adapter"),
    ]
    for reply in replies:
        assert gp.parse_reply(reply.to_json()) == reply
    finals = {r.type for r in replies if gp.is_final(r)}
    assert finals == {"loaded", "adapter", "active", "generated", "scores", "cancelled", "unloaded", "bye", "error"}
    assert set(gp.REPLY_TYPES) - finals == {"ready", "delta", "done"}


@pytest.mark.parametrize(
    "body, words",
    [
        ({"type": "generate", "prompt": "x", "n": 0}, "'n'"),
        ({"type": "generate", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "either"),
        ({"type": "generate"}, "either"),
        ({"type": "generate", "prompt": "x", "top_p": 0}, "top_p"),
        ({"type": "generate", "prompt": "x", "temperature": -1}, "temperature"),
        ({"type": "generate", "prompt": "x", "stop": [""]}, "stop"),
        ({"type": "generate", "messages": [{"role": "user"}]}, "content"),
        ({"type": "attach", "name": "a"}, "source"),
        ({"type": "load", "weights": "int2"}, "weights"),
        ({"type": "fly"}, "unknown request type"),
        ({"type": "generate_batch"}, "prompts"),
        ({"type": "generate_batch", "prompts": []}, "prompts"),
        ({"type": "generate_batch", "prompts": ["hi"]}, "each prompt"),
        ({"type": "generate_batch", "prompts": [{"prompt": "x"}, {}]}, "either"),
        ({"type": "generate_batch", "prompts": [{"prompt": "x", "n": 65}]}, "'n'"),
        ({"type": "generate_batch", "prompts": [{"prompt": "x", "seed": -1}]}, "seed"),
        ({"type": "generate_batch", "prompts": [{"prompt": "x", "n": 64}] * 5}, "at most 256"),
        ({"type": "generate_batch", "prompts": [{"prompt": "x"}] * 65}, "at most 64 prompts"),
        ({"type": "generate_batch", "prompts": [{"prompt": "x"}], "top_p": 2}, "top_p"),
        ({"type": "generate", "prompt": "x", "seed": 2**70}, "seed"),
        ({"type": "generate", "prompt": "x", "temperature": float("inf")}, "temperature"),
        ({"type": "generate", "prompt": "x", "temperature": 10**400}, "temperature"),
        ({"type": "generate", "prompt": "x", "max_new_tokens": 10**30}, "max_new_tokens"),
        ({"type": "generate_batch", "prompts": [{"prompt": "x", "seed": 2**32}]}, "seed"),
    ],
)
def test_invalid_requests_name_the_problem(body, words):
    with pytest.raises(gp.ProtocolError, match=words):
        gp.parse_request(json.dumps({"v": 1, "id": "r", **body}))


def test_lines_that_are_not_requests():
    for line, words in [("nope", "not JSON"), ("[1]", "not a JSON object"), ('{"v": 2, "id": "a"}', "version")]:
        with pytest.raises(gp.ProtocolError, match=words):
            gp.parse_request(line)
    with pytest.raises(gp.ProtocolError, match="id"):
        gp.parse_request('{"v": 1, "type": "unload"}')
    assert gp.request_id_of('{"v": 1, "id": "q7", "type": "fly"}') == "q7"
    assert gp.request_id_of("nope") == ""


def test_lines_json_cannot_read_are_protocol_errors_and_keep_their_id():
    """json.loads raises ValueError for an integer past Python's digit limit and RecursionError for deep nesting:
    both must reach the worker as a ProtocolError (its reader answers those), with the line's id when it has one."""
    digits = '{"v":1,"id":"d1","type":"generate","prompt":"x","seed":' + "9" * 5000 + "}"
    deep = '{"v":1,"id":"d2","type":"generate","prompt":"x","x":' + "[" * 10**6 + "]" * 10**6 + "}"
    for line, rid in [(digits, "d1"), (deep, "d2"), ("[" * 10**6, "")]:
        with pytest.raises(gp.ProtocolError, match="unreadable JSON"):
            gp.parse_request(line)
        assert gp.request_id_of(line) == rid
    cut = '{"v":1,"type":"generate","id":"g\\"7","prompt":"abc'  # a line cut short keeps its id
    assert gp.request_id_of(cut) == 'g"7'
    assert gp.request_id_of('{"v":1,"type":"generate","prompt":"say \\"id\\": \\"no\\"') == ""


def test_a_reply_from_before_generate_batch_reads_as_prompt_0():
    """Version 1 grew by addition: a delta or done without 'prompt' (a generate's, or an older worker's) is prompt 0,
    and a reader ignores fields it does not know (a newer worker's extras)."""
    done = gp.parse_reply('{"v":1,"type":"done","id":"g","candidate":1,"text":"a","future":true}')
    assert isinstance(done, gp.Done) and done.prompt == 0 and done.candidate == 1
    generated = gp.parse_reply('{"v":1,"type":"generated","id":"g","candidates":2}')
    assert isinstance(generated, gp.Generated) and generated.prompts == 1
