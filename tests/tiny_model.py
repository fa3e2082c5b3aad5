"""A tiny randomly initialised causal LM and a tokenizer, both built offline in about a second.

Used by the tests (and handy for quick manual runs): a byte-level BPE tokenizer
trained on a few sentences, with ChatML special tokens and chat template, and a
2-layer Llama of hidden size 64 saved as safetensors.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "user assistant system tool: answer the question in JSON with keys name and age.",
    '{"name": "Ada", "age": 36} {"answer": 42} [1, 2, 3]',
    "What is the capital of France? Paris is the capital of France.",
    "Translate to French: hello world -> bonjour le monde.",
    "Write a haiku about the sea. Waves fold into foam, salt wind carries gull voices.",
    "0123456789 + - * / = ( ) < > ! ? . , ; : ' \" \n\t",
]


def build_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model_dir(path: str | Path, *, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Path:
    """Write a tiny Llama and its tokenizer to ``path`` (a plain safetensors model folder)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def build_adapter_dir(model_dir: str | Path, out: str | Path, seed: int) -> Path:
    """Write to ``out`` a LoRA adapter (rank 4 on q, v and down) for the model in ``model_dir``, saved in PEFT's
    format, with random non-zero B weights from ``seed`` so that it changes the model's output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(str(out))
    return Path(out)


# A tiny decoder of each family the fused ops patch (Llama, Mistral, Qwen2, Qwen3), for the kernels' wiring tests.
FAMILY_SHAPE = dict(
    hidden_size=48,
    intermediate_size=136,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=128,
    tie_word_embeddings=True,
)


def tiny_lora_model(arch: str, config):
    """A random-weight ``FAMILY_SHAPE`` decoder of ``arch`` ('llama', 'mistral', 'qwen2', 'qwen3'; seed 0, SDPA, no
    cache, the base frozen) with the engine's adapters for ``config`` (a ``TrainConfig``), each LoRA B given values
    (B = 0 at the start would give A no gradient). No memory patches or kernels: the caller installs what it tests."""
    import torch
    import transformers

    from finetune_studio.engine.train.adapters import add_adapters

    cfg_cls, lm_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[arch]
    extra = {"head_dim": 8} if arch == "qwen3" else {}
    torch.manual_seed(0)
    base = lm_cls(cfg_cls(**FAMILY_SHAPE, **extra, attn_implementation="sdpa"))
    base.config.use_cache = False
    for p in base.parameters():
        p.requires_grad_(False)
    model = add_adapters(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model


def step_with_nodes(model, ids):
    """One forward and backward of ``model`` on ``ids`` (its own labels): (the loss, each trained parameter's
    gradient, the type names of every autograd node the loss's graph holds), for tests that check which path ran."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    nodes, todo, seen = set(), [loss.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        nodes.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, nodes


def tiny_bf16_mixed_model(arch: str = "llama", config=None):
    """``tiny_lora_model`` (default config: LoRA rank 4) as a bf16-mixed run on this CPU sets it up: the fused ops,
    bf16-mixed's frozen bf16 linears and the kernels wired in (``install_kernels(..., fused_ops=True)``), in training
    mode."""
    from finetune_studio.core.config import TrainConfig
    from finetune_studio.engine.train.model_patches import kernel_wiring
    from finetune_studio.engine.train.model_patches.fused_ops import apply_memory_patches
    from finetune_studio.engine.train.model_patches.mixed_precision import apply_mixed

    model = tiny_lora_model(arch, config or TrainConfig(lora_rank=4))
    apply_memory_patches(model, True)
    apply_mixed(model)
    kernel_wiring.install_kernels(model, "auto", "cpu", fused_ops=True)
    model.train()
    return model
