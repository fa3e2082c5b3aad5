"""The export's check: a fresh process reloads each written form the way people load it and answers the check's
prompts (``prompts``: the run's validation prompts); its choices are compared with the trained model's.

What is measured, per form, over every check prompt:
  * ``prompt_same``: the form's own tokenizer and chat template give the trained model's prompt tokens;
  * ``tokenizer_same`` (llama.cpp only): llama.cpp splits probe strings (special tokens, digits, accents, emoji,
    the check's rendered prompts) into the trained tokenizer's tokens;
  * ``agreement``: teacher-forced along prompt + the trained model's greedy answer, the share of all positions
    where the form's next-token choice equals the trained model's (``positions`` of them), ``answer_agreement``
    the same over the answer's positions only, and ``max_logit_diff`` over all of them;
  * ``greedy_same_count``: on how many prompts the form's own greedy answer is token for token the trained
    model's (``greedy_same`` when on all);
  * ``stops_on_eot``: the form declares the chat template's end-of-turn token as a stop token (for GGUF: in its
    metadata, and llama.cpp treats it as the end of generation), and ``ended_at_eot``: its answers ended there
    wherever the trained model's did.
A 16-bit form (adapter, merged, GGUF f16/f32) passes when the prompts are the same, the greedy answers are the
same on every prompt and the end-of-turn token stops it; a quantised one (GGUF q8_0 and below, anything merged
from QLoRA) when the prompts are the same, the end-of-turn token stops it and ``answer_agreement`` reaches
``AGREEMENT_MIN``. When the trained model itself did not end an answer within the token limit (a barely trained
model), the report says so: ending is then checked only as the declared stop token.

Loaders (named per form in the report and the verdict): the adapter through PEFT on the base, the merged model
through transformers, GGUF files through llama.cpp itself when llama-cpp-python is installed (the ``gguf-check``
extra) and through transformers' GGUF reader otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from finetune_studio.engine.export.errors import ExportCancelled

AGREEMENT_MIN = 0.9  # quantised forms: the share of answer positions whose next-token choice must agree
TIMEOUT_S = 1800
PROBES = (  # strings llama.cpp must split into the trained tokenizer's tokens
    'What is 12 plus 12? {"answer": 24}',
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "  two spaces, a tab\tand\n\nnew lines  ",
    "Numbers: 3.14159, 1000000, -42 and 2024-06-01.",
    "Accents and more: naïve café, Ærøskøbing, 東京, 🙂!",
)
LOADERS = {"adapter": "PEFT", "merged": "transformers", "gguf": "transformers' GGUF reader", "llama.cpp": "llama.cpp"}


def _label(form: dict) -> str:
    return f"gguf-{form['quant']}" if form["kind"] == "gguf" else form["kind"]


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def check(build, written: list[dict], folder: Path, notes: list[str], cancel=None, merge: dict | None = None) -> dict:
    """Run the check in a child process; the report written as ``check.json``."""
    import torch
    from safetensors.torch import save_file

    from finetune_studio.core.paths import python_argv

    if any(f["kind"] == "gguf" for f in written) and not llama_cpp_installed():
        notes = notes + [
            "llama-cpp-python is not installed, so GGUF files were checked through transformers' GGUF reader, not "
            "llama.cpp (pip install 'finetune-studio[gguf-check]' to check them through llama.cpp)"
        ]
    ref = build.compute_reference()
    tok = build.tokenizer
    probes = list(PROBES) + [
        tok.apply_chat_template(item["messages"], add_generation_prompt=True, tokenize=False) for item in ref["items"]
    ]
    forms = [dict(f, path=str(Path(f["path"]).relative_to(folder))) for f in written]
    with tempfile.TemporaryDirectory(prefix="export-check-") as scratch_name:
        scratch = Path(scratch_name)
        tensors = {f"logits.{i}": t.to(torch.float32).contiguous() for i, t in enumerate(ref["logits"])}
        save_file(tensors, str(scratch / "reference.safetensors"))
        spec = {
            "folder": str(folder),
            "forms": forms,
            "base": str(build.base_folder),
            "items": [{k: item[k] for k in ("messages", "prompt_ids", "answer_ids")} for item in ref["items"]],
            "eot_id": ref["eot_id"],
            "probes": [{"text": p, "ids": list(tok(p, add_special_tokens=False).input_ids)} for p in probes],
            "reference": str(scratch / "reference.safetensors"),
            "result": str(scratch / "result.json"),
        }
        (scratch / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        argv = python_argv() + ["-m", "finetune_studio.engine.export.check", str(scratch / "spec.json")]
        log_file = open(scratch / "check.log", "w", encoding="utf-8")  # a file: a chatty child never blocks
        env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log_file, env=env)
        started = time.monotonic()
        while proc.poll() is None:
            timed_out = time.monotonic() - started > TIMEOUT_S
            if (cancel is not None and cancel()) or timed_out:
                proc.kill()
                proc.wait()
                if timed_out:
                    break
                log_file.close()
                raise ExportCancelled("export cancelled during the check; nothing was written")
            time.sleep(0.1)
        log_file.close()
        stderr = (scratch / "check.log").read_text(encoding="utf-8", errors="replace")
        result_path = scratch / "result.json"
        results = json.loads(result_path.read_text(encoding="utf-8")) if result_path.is_file() else None
    first = ref["items"][0]
    reference = {
        "prompts": ref["prompts"],
        "prompt_count": len(ref["items"]),
        "prompt": first["messages"],
        "answer": first["text"],
        "answer_tokens": max(len(item["answer_ids"]) for item in ref["items"]),
        "answers": [item["text"] for item in ref["items"]],
        "ended_at_eot": all(item["ended_at_eot"] for item in ref["items"]),
        "eot_token": ref["eot_token"],
    }
    if results is None:
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        return {
            "passed": False,
            "checked": True,
            "verdict": f"FAILED: the check process ended with code {proc.returncode}: {tail}",
            "reference": reference,
            "merge": merge,
            "forms": [],
            "notes": notes,
        }
    return judge(reference, results, notes, merge)


def _share(n: int, of: int) -> str:
    return f"{n} of {of}" if n == of else f"{n / of:.1%} of {of}" if of else "none of 0"


def judge(reference: dict, results: list[dict], notes: list[str], merge: dict | None = None) -> dict:
    """Per-form pass/fail from the child's measurements (rules in the module docstring), and the verdict text."""
    passed_all = True
    parts = []
    for r in results:
        problems = []
        if r.get("error"):
            problems.append(f"does not load: {r['error']}")
        else:
            prompts = r.get("prompts", 1)
            if not r["prompt_same"]:
                problems.append("its tokenizer or chat template gives a different prompt")
            if r.get("tokenizer_same") is False:
                problems.append(
                    f"llama.cpp splits {r['probes'] - r['probes_same']} of {r['probes']} probe strings into other "
                    f"tokens than the trained tokenizer"
                )
            if not r["stops_on_eot"]:
                problems.append(f"{reference['eot_token']} is not among its stop tokens, so answers would not end")
            agreement = r.get("answer_agreement", r["agreement"])
            if r["approximate"]:
                if agreement < AGREEMENT_MIN:
                    problems.append(
                        f"next-token agreement {agreement:.0%} on answer positions is below {AGREEMENT_MIN:.0%}"
                    )
            elif not r["greedy_same"]:
                differ = prompts - r.get("greedy_same_count", 0)
                problems.append(f"its greedy answer differs from the trained model's on {differ} of {prompts} prompts")
            if reference["ended_at_eot"] and not r["approximate"] and not r["ended_at_eot"]:
                problems.append("its answer does not end at the end-of-turn token")
        r["passed"] = not problems
        r["problems"] = problems
        passed_all &= not problems
        name = r["label"] + (f" ({r['loader']})" if r.get("loader") else "")
        if problems:
            parts.append(f"{name}: " + "; ".join(problems))
        elif r["approximate"]:
            parts.append(
                f"{name}: same next token at {r['agreement']:.1%} of {r.get('positions', 0)} positions "
                f"({agreement:.1%} of the answers' {r.get('answer_positions', 0)}; needs {AGREEMENT_MIN:.0%}), "
                f"same answer on {r.get('greedy_same_count', 0)} of {r.get('prompts', 1)} prompts"
            )
        else:
            parts.append(
                f"{name}: same answer on {r.get('greedy_same_count', 1)} of {r.get('prompts', 1)} prompts, same next "
                f"token at {_share(round(r['agreement'] * r.get('positions', 0)), r.get('positions', 0))} positions"
            )
    ending = (
        f"the answers end at {reference['eot_token']}"
        if reference["ended_at_eot"]
        else f"the trained model did not end every answer within {reference['answer_tokens']} tokens, so ending "
        f"was checked as the declared stop token only"
    )
    verdict = ("passed" if passed_all else "FAILED") + " - " + "; ".join(parts)
    verdict += f" (checked on {reference.get('prompts', 'one prompt')}; {ending})."
    if merge:
        verdict += " " + merge_sentence(merge)
    return {
        "passed": passed_all,
        "checked": True,
        "verdict": verdict,
        "agreement_min": AGREEMENT_MIN,
        "reference": reference,
        "merge": merge,
        "forms": results,
        "notes": notes,
    }


def merge_sentence(merge: dict) -> str:
    """The merged weights' dtype and what rounding keeps of the update, in words."""
    kept, dtype = merge["kept"], merge["dtype"]
    others = ", ".join(f"{d} would keep {kept[d]:.1%}" for d in ("float16", "bfloat16") if d != dtype)
    how = "chosen by the export" if merge["requested"] == "auto" else "as asked"
    return (
        f"Merged weights in {dtype} ({how}) keep the training update in {kept[dtype]:.1%} of the "
        f"{merge['changed_elements']} weights it changed ({others}; a dtype losing it in more than "
        f"{merge['max_lost']:.0%} of a layer's changed weights is refused)."
    )


# --- the child process ---------------------------------------------------------------------------


class TorchForm:
    """A form loaded through PEFT or transformers: logits, greedy answers, its own prompt tokens."""

    def __init__(self, form: dict, folder: Path, base: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = folder / form["path"]
        self.loader = LOADERS[form["kind"]]
        from finetune_studio.engine.models import is_full_model_folder

        model: Any
        if form["kind"] == "adapter" and is_full_model_folder(path):  # a full fine-tune's model: no adapter
            self.loader = LOADERS["merged"]
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(path))
            gen = model.generation_config
        elif form["kind"] == "adapter":
            from finetune_studio.engine.bottleneck import load_adapter_folder
            from finetune_studio.engine.models import load_causal_lm

            base_model = load_causal_lm(
                Path(base), dtype=torch.float32, device="cpu", quantize_4bit=bool(form.get("qlora"))
            )
            model = load_adapter_folder(base_model, path)
            tok_dir = path if (path / "tokenizer_config.json").is_file() else Path(base)
            tok = AutoTokenizer.from_pretrained(str(tok_dir))
            gen = base_model.generation_config
        elif form["kind"] == "merged":
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(path))
            gen = model.generation_config
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            gen = model.generation_config
        stops: set[int | None] = set()
        for value in (
            getattr(gen, "eos_token_id", None),
            getattr(model.config, "eos_token_id", None),
            tok.eos_token_id,
        ):
            stops.update(value if isinstance(value, list) else [value])
        if form["kind"] == "gguf":
            stops.update(_declared_stops(path))
        stops.discard(None)
        self.model, self.tok, self.stops = model.eval(), tok, {int(s) for s in stops if s is not None}
        self.chat_template = bool(tok.chat_template)

    def prompt_ids(self, messages) -> list[int]:
        from finetune_studio.engine.export.build import prompt_ids

        return prompt_ids(self.tok, messages)

    def logits(self, ids: list[int]):
        from finetune_studio.engine.export.build import sequence_logits

        return sequence_logits(self.model, ids)

    def greedy(self, ids: list[int]) -> list[int]:
        from finetune_studio.engine.export.build import greedy

        return greedy(self.model, ids, self.stops)

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))


def _declared_stops(path: Path) -> set[int]:
    """The end tokens a GGUF file declares in its metadata (end of sequence, end of turn)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    out = set()
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        if key in fields:
            out.add(int(fields[key].contents()))
    return out


class LlamaCppForm:
    """A GGUF file loaded through llama.cpp (llama-cpp-python): logits of every position, greedy answers stopped
    where llama.cpp stops (its end-of-generation tokens), prompts rendered with the file's own chat template."""

    loader = LOADERS["llama.cpp"]

    def __init__(self, form: dict, folder: Path, base: str, n_ctx: int):
        import llama_cpp
        from transformers import AutoTokenizer

        self.path = folder / form["path"]
        self.llm = llama_cpp.Llama(
            model_path=str(self.path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, verbose=False, seed=0
        )
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self.template = self.llm.metadata.get("tokenizer.chat_template") or ""
        self.chat_template = bool(self.template)
        self.tok = AutoTokenizer.from_pretrained(base)  # renders the file's template (the same Jinja rules)
        declared = _declared_stops(self.path)
        self.stops = {t for t in declared if self.is_eog(t)}

    def is_eog(self, token: int) -> bool:
        return bool(self._is_eog(self._vocab, token))

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def prompt_ids(self, messages) -> list[int]:
        if not self.template:
            return []
        text = self.tok.apply_chat_template(
            messages, chat_template=self.template, add_generation_prompt=True, tokenize=False
        )
        return self.tokenize(str(text), add_bos=True)  # as llama.cpp's chat path does: BOS when the file asks for it

    def logits(self, ids: list[int]):
        import numpy as np
        import torch

        self.llm.reset()
        self.llm.eval(ids)
        return torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32))

    def greedy(self, ids: list[int]) -> list[int]:
        import numpy as np

        from finetune_studio.engine.export.build import MAX_NEW_TOKENS

        self.llm.reset()
        self.llm.eval(ids)
        out: list[int] = []
        for _ in range(MAX_NEW_TOKENS):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(nxt)
            if self.is_eog(nxt):
                break
            self.llm.eval([nxt])
        return out

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))

    def close(self) -> None:
        self.llm.close()


def _n_ctx(spec: dict) -> int:
    from finetune_studio.engine.export.build import MAX_NEW_TOKENS

    longest = max(len(i["prompt_ids"]) + max(len(i["answer_ids"]), MAX_NEW_TOKENS) for i in spec["items"])
    return -(-(longest + 8) // 64) * 64


def _loader(form: dict) -> str:
    return LOADERS["llama.cpp"] if form["kind"] == "gguf" and llama_cpp_installed() else LOADERS[form["kind"]]


def check_form(form: dict, spec: dict, ref_logits: list) -> dict:
    if form["kind"] == "gguf" and llama_cpp_installed():
        loaded: Any = LlamaCppForm(form, Path(spec["folder"]), spec["base"], _n_ctx(spec))
    else:
        loaded = TorchForm(form, Path(spec["folder"]), spec["base"])
    try:
        return _measure(loaded, form, spec, ref_logits)
    finally:
        if hasattr(loaded, "close"):
            loaded.close()


def _measure(loaded, form: dict, spec: dict, ref_logits: list) -> dict:
    eot = spec["eot_id"]
    positions = agree = answer_positions = answer_agree = same_answers = 0
    max_diff = 0.0
    prompt_same = ended = True
    answers: list[str] = []
    differing: list[dict] = []
    for item, theirs in zip(spec["items"], ref_logits):
        prompt, answer = item["prompt_ids"], item["answer_ids"]
        prompt_same &= loaded.prompt_ids(item["messages"]) == prompt
        mine = loaded.logits(prompt + answer)
        n = len(prompt) + len(answer) - 1  # positions that predict a next token inside the sequence
        same = mine[:n].argmax(-1) == theirs[:n].argmax(-1)
        positions, agree = positions + n, agree + int(same.sum())
        in_answer = same[len(prompt) - 1 :]
        answer_positions, answer_agree = answer_positions + len(in_answer), answer_agree + int(in_answer.sum())
        max_diff = max(max_diff, float((mine[: n + 1] - theirs[: n + 1]).abs().max()))
        own = loaded.greedy(prompt)
        same_answers += own == answer
        if answer and answer[-1] == eot:
            ended &= bool(own) and own[-1] == eot
        answers.append(loaded.decode(own))
        if own != answer and len(differing) < 3:
            differing.append(
                {"prompt": item["messages"][-1]["content"], "trained": loaded.decode(answer), "form": answers[-1]}
            )
    result = {
        "kind": form["kind"],
        "label": _label(form),
        "path": form["path"],
        "loader": loaded.loader,
        "approximate": bool(form.get("approximate")),
        "prompts": len(spec["items"]),
        "prompt_same": prompt_same,
        "chat_template": loaded.chat_template,
        "positions": positions,
        "agreement": agree / positions if positions else 1.0,
        "answer_positions": answer_positions,
        "answer_agreement": answer_agree / answer_positions if answer_positions else 1.0,
        "max_logit_diff": max_diff,
        "greedy_same_count": same_answers,
        "greedy_same": same_answers == len(spec["items"]),
        "ended_at_eot": ended,
        "stops_on_eot": eot in loaded.stops,
        "answer": answers[0] if answers else "",
        "differing": differing,
    }
    if isinstance(loaded, LlamaCppForm):
        same_probes = sum(loaded.tokenize(p["text"]) == p["ids"] for p in spec["probes"])
        result.update(probes=len(spec["probes"]), probes_same=same_probes)
        result["tokenizer_same"] = same_probes == len(spec["probes"])
    return result


def child_main(spec_path: str) -> int:
    from safetensors.torch import load_file

    from finetune_studio.core.paths import drop_checkout_from_path

    drop_checkout_from_path()
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    tensors = load_file(spec["reference"])
    ref_logits = [tensors[f"logits.{i}"] for i in range(len(spec["items"]))]
    results = []
    for form in spec["forms"]:
        try:
            results.append(check_form(form, spec, ref_logits))
        except Exception as exc:  # a form that does not load is a failed check, not a crash
            results.append(
                {
                    "kind": form["kind"],
                    "label": _label(form),
                    "path": form["path"],
                    "loader": _loader(form),
                    "error": f"{type(exc).__name__}: {exc}",
                }
            )
    Path(spec["result"]).write_text(json.dumps(results), encoding="utf-8")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(child_main(sys.argv[1]))
