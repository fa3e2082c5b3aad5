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


def test_sums_past_int32_are_split_and_a_partial_block_of_outputs_writes_only_its_outputs():
    """A row at its maximum everywhere against weights at 127: 1000 x 127 x 32767 is past int32 (the kernel sums in
    int32 over 512 inputs, then in float32); 37 outputs leave a partial block of 16, whose other lanes the kernel
    must not write (the memory after the last row's 37 outputs stays as it was)."""
    weight = torch.full((37, 1000), 127, dtype=torch.int8)
    weight[5] = -127
    scale = torch.full((37,), 0.5, dtype=torch.bfloat16)
    x = torch.full((3, 1000), 2.0)
    y = torch.full((3 * 37 + 16,), 7.0)
    lib = int8_dot._library()
    assert lib is not None
    packed = int8_dot.packed(weight)
    assert lib.int8_dot_gemm(x.data_ptr(), 3, 1000, packed.data_ptr(), scale.data_ptr(), None, 37, y.data_ptr(), 1) == 0
    expected = torch.full((3, 37), 1000 * 127 * 0.5 * 2.0)
    expected[:, 5] *= -1
    assert torch.allclose(y[: 3 * 37].view(3, 37), expected, rtol=1e-6)
    assert (y[3 * 37 :] == 7.0).all()
    assert torch.equal(int8_dot.int8_dot_matmul(x, weight, scale, None), y[: 3 * 37].view(3, 37))


def test_a_view_of_a_stacks_rows_uses_the_stacks_packed_weight_and_a_changed_weight_is_packed_again():
    gen = torch.Generator().manual_seed(3)
    stack = torch.randint(-127, 128, (96, 70), dtype=torch.int8, generator=gen)
    scale = (torch.rand(96, generator=gen) * 0.01 + 1e-4).to(torch.bfloat16)
    x = torch.randn(5, 70, generator=gen)
    whole = int8_dot.int8_dot_matmul(x, stack, scale, None)
    for rows in (slice(0, 48), slice(48, 80), slice(80, 96), slice(40, 60)):  # 40: not a block start, packed alone
        view = stack[rows]
        assert torch.equal(int8_dot.int8_dot_matmul(x, view, scale[rows], None), whole[:, rows])
    assert int8_dot.packed(stack[48:80]).data_ptr() == int8_dot.packed(stack)[3].data_ptr()  # no second copy
    assert int8_dot.packed(stack) is int8_dot.packed(stack)  # packed once
    stack[0].neg_()  # changed in place: packed again
    again = int8_dot.int8_dot_matmul(x, stack, scale, None)
    assert torch.allclose(again[:, 0], -whole[:, 0], atol=1e-5) and torch.equal(again[:, 1:], whole[:, 1:])
