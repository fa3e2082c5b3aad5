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
    ]
    for req in requests:
        line = req.to_json()
        assert json.loads(line)["v"] == gp.PROTOCOL_VERSION
        assert gp.parse_request(line) == req
    assert requests[4].messages == (gp.ChatTurn(role="user", content="hi"),) and requests[4].stop == ("\n\n",)
    assert requests[5].greedy


def test_every_reply_round_trips():
    replies = [
        gp.Ready(id="", pid=12, device="cuda", threads=4),
        gp.Loaded(id="1", model="default", path="/m", device="cpu", dtype="float32", context_length=8192),
        gp.AdapterAttached(id="2", name="sft", path="/r/adapter", run_id="r", step=None, base_model="/m"),
        gp.Active(id="3", adapter="sft", attached=("sft", "dpo")),
        gp.Delta(id="5", candidate=2, text="Hé", tokens=4),
        gp.Done(id="5", candidate=2, text="Hé!", tokens=5, finish_reason="length", elapsed_s=0.5, adapter="sft"),
        gp.Generated(id="5", candidates=4, prompt_tokens=10, new_tokens=20, elapsed_s=1.0, tokens_per_s=20.0),
        gp.Cancelled(id="7", target="5", found=True),
        gp.Unloaded(id="8"),
        gp.Bye(id="9"),
        gp.Error(id="x", message="unknown adapter 'z'", kind="adapter"),
    ]
    for reply in replies:
        assert gp.parse_reply(reply.to_json()) == reply
    finals = {r.type for r in replies if gp.is_final(r)}
    assert finals == {"loaded", "adapter", "active", "generated", "cancelled", "unloaded", "bye", "error"}
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
