"""The generation worker's decode loop: one prefill, ``n`` candidates as one batch, a preallocated KV cache.

Instead of transformers' ``generate`` (which runs the prompt ``n`` times, grows each layer's KV cache with a
``torch.cat`` every step and samples over the whole vocabulary), :func:`decode`

1. runs the prompt once (batch 1, logits of the last position only) and copies its keys and values ``n`` times
   into buffers sized for the whole answer, written in place at each step (:class:`PreallocatedLayer`; models
   whose cache is not made of plain full-attention layers keep transformers' own cache, repeated ``n`` times);
2. samples with :class:`~engine.decoding.token_sampling.Sampler` (greedy decoding runs one row, copied to every
candidate);
3. hands each step's ``n`` token ids to ``on_tokens``, which says which candidates have ended, and drops ended
   candidates from the batch, so the remaining ones decode faster.

It calls the model's own ``forward``, so PEFT adapter layers injected into it (or switched off around it) apply.
Plain int8 and int4 Llama-family models run each step in C instead (:mod:`engine.decoding.native_step`; LoRA
adapters injected into them are added there on the side, other adapter layers keep the Python step).

:func:`decode_batch` does the same for several prompts at once (the worker's ``generate_batch``): each prompt is
prefilled alone (as :func:`decode` would), their caches are joined right-aligned into one buffer (left padding, the
padded positions masked out and zero), and every step runs all live (prompt, candidate) rows as one batch, each
row at its own rotary position. Each prompt samples from its own generator seeded as :func:`decode` seeds it and
draws as many numbers per step as :func:`decode` alone would: the random stream per prompt is unchanged.

``draft=k`` (greedy, one prompt, the fast step): prompt-lookup drafting (:func:`draft_tokens`, up to ``k`` tokens
that followed the latest earlier occurrence of the answer's last 3 or 2 tokens), checked in one forward of the fast
step over several positions, the cache cut back past the first wrong draft. Off by default: measured
(``benchmarks/decode_bench.py``, RESULTS.md) on chat prompts it pays for float32 (x1.1) but not against the
compiled one-row int8 products it has to give up (the int8/int4 kernels compute a row the same whatever the rows
around it, the compiled product does not, and greedy answers must not depend on the drafts); and the answers equal
one token per forward only up to the products' rounding (bfloat16 logits from the int8 head tie often).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch

from finetune_studio.engine.decoding.token_sampling import Sampler

OnTokens = Callable[[list[int]], list[bool]]  # one token id per candidate -> which candidates have ended


@functools.cache
def _cache_classes():
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A full-attention layer's keys and values in buffers (batch, heads, capacity, head dim), filled in place;
        ``keys`` / ``values`` are views of the filled part, what ``update`` returns to attention."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: int, capacity: int):
            super().__init__()
            b, h, t, d = keys.shape
            self.device = keys.device
            self.k_buf = keys.new_empty(rows, h, capacity, d)
            self.v_buf = values.new_empty(rows, h, capacity, values.shape[-1])
            self.k_buf[:, :, :t] = keys  # (1 or rows, h, t, d) broadcast over the rows
            self.v_buf[:, :, :t] = values
            self.length = t
            self.keys, self.values = self.k_buf[:, :, :t], self.v_buf[:, :, :t]
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            t0, t1 = self.length, self.length + key_states.shape[-2]
            if t1 > self.k_buf.shape[2]:  # past the planned length: grow (not expected in the worker's loop)
                self.k_buf = torch.cat([self.k_buf, torch.empty_like(self.k_buf)], dim=2)
                self.v_buf = torch.cat([self.v_buf, torch.empty_like(self.v_buf)], dim=2)
            self.k_buf[:, :, t0:t1] = key_states
            self.v_buf[:, :, t0:t1] = value_states
            self.length = t1
            self.keys, self.values = self.k_buf[:, :, :t1], self.v_buf[:, :, :t1]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        @classmethod
        def joined(cls, parts: list[tuple[torch.Tensor, torch.Tensor]], rows: list[int], capacity: int):
            """One layer for several prompts: prompt i's keys and values (1, h, t_i, d), copied to ``rows[i]``
            rows and right-aligned at the longest prompt's length; the padding before a shorter prompt is zero."""
            keys, values = parts[0]
            _, h, _, d = keys.shape
            longest = max(k.shape[2] for k, _ in parts)
            self = cls.__new__(cls)
            DynamicLayer.__init__(self)
            self.device = keys.device
            self.k_buf = keys.new_zeros(sum(rows), h, capacity, d)
            self.v_buf = values.new_zeros(sum(rows), h, capacity, values.shape[-1])
            start = 0
            for (k, v), r in zip(parts, rows, strict=True):
                t = k.shape[2]
                self.k_buf[start : start + r, :, longest - t : longest] = k
                self.v_buf[start : start + r, :, longest - t : longest] = v
                start += r
            self.length = longest
            self.keys, self.values = self.k_buf[:, :, :longest], self.v_buf[:, :, :longest]
            self.is_initialized = True
            return self

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self.k_buf, self.v_buf = self.k_buf[indices], self.v_buf[indices]
            self.keys, self.values = self.k_buf[:, :, : self.length], self.v_buf[:, :, : self.length]

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("the decode loop never crops its cache")

        def truncate(self, length: int) -> None:
            """Forget the positions from ``length`` on (drafted tokens that were not accepted)."""
            self.length = length
            self.keys, self.values = self.k_buf[:, :, :length], self.v_buf[:, :, :length]

    return DynamicCache, DynamicLayer, PreallocatedLayer


def _expand_cache(cache, rows: int, capacity: int):
    """The prompt's cache (batch 1), made to hold ``rows`` candidates of up to ``capacity`` positions."""
    _, dynamic_layer, preallocated = _cache_classes()
    layers = getattr(cache, "layers", None)
    if layers and all(type(layer) is dynamic_layer and layer.is_initialized for layer in layers):
        cache.layers = [preallocated(layer.keys, layer.values, rows, capacity) for layer in layers]
    elif rows > 1:
        cache.batch_repeat_interleave(rows)  # sliding-window, hybrid or recurrent layers: transformers' own
    return cache


DRAFT_TOKENS = 0  # drafted tokens per forward by default (greedy, one prompt): off, measured not to pay (see below)
DRAFT_NGRAMS = (3, 2)  # the n-gram sizes looked up, longest first

FAST_MODEL_TYPES = ("llama", "mistral", "qwen2")  # pre-norm decoder blocks, SwiGLU MLP, rotary q/k, no q/k norm


RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")  # weight * x / rms(x), computed in float32


def _fast_step(model, cache, native: bool = True):
    """A decoding step for Llama-family models that runs the model's own modules (so PEFT adapter layers apply)
    with the glue written out: no mask building, no per-layer keyword plumbing, the cache buffers written directly.
    The same operations as transformers' forward (the same logits); None where the model does not fit.
    ``native``: the whole step in C where the model is plain int8 or int4 (:mod:`engine.decoding.native_step`).
    """
    from finetune_studio.engine.decoding.int4 import int4_matmul, stacked_int4
    from finetune_studio.engine.decoding.int8 import int8_matmul, stacked

    preallocated = _cache_classes()[2]
    inner, config = getattr(model, "model", None), getattr(model, "config", None)
    if config is None or inner is None or getattr(config, "model_type", None) not in FAST_MODEL_TYPES:
        return None
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return None
    if not all(isinstance(layer, preallocated) for layer in cache.layers):
        return None
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if not all(hasattr(inner, a) for a in needed) or not hasattr(model, "lm_head"):
        return None
    for block in inner.layers:
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        if attn is None or mlp is None or hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return None
        if not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
            return None
        if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return None
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rms_norm = torch.nn.functional.rms_norm
    blocks = list(zip(inner.layers[: config.num_hidden_layers], cache.layers, strict=True))
    groups = config.num_attention_heads // config.num_key_value_heads

    def rotate(x, cos, signed_sin):  # transformers' apply_rotary_pos_emb: x*cos + cat(-x2, x1)*sin, the same numbers
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin

    def norm(module, x):  # Llama's RMSNorm as one op on float32 activations (the same numbers)
        if x.dtype != torch.float32 or type(module).__name__ not in RMS_NORMS:
            return module(x)
        return rms_norm(x, (x.shape[-1],), module.weight, module.variance_epsilon)

    def fused(parent, name: str):  # (h -> stacked product, output sizes): int8 or int4; None where not stacked
        s8 = stacked(parent, f"int8_{name}")
        if s8 is not None:
            return (lambda h: int8_matmul(h, *s8[:3])), s8[3]
        s4 = stacked_int4(parent, f"int4_{name}")
        if s4 is not None:
            return (lambda h: int4_matmul(h, *s4[:4])), s4[4]
        return None

    def step(
        ids: torch.Tensor, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``ids`` (rows, 1) -> next-token logits (rows, vocab). ``positions`` (rows,): each row's rotary position
        (None: the cache's length, the same for every row); ``mask`` (rows, 1, 1, length + 1) bool: the cache
        positions each row attends to (None: all of them).

        ``ids`` (rows, t) with t > 1 (no ``positions`` or ``mask``): t new positions, each attending to the cache
        and the new positions before it (drafted tokens checked in one forward); logits (rows, t, vocab)."""
        rows, t = ids.shape
        x = inner.embed_tokens(ids)  # (rows, t, hidden)
        if positions is None:
            start = cache.layers[0].length
            position = torch.arange(start, start + t, device=ids.device)[None, :]  # (1, t)
            if t > 1:
                later = torch.arange(start + t, device=ids.device)[None, :] > position.view(t, 1)  # (t, start + t)
                mask = ~later
        else:
            position = positions.view(rows, 1)
        cos, sin = inner.rotary_emb(x, position_ids=position)  # (1 or rows, t, head_dim)
        half = sin.shape[-1] // 2
        cos, sin = cos.unsqueeze(2), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(2)  # (.,1,1,d)
        for block, layer in blocks:
            attn, mlp = block.self_attn, block.mlp
            d = attn.head_dim
            h = norm(block.input_layernorm, x)
            qkv = fused(attn, "qkv")  # one int8/int4 matmul for q, k and v where they are plain quantised linears
            if qkv is not None:  # q and k rotated as one tensor
                out, sizes = qkv[0](h), qkv[1]
                qk = rotate(out[..., : sizes[0] + sizes[1]].view(rows, t, -1, d), cos, sin)
                q, k = qk[:, :, : sizes[0] // d], qk[:, :, sizes[0] // d :]
                v = out[..., sizes[0] + sizes[1] :]
            else:
                q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
                q, k = rotate(q.view(rows, t, -1, d), cos, sin), rotate(k.view(rows, t, -1, d), cos, sin)
            k = k.transpose(1, 2)  # (rows, kv heads, t, d); q: (rows, t, heads, d)
            keys, values = layer.update(k, v.view(rows, t, -1, d).transpose(1, 2))  # (rows, kv heads, length, d)
            o = sdpa(q.transpose(1, 2), keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=groups > 1)
            o = o.transpose(1, 2)  # (rows, heads, t, d) -> (rows, t, heads, d)
            x = x + attn.o_proj(o.reshape(rows, t, -1))
            h = norm(block.post_attention_layernorm, x)
            gate_up = fused(mlp, "gate_up")
            if gate_up is not None:
                gate, up = gate_up[0](h).split(gate_up[1], dim=-1)
            else:
                gate, up = mlp.gate_proj(h), mlp.up_proj(h)
            x = x + mlp.down_proj(mlp.act_fn(gate) * up)
        logits = model.lm_head(norm(inner.norm, x))
        return logits[:, -1, :] if t == 1 else logits

    from finetune_studio.engine.decoding.native_step import native_step

    return (native_step(model, cache, step) if native else None) or step


def decode(
    model,
    prompt: list[int],
    n: int,
    max_new_tokens: int,
    sampler: Sampler,
    on_tokens: OnTokens,
    seed: int = 0,
    cancel: threading.Event | None = None,
    pad_id: int = 0,
    fast_path: bool = True,
    draft: int = DRAFT_TOKENS,
) -> int:
    """Sample ``n`` continuations of ``prompt`` with ``model`` (a causal LM); return the decoding steps run.

    ``on_tokens`` gets each step's token for every candidate (``pad_id`` for those already ended) and answers
    which candidates have now ended; the loop stops when all have, at ``max_new_tokens``, or on ``cancel``.
    ``fast_path``: use :func:`_fast_step` for Llama-family models (False: always the model's ``forward``).
    ``draft``: greedy decoding drafts up to this many tokens by prompt lookup (:func:`_decode_drafted`; 0: off).
    """
    args = [prompt], [n], [max_new_tokens], sampler, [on_tokens], [seed], cancel, pad_id, fast_path
    return decode_batch(model, *args, draft=draft)


def decode_batch(
    model,
    prompts: list[list[int]],
    ns: list[int],
    max_new_tokens: list[int],
    sampler: Sampler,
    on_tokens: Sequence[OnTokens],
    seeds: list[int],
    cancel: threading.Event | None = None,
    pad_id: int = 0,
    fast_path: bool = True,
    draft: int = DRAFT_TOKENS,
) -> int:
    """:func:`decode` for several prompts as one batch: prompt ``i`` gets ``ns[i]`` candidates of up to
    ``max_new_tokens[i]`` tokens, seeded with ``seeds[i]``, its tokens handed to ``on_tokens[i]`` (only while it
    has candidates left). Returns the decoding steps run (of the longest-running prompt).

    Models whose cache is not made of plain full-attention layers (sliding windows, recurrent layers) decode
    the prompts one after another instead, each as :func:`decode` would.
    """
    dynamic_cache, dynamic_layer, preallocated = _cache_classes()
    device = next(model.parameters()).device
    count = len(prompts)
    rows_of = [1 if sampler.greedy else n for n in ns]  # greedy candidates are all the same: decode one, copy it
    longest = max(len(p) for p in prompts)
    capacity = longest + max(max_new_tokens)
    with torch.inference_mode():
        caches, first = [], []
        for prompt in prompts:  # each prompt alone: the same prefill as decode's
            ids = torch.tensor([prompt], device=device)
            out = model(input_ids=ids, cache=dynamic_cache(config=model.config), use_cache=True, logits_to_keep=1)
            caches.append(out.cache)
            first.append(out.logits[:, -1, :])
        if count == 1:
            cache = _expand_cache(caches[0], rows_of[0], capacity)
        elif all(
            getattr(c, "layers", None) and all(type(x) is dynamic_layer and x.is_initialized for x in c.layers)
            for c in caches
        ):
            cache = dynamic_cache(config=model.config)
            cache.layers = [
                preallocated.joined([(c.layers[i].keys, c.layers[i].values) for c in caches], rows_of, capacity)
                for i in range(len(caches[0].layers))
            ]
        else:
            args = sampler, on_tokens, seeds, ns, max_new_tokens
            return _one_by_one(model, prompts, *args, cancel=cancel, pad_id=pad_id, fast_path=fast_path)
        logits = torch.cat([f.expand(r, -1) for f, r in zip(first, rows_of, strict=True)])  # (rows, vocab)
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        # the batch's rows: (prompt, candidate); a greedy prompt's one row stands for all its candidates (-1)
        live = [(p, -1 if sampler.greedy else c) for p in range(count) for c in range(rows_of[p])]
        pad = torch.tensor([longest - len(prompts[p]) for p, _ in live], device=device)  # (rows,)
        padded = bool(pad.any())
        attend = torch.arange(capacity, device=device)[None, :] >= pad[:, None]  # (rows, capacity)
        ended = [[False] * n for n in ns]
        done = [False] * count
        steps = [0] * count
        drafting = draft > 0 and sampler.greedy and count == 1
        fast = _fast_step(model, cache, native=not drafting) if fast_path else None  # drafts: one code for any t
        if drafting and fast is not None:
            one = prompts[0], ns[0], max_new_tokens[0], on_tokens[0], logits
            return _decode_drafted(fast, cache, *one, draft=draft, cancel=cancel, pad_id=pad_id)
        length = longest  # the cache's positions so far, padding included
        while True:
            if cancel is not None and cancel.is_set():
                return max(steps)
            sizes = [sum(1 for q, _ in live if q == p) for p in range(count)]
            groups = [(generators[p], sizes[p]) for p in range(count) if sizes[p]]
            picked: list[int] = sampler.sample_groups(logits, groups).tolist()  # (rows,)
            tokens: list[list[int]] = [[pad_id] * n for n in ns]
            for row, (p, c) in enumerate(live):
                if c < 0:
                    tokens[p] = [picked[row] if not ended[p][i] else pad_id for i in range(ns[p])]
                else:
                    tokens[p][c] = picked[row]
            for p in range(count):
                if sizes[p]:
                    ended[p] = list(on_tokens[p](tokens[p]))
                    steps[p] += 1
                    done[p] = steps[p] >= max_new_tokens[p] or all(ended[p])
            keep = [row for row, (p, c) in enumerate(live) if not done[p] and (c < 0 or not ended[p][c])]
            if not keep:
                return max(steps)
            if len(keep) < len(live):  # drop the ended candidates (and finished prompts) from the batch
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                pad, attend = pad[index], attend[index]
                live = [live[row] for row in keep]
                picked = [picked[row] for row in keep]
            next_ids = torch.tensor(picked, device=device)[:, None]
            positions = length - pad  # each row's own position: its prompt's length + the steps so far
            if fast is not None:
                mask = attend[:, None, None, : length + 1] if padded else None
                logits = fast(next_ids, positions if padded else None, mask)
            else:
                extra = {}
                if padded:
                    extra = {"attention_mask": attend[:, : length + 1].long(), "position_ids": positions[:, None]}
                out = model(input_ids=next_ids, cache=cache, use_cache=True, **extra)
                cache = out.cache
                logits = out.logits[:, -1, :]
            length += 1


def draft_tokens(history: list[int], most: int, ngrams: Sequence[int] = DRAFT_NGRAMS) -> list[int]:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of ``history``'s last n tokens (the
    longest n of ``ngrams`` that occurs), at most ``most``; [] where none occurs."""
    for n in ngrams:
        if len(history) <= n or most < 1:
            continue
        tail = history[-n:]
        for i in range(len(history) - n - 1, -1, -1):
            if history[i : i + n] == tail:
                return history[i + n : i + n + most]
    return []


Step = Callable[..., torch.Tensor]


def _decode_drafted(
    fast: Step,
    cache: object,
    prompt: list[int],
    n: int,
    max_new: int,
    on_tokens: OnTokens,
    logits: torch.Tensor,
    *,
    draft: int,
    cancel: threading.Event | None,
    pad_id: int,
) -> int:
    """Greedy decoding of one prompt that checks drafted tokens in one forward: the tokens :func:`draft_tokens`
    proposes from the prompt and the answer so far go through the fast step after the last token, each position's
    greedy choice is read from that one forward, the drafts up to the first that differs from it are accepted, and
    the choice after them comes free. The answer is the same as one token per forward (the same choices, each
    made at the same position), in fewer forwards where the answer repeats text before it (extraction, quotes,
    code, lists)."""
    from finetune_studio.engine.decoding.int8 import use_row_products

    was = use_row_products(False)  # the kernel for one row too: its rows do not depend on how many there are
    try:
        return _drafted_loop(fast, cache, prompt, n, max_new, on_tokens, logits, draft, cancel, pad_id)
    finally:
        use_row_products(was)


def _drafted_loop(
    fast: Step,
    cache: object,
    prompt: list[int],
    n: int,
    max_new: int,
    on_tokens: OnTokens,
    logits: torch.Tensor,
    draft: int,
    cancel: threading.Event | None,
    pad_id: int,
) -> int:
    layers = cast(list[Any], getattr(cache, "layers"))  # noqa: B009 (PreallocatedLayer, built at runtime)
    history = list(prompt)
    chosen = [int(logits[0].argmax())]
    ended = [False] * n
    steps = 0
    while True:
        for choice in chosen:
            ended = list(on_tokens([choice if not e else pad_id for e in ended]))
            steps += 1
            history.append(choice)
            if steps >= max_new or all(ended):
                return steps
        if cancel is not None and cancel.is_set():
            return steps
        token = history[-1]
        drafted = draft_tokens(history, min(draft, max_new - steps - 1))
        start = layers[0].length
        out = fast(torch.tensor([[token, *drafted]], device=logits.device))  # (1, vocab) or (1, t, vocab)
        picks = out.argmax(dim=-1).reshape(-1).tolist()  # the greedy choice after each position
        accepted = 0
        while accepted < len(drafted) and drafted[accepted] == picks[accepted]:
            accepted += 1
        if accepted < len(drafted):  # forget the positions of the drafts that were wrong
            for layer in layers:
                layer.truncate(start + 1 + accepted)
        chosen = picks[: accepted + 1]


def _one_by_one(model, prompts, sampler, on_tokens, seeds, ns, max_new_tokens, *, cancel, pad_id, fast_path) -> int:
    steps = 0
    for prompt, n, max_new, handle, seed in zip(prompts, ns, max_new_tokens, on_tokens, seeds, strict=True):
        if cancel is not None and cancel.is_set():
            break
        steps = max(steps, decode(model, prompt, n, max_new, sampler, handle, seed, cancel, pad_id, fast_path))
    return steps
