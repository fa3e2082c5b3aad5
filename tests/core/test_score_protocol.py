"""The generation worker's score request and its reply (core/protocol/generation.py): round trips and refusals."""

import json

import pytest

from finetune_studio.core.protocol import generation as gp


def test_score_requests_round_trip():
    requests = [
        gp.Score(id="s1", prompt="Name a colour", candidates=["red", "a colour"], reward_model="/runs/r/adapter"),
        gp.Score(
            id="s2",
            messages=[{"role": "user", "content": "hi"}],
            candidates=("hello",),
            scorer="implicit_dpo",
            adapter="dpo",
            reference="sft",
            beta=0.5,
        ),
    ]
    for req in requests:
        line = req.to_json()
        assert json.loads(line)["type"] == "score"
        assert gp.parse_request(line) == req
    assert requests[0].candidates == ("red", "a colour") and requests[0].adapter is None
    assert requests[1].messages == (gp.ChatTurn(role="user", content="hi"),) and requests[1].reference == "sft"


def test_scores_reply_round_trips_and_ends_the_request():
    reply = gp.Scores(id="s1", scores=(1.5, -0.25), scorer="implicit_dpo", source="dpo against base", elapsed_s=0.2)
    back = gp.parse_reply(reply.to_json())
    assert back == reply and gp.is_final(back)
    assert isinstance(back, gp.Scores) and back.scores == (1.5, -0.25)


@pytest.mark.parametrize(
    "body, words",
    [
        ({"candidates": ["a"], "reward_model": "x"}, "either"),
        ({"prompt": "p", "messages": [{"role": "user", "content": "q"}], "candidates": ["a"]}, "either"),
        ({"prompt": "p", "candidates": [], "reward_model": "x"}, "from 1 to 256"),
        ({"prompt": "p", "candidates": ["a"] * 257, "reward_model": "x"}, "from 1 to 256"),
        ({"prompt": "p", "candidates": [1], "reward_model": "x"}, "candidates"),
        ({"prompt": "p", "candidates": "abc", "reward_model": "x"}, "candidates"),
        ({"prompt": "p", "candidates": ["a"]}, "needs 'reward_model'"),
        ({"prompt": "p", "candidates": ["a"], "scorer": "vibes"}, "scorer"),
        ({"prompt": "p", "candidates": ["a"], "scorer": "implicit_dpo", "beta": 0}, "beta"),
        ({"prompt": "p", "candidates": ["a"], "scorer": "implicit_dpo", "beta": float("inf")}, "beta"),
        ({"prompt": "p", "candidates": ["a"], "scorer": "implicit_dpo", "adapter": 3}, "adapter"),
    ],
)
def test_bad_score_requests_name_the_problem(body, words):
    with pytest.raises(gp.ProtocolError, match=words):
        gp.parse_request(json.dumps({"v": 1, "id": "r", "type": "score", **body}))
