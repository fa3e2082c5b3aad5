"""The bundled default model: converted once from its GGUF, then a few real training steps."""

import json

import pytest
from engine_helpers import Recorder

from finetune_studio.engine.models import describe, resolve_model
from finetune_studio.engine.train.recipe import train_run
from finetune_studio.engine.train.reporting import Reporter


@pytest.mark.slow
def test_default_model_converts_once_and_trains(tmp_path):
    seen = []
    folder = resolve_model("default", progress=lambda *a: seen.append(a))
    assert [s[1] for s in seen] == [0, 1, 2, 3, 4]  # conversion reported its progress
    assert resolve_model("default") == folder  # converted once, reused
    info = describe(folder)
    assert (info.architecture, info.layers, info.hidden_size, info.vocab_size) == ("LlamaForCausalLM", 30, 576, 49152)
    assert info.parameters == 134_515_008
    assert json.loads((folder / "config.json").read_text()).get("quantization_config") is None

    data = tmp_path / "d.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"Reply with the word {w}."}, {"role": "assistant", "content": w}]}
        for w in ("apple", "river", "stone", "cloud")
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    rec = Recorder()
    from finetune_studio.core.config import TrainConfig

    result = train_run(
        TrainConfig(
            dataset=str(data),
            max_steps=3,
            batch_size=2,
            max_length=96,
            lora_rank=4,
            learning_rate=1e-3,
            validation_fraction=0.0,
            eval_every=0,
        ),
        reporter=Reporter(extra=rec),
    )
    assert result.status == "completed"
    losses = rec.losses
    # A real instruct model already predicts these short answers well (a random one would start near ln(49152) = 10.8).
    assert 0 < losses[0] < 6
    assert all(loss == loss for loss in losses)
