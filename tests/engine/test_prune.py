"""Pruning: a smaller model made by dropping decoder layers (and narrowing the MLP), saved as an ordinary folder."""

from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import write_sft
from tiny_model import build_tiny_model_dir

from finetune_studio.core.config import ConfigError
from finetune_studio.engine.train.prune import RECORD, parse_layers, prune


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("four") / "m", seed=3, layers=4)


def layer_io(model, ids):
    """Each decoder layer's input hidden states and output, for ``ids``."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [
        layer.register_forward_hook(
            lambda _m, args, out: seen.append((args[0].clone(), out[0] if isinstance(out, tuple) else out))
        )
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return seen


def test_a_pruned_model_loads_in_transformers_and_equals_the_source_on_the_kept_layers_inputs(four_layers, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = prune(four_layers, tmp_path / "pruned", keep=[0, 2, 3])
    source = AutoModelForCausalLM.from_pretrained(four_layers).eval()
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert pruned.config.num_hidden_layers == 3 and len(pruned.model.layers) == 3
    assert result.kept_layers == [0, 2, 3] and result.params_after < result.params_before
    assert result.params_after == sum(p.numel() for p in pruned.parameters())
    assert json.loads((tmp_path / "pruned" / RECORD).read_text())["kept_layers"] == [0, 2, 3]
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "pruned").get_vocab()
        == AutoTokenizer.from_pretrained(four_layers).get_vocab()
    )

    ids = torch.randint(3, source.config.vocab_size, (2, 11))
    full = layer_io(source, ids)
    # pruned layer j is source layer keep[j]: the same output for the same input
    for j, i in enumerate([0, 2, 3]):
        x = full[i][0]
        positions = torch.arange(x.shape[1])[None].expand(2, -1)
        rope = pruned.model.rotary_emb(x, positions)
        with torch.no_grad():
            got = pruned.model.layers[j](x, position_embeddings=rope, attention_mask=None, position_ids=positions)
            want = source.model.layers[i](x, position_embeddings=rope, attention_mask=None, position_ids=positions)
        got = got[0] if isinstance(got, tuple) else got
        want = want[0] if isinstance(want, tuple) else want
        assert torch.equal(got, want)
    # end to end: the pruned model is the source with layer 1 skipped (its input goes straight to layer 2)
    kept = layer_io(pruned, ids)
    assert torch.allclose(kept[0][0], full[0][0]) and torch.allclose(kept[1][0], full[0][1], atol=1e-6)


def test_keeping_every_layer_changes_nothing(four_layers, tmp_path):
    from transformers import AutoModelForCausalLM

    prune(four_layers, tmp_path / "same", keep=[0, 1, 2, 3])
    ids = torch.randint(3, 300, (1, 9))
    a = AutoModelForCausalLM.from_pretrained(four_layers).eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "same").eval()
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


@pytest.mark.parametrize("measure", ["kl", "hidden"])
def test_measured_drop_removes_the_least_missed_layers(four_layers, tmp_path, measure):
    """Greedy: round one drops the layer whose absence alone changes the outputs least (checked against every
    one-layer-less model measured by the one-shot search); the result keeps the rest in order."""
    data = write_sft(tmp_path / "d.jsonl", n=12)
    greedy = prune(four_layers, tmp_path / "g", drop=2, measure_on=data, measure=measure, examples=8)
    once = prune(four_layers, tmp_path / "o", drop=3, measure_on=data, measure=measure, examples=8, search="once")
    assert greedy.measure == measure and len(greedy.rounds) == 2
    assert greedy.kept_layers == sorted(set(range(4)) - {r["dropped"] for r in greedy.rounds})
    alone = {r["dropped"]: r["change"] for r in once.rounds}  # the three least missed layers, each measured alone
    first = greedy.rounds[0]
    assert first["dropped"] == min(alone, key=alone.get)
    assert first["change"] == pytest.approx(alone[first["dropped"]], rel=1e-6)
    assert all(r["change"] >= 0 for r in greedy.rounds)
    assert greedy.rounds[1]["change"] >= first["change"]  # two layers gone change the outputs more than one


def test_mlp_narrowing_keeps_the_strongest_channels(four_layers, tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_sft(tmp_path / "d.jsonl", n=8)
    result = prune(four_layers, tmp_path / "narrow", keep=[0, 1, 2, 3], mlp_width=96, measure_on=data)
    narrow = AutoModelForCausalLM.from_pretrained(tmp_path / "narrow").eval()
    source = AutoModelForCausalLM.from_pretrained(four_layers).eval()
    assert result.intermediate_before == 128 and result.intermediate_after == 96
    assert narrow.config.intermediate_size == 96
    mlp, src = narrow.model.layers[1].mlp, source.model.layers[1].mlp
    assert mlp.gate_proj.weight.shape == (96, 64) and mlp.down_proj.weight.shape == (64, 96)
    # the kept channels are source channels, gate/up rows and down columns alike
    rows = [int((src.gate_proj.weight == r).all(dim=1).nonzero()[0]) for r in mlp.gate_proj.weight]
    assert rows == sorted(rows) and len(set(rows)) == 96
    assert torch.equal(mlp.up_proj.weight, src.up_proj.weight[rows])
    assert torch.equal(mlp.down_proj.weight, src.down_proj.weight[:, rows])
    ids = torch.randint(3, 300, (1, 9))
    with torch.no_grad():
        out = narrow(input_ids=ids).logits
    assert torch.isfinite(out).all()


def test_bad_requests_are_refused_by_name(four_layers, tmp_path):
    with pytest.raises(ConfigError, match="keep_layers: the model has layers 0 to 3; \\[7\\]"):
        prune(four_layers, tmp_path / "a", keep=[0, 7])
    with pytest.raises(ConfigError, match="keep_layers: name each layer once"):
        prune(four_layers, tmp_path / "a", keep=[2, 1])
    with pytest.raises(ConfigError, match="measure_on"):
        prune(four_layers, tmp_path / "a", drop=1)
    with pytest.raises(ConfigError, match="drop: must be from 1 to 3"):
        prune(four_layers, tmp_path / "a", drop=4, measure_on=write_sft(tmp_path / "d.jsonl"))
    with pytest.raises(ConfigError, match="mlp_width"):
        prune(four_layers, tmp_path / "a", keep=[0], mlp_width=1000)
    (tmp_path / "exists").mkdir()
    with pytest.raises(ConfigError, match="out: .* exists already"):
        prune(four_layers, tmp_path / "exists", keep=[0])
    assert not (tmp_path / "a").exists()
    assert parse_layers("0,2, 4-6") == [0, 2, 4, 5, 6]
    with pytest.raises(ConfigError, match="keep_layers"):
        parse_layers("1,x")


def test_the_cli_writes_a_prune_report(four_layers, tmp_path):
    import io

    from finetune_studio.core.protocol.distill_report import PruneReport
    from finetune_studio.engine.cli.commands import build_parser
    from finetune_studio.engine.cli.prune import cmd_prune

    out = tmp_path / "cli"
    argv = ["prune", "--model", str(four_layers), "--keep-layers", "0,3", "--out", str(out), "--json"]
    stream = io.StringIO()
    assert cmd_prune(build_parser().parse_args(argv), stream) == 0
    line = json.loads(stream.getvalue().strip().splitlines()[-1])
    report = PruneReport.from_fields(line)
    assert line["type"] == "prune_report" and list(report.kept_layers) == [0, 3] and report.out == str(out)
    assert (out / "config.json").is_file()
    again = io.StringIO()
    assert cmd_prune(build_parser().parse_args(argv), again) == 2
    failed = json.loads(again.getvalue().strip())
    assert failed["type"] == "failed" and failed["kind"] == "config" and "exists already" in failed["message"]
