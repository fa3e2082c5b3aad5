"""The export's check: a fresh process reloads each written form the way people load it, and answers a fixed
chat prompt; its choices are compared with the trained model's.

What is checked, per form:
  * ``prompt_same``: the form's own tokenizer and chat template give the trained model's prompt tokens;
  * ``agreement``: the share of answer positions where the form's next-token choice (teacher-forced along
    the trained model's greedy answer) equals the trained model's, and ``max_logit_diff`` there;
  * ``greedy_same``: the form's own greedy answer is token for token the trained model's;
  * ``stops_on_eot``: the form declares the chat template's end-of-turn token as a stop token, and
    ``ended_at_eot``: its answer ended there.
A 16-bit form (adapter, merged, GGUF f16/f32) passes when the prompt is the same, the greedy answer is the
same and the end-of-turn token stops it; a quantised one (GGUF q8_0 and below, anything merged from QLoRA)
when the prompt is the same, the end-of-turn token stops it and ``agreement >= AGREEMENT_MIN``. When the
trained model itself did not end its answer within the token limit (a barely trained model), the report
says so: ending is then checked only as the declared stop token.

Loaders: the adapter through ``PeftModel.from_pretrained`` on the base, the merged model through
transformers, GGUF files through transformers' GGUF reader (``gguf_file=``). llama-cpp-python is used
too when it is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from finetune_studio.engine.export.errors import ExportCancelled

AGREEMENT_MIN = 0.9
TIMEOUT_S = 1800


def _label(form: dict) -> str:
    return f"gguf-{form['quant']}" if form["kind"] == "gguf" else form["kind"]


def check(build, written: list[dict], folder: Path, notes: list[str], cancel=None) -> dict:
    """Run the check in a child process; the report written as ``check.json``."""
    import importlib.util

    import torch
    from safetensors.torch import save_file

    from finetune_studio.core.paths import python_argv
    from finetune_studio.engine.export.build import CHECK_MESSAGES

    if importlib.util.find_spec("llama_cpp") is None:
        notes = notes + ["llama-cpp-python is not installed: GGUF files were checked through transformers only"]
    ref = build.compute_reference()
    forms = [dict(f, path=str(Path(f["path"]).relative_to(folder))) for f in written]
    with tempfile.TemporaryDirectory(prefix="export-check-") as scratch_name:
        scratch = Path(scratch_name)
        save_file({"logits": ref["logits"].to(torch.float32).contiguous()}, str(scratch / "reference.safetensors"))
        spec = {
            "folder": str(folder),
            "forms": forms,
            "base": str(build.base_folder),
            "messages": CHECK_MESSAGES,
            "prompt_ids": ref["prompt_ids"],
            "answer_ids": ref["answer_ids"],
            "eot_id": ref["eot_id"],
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
    reference = {
        "prompt": CHECK_MESSAGES,
        "answer": ref["text"],
        "answer_tokens": len(ref["answer_ids"]),
        "ended_at_eot": ref["ended_at_eot"],
        "eot_token": ref["eot_token"],
    }
    if results is None:
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        return {
            "passed": False,
            "checked": True,
            "verdict": f"FAILED: the check process ended with code {proc.returncode}: {tail}",
            "reference": reference,
            "forms": [],
            "notes": notes,
        }
    return judge(reference, results, notes)


def judge(reference: dict, results: list[dict], notes: list[str]) -> dict:
    """Per-form pass/fail from the child's measurements (rules in the module docstring)."""
    passed_all = True
    parts = []
    for r in results:
        problems = []
        if r.get("error"):
            problems.append(f"does not load: {r['error']}")
        else:
            if not r["prompt_same"]:
                problems.append("its tokenizer or chat template gives a different prompt")
            if not r["stops_on_eot"]:
                problems.append(f"{reference['eot_token']} is not among its stop tokens, so answers would not end")
            if r["approximate"]:
                if r["agreement"] < AGREEMENT_MIN:
                    problems.append(f"next-token agreement {r['agreement']:.0%} is below {AGREEMENT_MIN:.0%}")
            elif not r["greedy_same"]:
                problems.append("its greedy answer differs from the trained model's")
            if reference["ended_at_eot"] and not r["approximate"] and not r["ended_at_eot"]:
                problems.append("its answer does not end at the end-of-turn token")
        r["passed"] = not problems
        r["problems"] = problems
        passed_all &= not problems
        label = r["label"]
        if problems:
            parts.append(f"{label}: " + "; ".join(problems))
        elif r["approximate"]:
            parts.append(f"{label}: {r['agreement']:.0%} next-token agreement")
        else:
            parts.append(f"{label}: same answer")
    ending = (
        f"the answer ends at {reference['eot_token']}"
        if reference["ended_at_eot"]
        else f"the trained model did not end its answer within {reference['answer_tokens']} tokens, so ending "
        f"was checked as the declared stop token only"
    )
    verdict = ("passed" if passed_all else "FAILED") + " - " + "; ".join(parts) + f" ({ending})"
    return {
        "passed": passed_all,
        "checked": True,
        "verdict": verdict,
        "agreement_min": AGREEMENT_MIN,
        "reference": reference,
        "forms": results,
        "notes": notes,
    }


# --- the child process ---------------------------------------------------------------------------


def _load(form: dict, folder: Path, base: str):
    """(model, tokenizer, stop ids) for one written form, loaded as its users would load it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = folder / form["path"]
    if form["kind"] == "adapter":
        from peft import PeftModel

        from finetune_studio.engine.models import load_causal_lm

        base_model = load_causal_lm(
            Path(base), dtype=torch.float32, device="cpu", quantize_4bit=bool(form.get("qlora"))
        )
        model: Any = PeftModel.from_pretrained(base_model, str(path))
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
    for value in (getattr(gen, "eos_token_id", None), getattr(model.config, "eos_token_id", None), tok.eos_token_id):
        stops.update(value if isinstance(value, list) else [value])
    if form["kind"] == "gguf":
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get("tokenizer.ggml.eot_token_id")
        if field is not None:
            stops.add(int(field.contents()))
    stops.discard(None)
    return model.eval(), tok, stops


def check_form(form: dict, spec: dict, ref_logits) -> dict:
    from finetune_studio.engine.export.build import greedy, prompt_ids, sequence_logits

    model, tok, stops = _load(form, Path(spec["folder"]), spec["base"])
    prompt, answer = spec["prompt_ids"], spec["answer_ids"]
    full = prompt + answer
    logits = sequence_logits(model, full)
    at = slice(len(prompt) - 1, len(full) - 1)  # the positions that predict the answer's tokens
    mine, theirs = logits[at], ref_logits[at]
    agreement = float((mine.argmax(-1) == theirs.argmax(-1)).float().mean())
    own = greedy(model, prompt, stops)
    eot = spec["eot_id"]
    return {
        "kind": form["kind"],
        "label": _label(form),
        "path": form["path"],
        "approximate": bool(form.get("approximate")),
        "prompt_same": prompt_ids(tok, spec["messages"]) == prompt,
        "chat_template": bool(tok.chat_template),
        "agreement": agreement,
        "max_logit_diff": float((mine - theirs).abs().max()),
        "greedy_same": own == answer,
        "ended_at_eot": bool(own) and own[-1] == eot,
        "stops_on_eot": eot in stops,
        "answer": tok.decode(own, skip_special_tokens=True),
    }


def child_main(spec_path: str) -> int:
    from safetensors.torch import load_file

    from finetune_studio.core.paths import drop_checkout_from_path

    drop_checkout_from_path()
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    ref_logits = load_file(spec["reference"])["logits"]
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
