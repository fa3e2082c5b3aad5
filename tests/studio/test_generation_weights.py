"""The weights options offered for generation (studio.state.generation_weights): each with its measured cost on the
bundled model, the default the fastest one that keeps the answers, and full precision for a model not measured."""

from finetune_studio.core.protocol.generation import WEIGHTS, LoadModel
from finetune_studio.studio.state import generation_weights as gw


def test_every_option_is_offered_with_what_it_costs_on_the_bundled_model():
    for model in ("default", "/home/me/.local/share/finetune-studio/models/smollm2-135m-instruct"):
        options = gw.weights_options(model)
        assert [o.weights for o in options] == list(WEIGHTS)
        measured = gw.figures(model)
        assert set(measured) == set(WEIGHTS)
        for option in options:
            LoadModel(id="l", weights=option.weights)  # each one a value the worker takes
            assert f"{measured[option.weights].session_s:.0f} s" in option.detail
        recommended = [o.weights for o in options if "recommended" in o.label]
        assert recommended == [gw.default_weights(model)]


def test_the_default_is_the_fastest_option_that_keeps_the_answers():
    measured = gw.figures("default")
    chosen = gw.default_weights("default")
    assert measured[chosen].top1 >= gw.KEEPS_ANSWERS
    faster = [w for w, f in measured.items() if f.speedup > measured[chosen].speedup]
    assert all(measured[w].top1 < gw.KEEPS_ANSWERS for w in faster)


def test_a_model_not_measured_defaults_to_full_precision_and_says_so():
    assert gw.figures("/models/my-own-llama") == {}
    assert gw.default_weights("/models/my-own-llama") == "full"
    options = {o.weights: o for o in gw.weights_options("/models/my-own-llama")}
    assert "not measured" in options["int4"].detail and "not measured" in options["int8"].detail
    assert options["full"].label == "Full precision (recommended)"
