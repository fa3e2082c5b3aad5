"""Every method of core.methods on the tiny model: the loss falls, the saved adapter reloads to the same logits, the
trainable count is the library's (or the reference formula's), resume reproduces the curve; bottleneck adapters
against a direct reference implementation; what a method cannot do is a ConfigError naming the field."""

import pytest
import torch
from engine_helpers import Recorder, tiny_config, write_dpo, write_sft

from finetune_studio.core import methods as table
from finetune_studio.core.config import ConfigError
from finetune_studio.core.store import Store, new_run_id
from finetune_studio.engine import bottleneck
from finetune_studio.engine.models import load_causal_lm
from finetune_studio.engine.train import adapters
from finetune_studio.engine.train.memory_budget import meta_param_counts
from finetune_studio.engine.train.recipe import Recipe, SetUp, StopFlag, train_run
from finetune_studio.engine.train.reporting import Reporter

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
NEW = [m.name for m in table.TABLE if not m.base_4bit and m.name not in ("lora", "dora", "full")]  # tested elsewhere
PROMPT = {m.name for m in table.TABLE if m.family == "prompt"}


def _config(model_dir, data, method, **kw):
    kw.setdefault("compute_dtype", "float32")
    kw.setdefault("packing", method not in PROMPT)
    return tiny_config(model_dir, data, method=method, learning_rate=3e-2, **kw)


def _base(model_dir):
    return load_causal_lm(model_dir, dtype=torch.float32, device="cpu", quantize_4bit=False)


def _trained(config, tmp_path) -> tuple[SetUp, Recorder, object]:
    store = Store()
    run_id = new_run_id()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    store.create_run(config.to_dict(), run_id=run_id, run_dir=str(run_dir))
    rec = Recorder()
    reporter = Reporter(extra=rec)
    reporter.attach_run(store, run_id, run_dir)
    recipe = Recipe(config, run_id, run_dir, store, reporter, StopFlag())
    setup = recipe.setup(resume=False)
    result = recipe.train(setup)
    assert result.status == "completed"
    return setup, rec, result


def _load(model_dir, folder):
    base = _base(model_dir)
    if bottleneck.is_bottleneck_folder(folder):
        return bottleneck.load_bottlenecks(base, folder)
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(folder))


@pytest.mark.parametrize("method", NEW + ["lora_pissa", "lora_olora", "lora_plus"])
def test_the_loss_falls_and_the_saved_adapter_gives_the_same_logits(tiny_model_dir, tmp_path, method):
    kw = {}
    if method.startswith("lora_"):
        kw = {"loraplus_lr_ratio": 16.0} if method == "lora_plus" else {"lora_init": method[5:]}
        method = "lora"
    config = _config(tiny_model_dir, write_sft(tmp_path / "sft.jsonl"), method, max_steps=8, **kw)
    setup, rec, result = _trained(config, tmp_path)
    losses = rec.losses
    assert min(losses[-3:]) < losses[0] - 0.02, losses
    model = setup.model.eval()
    with torch.no_grad():
        trained = model(IDS).logits.clone()
        with model.disable_adapter():
            base_only = model(IDS).logits[:, -IDS.shape[1] :].clone()
    assert not torch.allclose(trained[:, -IDS.shape[1] :], base_only, atol=1e-4), "training changed nothing"
    loaded = _load(tiny_model_dir, result.adapter_dir).eval()
    with torch.no_grad():
        again = loaded(IDS).logits
    # PiSSA / OLoRA: the saved adapter is plain LoRA (rank 2r) on the unchanged base, the trained one ran on W - BA
    torch.testing.assert_close(again, trained, atol=2e-5 if "lora_init" in kw else 1e-6, rtol=0)


@pytest.mark.parametrize("method", NEW)
def test_the_trainable_count_is_the_library_s_and_the_estimate_s(tiny_model_dir, tmp_path, method):
    config = _config(tiny_model_dir, tmp_path / "x.jsonl", method)
    model = adapters.add_adapters(_base(tiny_model_dir), config)
    trainable, _ = adapters.parameter_counts(model)
    library, _ = model.get_nb_trainable_parameters()
    assert trainable == library > 0
    assert meta_param_counts(tiny_model_dir, config).trainable_params == trainable
    base_config = model.get_base_model().config
    h, layers = base_config.hidden_size, base_config.num_hidden_layers
    if table.method(method).family == "bottleneck":  # the reference formula, independent of the module
        b = h // config.adapter_reduction_factor
        per_adapter = h * b + b + b * h + h
        assert trainable == layers * (2 if method == "houlsby" else 1) * per_adapter
    if method == "prompt_tuning":
        assert trainable == config.num_virtual_tokens * h
    if method == "prefix_tuning":  # a key and a value vector per virtual token and layer
        kv = base_config.num_key_value_heads * (h // base_config.num_attention_heads)
        assert trainable == config.num_virtual_tokens * layers * 2 * kv


@pytest.mark.parametrize("method", NEW)
def test_resume_reproduces_the_curve(tiny_model_dir, tmp_path, method):
    config = _config(tiny_model_dir, write_sft(tmp_path / "sft.jsonl"), method, max_steps=6, batch_size=3)
    full = Recorder()
    train_run(config, reporter=Reporter(extra=full))
    stop, first = StopFlag(), Recorder()

    def stop_at_three(event):
        first(event)
        if event.type == "step" and event.step == 3:
            stop.set()

    stopped = train_run(config, reporter=Reporter(extra=stop_at_three), stop=stop)
    assert stopped.status == "stopped" and stopped.step == 3
    second = Recorder()
    assert train_run(resume=stopped.run_id, reporter=Reporter(extra=second)).status == "completed"
    assert first.losses + second.losses == pytest.approx(full.losses, abs=1e-5)


@pytest.mark.parametrize("method", ["ia3", "bitfit", "prompt_tuning", "prefix_tuning", "houlsby"])
def test_dpo_trains_each_family(tiny_model_dir, tmp_path, method):
    config = _config(tiny_model_dir, write_dpo(tmp_path / "dpo.jsonl"), method, objective="dpo", max_steps=6)
    rec = Recorder()
    assert train_run(config, reporter=Reporter(extra=rec)).status == "completed"
    assert rec.losses[-1] < rec.losses[0]


def _reference_forward(base, adapters_by_site, ids):
    """A Llama decoder written out directly: each layer ``x + A_attn(attn(norm(x)))`` then ``x + A_mlp(mlp(norm(x)))``
    with ``A(h) = h + up(f(down(h)))`` (Houlsby; Pfeiffer has no attention adapter)."""
    inner = base.model
    x = inner.embed_tokens(ids)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    cos_sin = inner.rotary_emb(x, positions)
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
    for i, layer in enumerate(inner.layers):
        a = layer.self_attn(layer.input_layernorm(x), position_embeddings=cos_sin, attention_mask=mask)[0]
        if f"layers.{i}.attn" in adapters_by_site:
            a = _apply(adapters_by_site[f"layers.{i}.attn"], a)
        x = x + a
        m = layer.mlp(layer.post_attention_layernorm(x))
        if f"layers.{i}.mlp" in adapters_by_site:
            m = _apply(adapters_by_site[f"layers.{i}.mlp"], m)
        x = x + m
    return base.lm_head(inner.norm(x))


def _apply(weights, h):
    down = torch.relu(h @ weights["down.weight"].T + weights["down.bias"])
    return h + down @ weights["up.weight"].T + weights["up.bias"]


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_bottleneck_adapters_match_a_direct_reference(tiny_model_dir, placement):
    torch.manual_seed(0)
    base = _base(tiny_model_dir).eval()
    model = bottleneck.add_bottlenecks(base, bottleneck.BottleneckConfig(placement, reduction_factor=8))
    with torch.no_grad():
        start = model(IDS).logits.clone()
        for p in model.bottlenecks.parameters():  # away from the zero start, so every term counts
            p.normal_(0, 0.3)
        ours = model(IDS).logits
        weights = {}
        for name, tensor in model.adapter_state_dict().items():
            site, _, rest = name.rpartition(".down.") if ".down." in name else name.rpartition(".up.")
            part = "down" if ".down." in name else "up"
            weights.setdefault(site, {})[f"{part}.{rest}"] = tensor
        with model.disable_adapter():  # the reference calls the base's modules, where the adapters' hooks sit
            plain = model(IDS).logits
            reference = _reference_forward(base, weights, IDS)
            plain_reference = _reference_forward(base, {}, IDS)
    assert sorted(weights) == sorted(model.bottleneck_config.sites)
    assert len(weights) == base.config.num_hidden_layers * (2 if placement == "houlsby" else 1)
    torch.testing.assert_close(plain, plain_reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(start, plain, atol=0, rtol=0)  # up = 0: the base at the start
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, plain, atol=1e-3)


def test_a_bottleneck_folder_for_another_model_is_refused(tiny_model_dir, tmp_path):
    from tiny_model import build_tiny_model_dir

    model = bottleneck.add_bottlenecks(_base(tiny_model_dir), bottleneck.BottleneckConfig("pfeiffer"))
    model.save_pretrained(tmp_path / "a")
    wider = build_tiny_model_dir(tmp_path / "wider", hidden_size=96)
    with pytest.raises(ValueError, match="hidden size 64"):
        bottleneck.load_bottlenecks(_base(wider), tmp_path / "a")


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"method": "prompt_tuning"}, "packing", "set packing to false"),
        ({"method": "prefix_tuning"}, "packing", "packed row"),
        ({"method": "lora", "lora_init": "loftq"}, "lora_init", "choose method qlora"),
        ({"method": "qlora", "lora_init": "pissa"}, "lora_init", "4-bit"),
        ({"method": "lora", "lora_init": "pissa", "objective": "dpo"}, "lora_init", "reference"),
        ({"method": "ia3", "loraplus_lr_ratio": 16.0}, "loraplus_lr_ratio", "IA3 has none"),
        ({"method": "houlsby", "adapter_non_linearity": "sigmoid"}, "adapter_non_linearity", "relu"),
        ({"method": "rank1"}, "method", "houlsby"),
        (
            {"method": "prefix_tuning", "packing": False, "objective": "grpo", "rewards": [{"kind": "json_valid"}]},
            "objective",
            "decode loop",
        ),
    ],
)
def test_what_a_method_cannot_do_is_refused_naming_the_field(tmp_path, changes, field, words):
    with pytest.raises(ConfigError, match=words) as err:
        tiny_config(tmp_path, tmp_path / "x.jsonl", **changes)
    assert err.value.field == field


def test_several_processes_are_refused_before_loading_for_a_one_process_method(tmp_path):
    from finetune_studio.engine.train.distributed.ranks import check_shardable

    with pytest.raises(ConfigError, match="without --nproc") as err:
        check_shardable(tiny_config(tmp_path, tmp_path / "x.jsonl", method="houlsby"), "cpu", torch.float32)
    assert err.value.field == "method"
    check_shardable(tiny_config(tmp_path, tmp_path / "x.jsonl", method="lora"), "cpu", torch.float32)


@pytest.mark.parametrize(
    ("method", "words"),
    [("prompt_tuning", "extra inputs"), ("houlsby", "non-linearity"), ("bitfit", "no bias of their own")],
)
def test_merged_and_gguf_exports_are_refused_with_the_reason_before_any_work(tiny_model_dir, tmp_path, method, words):
    from finetune_studio.engine.export.errors import ExportError
    from finetune_studio.engine.export.writer import ExportRequest, export

    config = _config(tiny_model_dir, write_sft(tmp_path / "sft.jsonl"), method, max_steps=1)
    run = train_run(config, reporter=Reporter(extra=Recorder()))
    for formats in (("adapter", "merged"), ("adapter", "gguf")):
        with pytest.raises(ExportError, match=words):
            export(ExportRequest(run=run.run_id, out=tmp_path / "out", formats=formats, check=False))
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_a_bottleneck_adapter_exports_with_its_loader_and_passes_the_check(tiny_model_dir, tmp_path):
    from finetune_studio.engine.export.writer import ExportRequest, export

    config = _config(tiny_model_dir, write_sft(tmp_path / "sft.jsonl"), "pfeiffer", max_steps=2)
    run = train_run(config, reporter=Reporter(extra=Recorder()))
    outcome = export(ExportRequest(run=run.run_id, out=tmp_path / "out", formats=("adapter",)))
    assert outcome.passed, outcome.report
    assert bottleneck.is_bottleneck_folder(tmp_path / "out")
    loaded = bottleneck.load_bottlenecks(_base(tiny_model_dir), tmp_path / "out").eval()
    again = bottleneck.load_bottlenecks(_base(tiny_model_dir), run.adapter_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, again(IDS).logits, atol=0, rtol=0)


@pytest.mark.parametrize("method", NEW)
def test_the_estimate_s_terms_match_a_measured_step(method):
    """Trainable parameters and optimizer states exactly; what autograd keeps within 10% (a prefix's cache and a
    soft prompt's positions included); the whole step's measured peak within 6% (LoRA's is 3.6% on this model)."""
    from measuring import measure_step_in_own_process

    from finetune_studio.core.config import TrainConfig
    from finetune_studio.core.devices import DeviceInfo
    from finetune_studio.core.memory.estimate import ModelShape, backward_peak_bytes, estimate_training_memory

    cfg_dict = dict(
        architectures=["LlamaForCausalLM"],
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=2000,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    config = TrainConfig(
        batch_size=2, max_length=128, lora_rank=8, method=method, packing=method not in PROMPT, compute_dtype="float32"
    )
    shape = ModelShape.from_config_dict(cfg_dict)
    est = estimate_training_memory(shape, config, DeviceInfo("cpu", "Test CPU", 16 * 2**30, 12 * 2**30, True))
    m = measure_step_in_own_process(cfg_dict, config, "float32")
    assert (est.trainable_params, est.optimizer_states, est.adapter_weights) == (
        m.trainable_params,
        m.optimizer_states,
        m.adapter_weights,
    )
    seq = est.batch.seq + (config.num_virtual_tokens if method in ("prompt_tuning", "p_tuning") else 0)
    transient = backward_peak_bytes(shape, config, est.batch.rows, seq, 4, est.batch.trained_tokens, "cpu")
    assert est.activations - transient == pytest.approx(m.activations, rel=0.10)
    assert est.total_bytes - est.runtime_overhead - est.allocator_slack == pytest.approx(m.peak, rel=0.06)


def test_the_generation_worker_names_the_adapters_it_cannot_run(tiny_model_dir, tmp_path):
    from finetune_studio.core.protocol import generation as gp
    from finetune_studio.engine.generate.generator import GenerationError, Session, unservable_adapter

    data = write_sft(tmp_path / "sft.jsonl")
    folders = {}
    for method in ("ia3", "prefix_tuning", "houlsby"):
        run = train_run(_config(tiny_model_dir, data, method, max_steps=1), reporter=Reporter(extra=Recorder()))
        folders[method] = run.adapter_dir
    assert unservable_adapter(folders["ia3"]) == ""
    assert "virtual tokens (or prefix)" in unservable_adapter(folders["prefix_tuning"])
    assert "bottleneck adapter" in unservable_adapter(folders["houlsby"])
    worker = Session()
    worker.load(gp.LoadModel(id="l", model=str(tiny_model_dir)))
    with pytest.raises(GenerationError, match="load_bottlenecks"):
        worker.attach(gp.AttachAdapter(id="a", name="h", source=str(folders["houlsby"])))
    assert worker.attach(gp.AttachAdapter(id="b", name="i", source=str(folders["ia3"]))).name == "i"


@pytest.mark.parametrize("method", ["houlsby", "ia3"])
def test_a_run_starts_from_another_method_s_adapter_and_continues_it(tiny_model_dir, tmp_path, method):
    data = write_sft(tmp_path / "sft.jsonl")
    before = Recorder()
    first = train_run(_config(tiny_model_dir, data, method, max_steps=4), reporter=Reporter(extra=before))
    rec = Recorder()
    # the method named here is ignored: the adapter's own kind is loaded and trained on
    config = _config(tiny_model_dir, data, "lora", max_steps=2, init_adapter=first.run_id)
    second = train_run(config, reporter=Reporter(extra=rec))
    assert second.status == "completed"
    assert rec.losses[0] < before.losses[0] - 1e-3  # starts where the first run got to, not from the base
    if method == "houlsby":
        assert bottleneck.is_bottleneck_folder(second.adapter_dir)
        from finetune_studio.engine.train.recipe import TrainingFailed

        with pytest.raises(TrainingFailed, match="init_adapter: .* needs a frozen copy as the reference"):
            dpo = _config(tiny_model_dir, write_dpo(tmp_path / "d.jsonl"), "lora", objective="dpo")
            train_run(dpo.replace(init_adapter=first.run_id), reporter=Reporter(extra=Recorder()))


def test_lora_plus_gives_the_b_matrices_ratio_times_the_learning_rate(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, tmp_path / "x.jsonl", "lora", loraplus_lr_ratio=16.0)
    model = adapters.add_adapters(_base(tiny_model_dir), config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adapters.make_optimizer(params, config, "cpu", model)
    slow, fast = optimizer.param_groups
    b_ids = {id(p) for n, p in model.named_parameters() if ".lora_B." in n}
    assert {id(p) for p in fast["params"]} == b_ids and not b_ids & {id(p) for p in slow["params"]}
    assert (slow["lr"], fast["lr"]) == (config.learning_rate, 16 * config.learning_rate)
    assert len(slow["params"]) + len(fast["params"]) == len(params)
