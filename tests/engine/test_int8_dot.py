"""The int8 x int16 products (``engine.decoding.int8_dot``): the int8 layers' default where the CPU has AVX-512 VNNI."""

import pytest
import torch

from finetune_studio.engine.decoding import int8, int8_dot
from finetune_studio.engine.decoding.int8 import quantize_linears_int8

pytestmark = pytest.mark.skipif(not int8_dot.available(), reason="needs AVX-512 VNNI and a C compiler")

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11], [1, 2, 3, 4, 5, 6, 7, 8]])


@pytest.mark.parametrize(("rows", "out_f", "in_f"), [(1, 96, 64), (3, 37, 1000), (8, 50, 40), (11, 64, 4100 + 13)])
def test_the_product_is_the_dequantised_int8_product_and_each_row_is_computed_alone(rows, out_f, in_f):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8, generator=gen)
    scale = (torch.rand(out_f, generator=gen) * 0.01 + 1e-4).to(torch.bfloat16)
    x, bias = torch.randn(rows, in_f, generator=gen) * 3, torch.randn(out_f, generator=gen)
    x[:, 5] *= 40  # an outlier feature, as transformers' activations have
    reference = x.double() @ (weight.double() * scale.double()[:, None]).T + bias.double()
    y = int8_dot.int8_dot_matmul(x, weight, scale, bias)
    assert y.shape == (rows, out_f) and y.dtype == torch.float32
    # each row rounded to int16 steps of d = max|x_row| / 32767: at most d / 2 off per input, float32 sums after
    bound = (weight.double().abs() * scale.double()[:, None]).sum(1) * (x.abs().amax(1, keepdim=True) / 32767 / 2)
    assert ((y.double() - reference).abs() <= bound * 1.01 + 1e-4 * reference.abs().max()).all()
    assert ((y.double() - reference).norm() / reference.norm()).item() < 1e-3
    for r in range(rows):  # a row alone gives the same numbers as in the batch
        assert torch.equal(int8_dot.int8_dot_matmul(x[r : r + 1], weight, scale, bias)[0], y[r])


def test_several_threads_give_the_same_numbers():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (301, 200), dtype=torch.int8, generator=gen)
    scale = (torch.rand(301, generator=gen) * 0.01).to(torch.bfloat16)
    x = torch.randn(5, 200, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = int8_dot.int8_dot_matmul(x, weight, scale, None)
        torch.set_num_threads(2)  # each output computed by one thread, in the same order
        assert torch.equal(int8_dot.int8_dot_matmul(x, weight, scale, None), one)
    finally:
        torch.set_num_threads(threads)


def test_int8_layers_use_it_closer_to_full_precision_and_adapters_stay_live(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune_studio.engine.decoding.decode import decode
    from finetune_studio.engine.decoding.token_sampling import Sampler

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        full = model(IDS).logits.clone()
    quantize_linears_int8(model)
    assert int8.compile_row_products(model) == 0.0  # nothing to compile: the integer products take every row

    def greedy(net) -> list[int]:
        out: list[int] = []
        decode(net, IDS[0].tolist(), 1, 12, Sampler(temperature=0), lambda t: (out.append(t[0]), [False])[1])
        return out

    was = int8.use_dot_products(False)
    try:
        with torch.no_grad():
            kernel = model(IDS).logits.clone()  # torch's bfloat16 kernel
    finally:
        int8.use_dot_products(was)
    with torch.no_grad():
        dot = model(IDS).logits.clone()
    assert not torch.equal(dot, kernel)
    assert (dot - full).abs().mean() < (kernel - full).abs().mean()  # closer to float32 than the bfloat16 kernel
    assert (dot - full).abs().max() < 0.05 * full.std()
    base_tokens = greedy(model)

    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.fill_(0.3)
        tuned = peft(IDS).logits
        with peft.disable_adapter():
            assert torch.equal(peft(IDS).logits, dot)  # adapters off: exactly the int8 base
            assert greedy(peft) == base_tokens
    assert (tuned - dot).abs().max() > 0.1 * full.std()  # adapters on: they apply (on the side, not merged)
    assert greedy(peft) != base_tokens


def test_the_kernel_builds_into_the_cache_folder_once_and_a_missing_compiler_only_turns_it_off(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with caplog.at_level("WARNING"):
        assert int8_dot.load_library("probe", int8_dot.SOURCE) is None
    assert "not available" in caplog.text and "no-such-compiler" in caplog.text
    monkeypatch.delenv("CC")
    lib = int8_dot.load_library("probe", int8_dot.SOURCE)
    built = list((tmp_path / "finetune-studio" / "kernels").iterdir())
    assert lib is not None and len(built) == 1 and built[0].name.startswith("probe-")  # no temporary files left
    assert int8_dot.load_library("probe", int8_dot.SOURCE + "\n") is not None  # another source: rebuilt,
    assert len(list(built[0].parent.iterdir())) == 1  # the earlier build removed
