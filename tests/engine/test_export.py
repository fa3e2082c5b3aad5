"""Export: where it may write (never over someone's data), which checkpoint, every form reloaded and compared,
the GGUF's metadata, the Ollama template, the model card, and the unwritable / full-disk / cancel cases."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import tiny_config, write_sft

from finetune_studio.core import paths
from finetune_studio.core.export_target import MARKER, ExportTargetError, check_target, read_marker
from finetune_studio.core.protocol import events as ev
from finetune_studio.engine.export.check import llama_cpp_installed
from finetune_studio.engine.export.writer import ExportCancelled, ExportError, ExportRequest, export, find_source

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def trained(tiny_model_dir, tmp_path_factory):
    """One short run (checkpoints and evaluations at steps 2 and 4, final adapter at 6) in its own data dir."""
    from finetune_studio.engine.train.recipe import train_run
    from finetune_studio.engine.train.reporting import Reporter

    home = tmp_path_factory.mktemp("trained-home")
    old = os.environ.get(paths.ENV_HOME)
    os.environ[paths.ENV_HOME] = str(home)
    try:
        data = write_sft(home / "sft.jsonl")
        cfg = tiny_config(tiny_model_dir, data, max_steps=6, checkpoint_every=2, eval_every=2, learning_rate=2e-2)
        result = train_run(cfg, reporter=Reporter())
    finally:
        if old is None:
            os.environ.pop(paths.ENV_HOME)
        else:
            os.environ[paths.ENV_HOME] = old
    return {"home": home, "run_id": result.run_id, "run_dir": result.run_dir, "dataset": data, "config": cfg}


@pytest.fixture
def run_id(trained, studio_home):
    """The trained run, seen from this test's own data directory (its database copied; the runs folder shared: the
    database records run folders relative to the data directory)."""
    shutil.copy2(trained["home"] / "studio.sqlite3", studio_home / "studio.sqlite3")
    (studio_home / "runs").symlink_to(trained["home"] / "runs")
    return trained["run_id"]


# --- safety -------------------------------------------------------------------------------------


def test_refuses_the_data_dir_its_parents_home_and_folders_that_are_not_exports(studio_home, tmp_path):
    (studio_home / "studio.sqlite3").write_text("precious")
    for place, why in [
        (studio_home, "data directory"),
        (studio_home.parent, "holds the studio's data directory"),
        (Path.home(), "home folder"),
        (Path("/"), "will not export into /"),
    ]:
        with pytest.raises(ExportTargetError, match=why):
            check_target(place, force=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ExportTargetError, match="not empty and is not a previous export"):
        check_target(mine, force=True)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ExportTargetError, match="is a file"):
        check_target(tmp_path / "a-file", force=True)
    assert check_target(tmp_path / "new", force=False) == (tmp_path / "new").resolve()
    (tmp_path / "empty").mkdir()
    assert check_target(tmp_path / "empty", force=False).is_dir()
    assert (studio_home / "studio.sqlite3").read_text() == "precious" and (mine / "notes.txt").is_file()


def test_cli_export_force_into_the_data_dir_removes_nothing(run_id, studio_home, trained):
    before = sorted(p.name for p in studio_home.iterdir())
    out = subprocess.run(
        [sys.executable, "-P", "-m", "finetune_studio.engine", "export", run_id, str(studio_home), "--force"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, paths.ENV_HOME: str(studio_home)},
    )
    assert out.returncode == 1, out.stderr
    failed = ev.parse_event(out.stdout.strip().splitlines()[-1])
    assert failed.type == "failed" and "data directory" in failed.message
    assert sorted(p.name for p in studio_home.iterdir()) == before
    assert (studio_home / "studio.sqlite3").stat().st_size > 0 and Path(trained["run_dir"], "adapter").is_dir()


def test_a_previous_export_is_replaced_and_nothing_else(run_id, studio_home):
    first = export(ExportRequest(run=run_id, check=False))
    assert first.path == studio_home / "exports" / first.path.name and first.path.name.endswith("-final")
    marker = read_marker(first.path)
    assert marker and set(marker["files"]) == {str(p.relative_to(first.path)) for p in first.path.rglob("*")} - {MARKER}
    with pytest.raises(ExportError, match="not empty: it holds a previous export"):
        export(ExportRequest(run=run_id, check=False))
    (first.path / "adapter_model.safetensors").write_bytes(b"stale")  # an old export's file: replaced
    second = export(ExportRequest(run=run_id, check=False, force=True))
    assert second.path == first.path and (second.path / "adapter_model.safetensors").read_bytes() != b"stale"
    (second.path / "my-notes.txt").write_text("keep me")  # someone's own file inside: refused, untouched
    with pytest.raises(ExportError, match="my-notes.txt"):
        export(ExportRequest(run=run_id, check=False, force=True))
    assert (second.path / "my-notes.txt").read_text() == "keep me"
    assert [p.name for p in second.path.parent.iterdir()] == [second.path.name]  # no temporary folders left


# --- which checkpoint ---------------------------------------------------------------------------


def test_checkpoint_by_step_best_and_default(run_id, trained):
    from finetune_studio.core.store import Store

    assert find_source(run_id).label == "final" and find_source(run_id).step == 6
    four = find_source(run_id, "4")
    want = Path(trained["run_dir"]) / "checkpoints" / "step-000004"
    assert four.label == "step-000004" and four.folder.resolve() == want.resolve()
    store = Store()
    evals = {m["step"]: m["eval_loss"] for m in store.metrics(run_id, "eval")}
    store.close()
    assert find_source(run_id, "best").step == min((4, 6, 2), key=lambda s: evals[s])
    with pytest.raises(ExportError, match="saved steps: 2, 4, 6"):
        find_source(run_id, "3")
    out = export(ExportRequest(run=run_id, checkpoint="4", check=False))
    assert out.path.name.endswith("step-000004")
    src = Path(trained["run_dir"]) / "checkpoints" / "step-000004" / "adapter_model.safetensors"
    assert (out.path / "adapter_model.safetensors").read_bytes() == src.read_bytes()


# --- every form, reloaded -------------------------------------------------------------------------


def _go_render(template: str, messages: list[dict]) -> str:
    """Evaluate the Go-template subset the Modelfile uses (if/else if on .Role, range .Messages, .Content)."""
    tokens = re.split(r"({{.*?}})", template)
    pos = 0

    def block(msg, stop):
        nonlocal pos
        out = ""
        while pos < len(tokens):
            t = tokens[pos]
            pos += 1
            if not t.startswith("{{"):
                out += t
                continue
            action = t[2:-2].strip()
            if action in stop or action.startswith("else"):
                pos -= 1
                return out
            if action == ".Content":
                out += msg["content"]
            elif action == "range .Messages":
                start = pos
                for m in messages:
                    pos = start
                    out += block(m, ("end",))
                if not messages:
                    block(None, ("end",))
                pos += 1
            elif action.startswith("if "):
                out += conditional(action[3:], msg)
            else:
                raise AssertionError(f"unexpected action {action}")
        return out

    def test(cond, msg):
        m = re.fullmatch(r'eq \.Role "(\w+)"', cond)
        if m:
            return msg["role"] == m.group(1)
        m = re.fullmatch(r'ne \(index \.Messages 0\)\.Role "(\w+)"', cond)
        assert m, cond
        return messages[0]["role"] != m.group(1)

    def conditional(cond, msg):
        nonlocal pos
        chosen, taken = "", False
        while True:
            body = block(msg, ("end",))
            if not taken and test(cond, msg):
                chosen, taken = body, True
            action = tokens[pos][2:-2].strip()
            pos += 1
            if action == "end":
                return chosen
            cond = action.removeprefix("else if ").strip()

    return block(None, ())


CONVERSATIONS = (  # with and without a system prompt, one and several turns
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 plus 3?"},
    ],
    [
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": '{"colour": "blue"}'},
        {"role": "user", "content": "Another."},
        {"role": "assistant", "content": '{"colour": "red"}'},
        {"role": "user", "content": "Two more,\nplease."},
    ],
)


def test_every_format_is_written_reloaded_and_checked(run_id, trained, tiny_model_dir):
    from gguf import GGUFReader
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    progress = []
    out = export(
        ExportRequest(run=run_id, formats=("merged", "ollama"), quants=("f16", "q8_0")),
        progress=lambda *a: progress.append(a),
    )
    report = json.loads((out.path / "check.json").read_text())
    forms = {f["label"]: f for f in report["forms"]}
    assert report["passed"], report["verdict"]
    assert set(forms) == {"adapter", "merged", "gguf-f16", "gguf-q8_0"}
    prompts = report["reference"]["prompt_count"]
    assert prompts >= 3 and "validation prompts" in report["reference"]["prompts"]
    for label in ("adapter", "merged", "gguf-f16"):  # 16-bit forms: the trained model's greedy answers exactly
        form = forms[label]
        assert form["greedy_same"] and form["greedy_same_count"] == form["prompts"] == prompts
        assert form["prompt_same"] and form["stops_on_eot"] and form["agreement"] == 1.0
        assert form["positions"] > form["answer_positions"] > 0
    assert forms["gguf-q8_0"]["approximate"] and 0.9 <= forms["gguf-q8_0"]["answer_agreement"] <= 1.0
    assert forms["adapter"]["max_logit_diff"] < 1e-4 and forms["merged"]["max_logit_diff"] < 0.05
    assert report["reference"]["answer"] and progress[-1][1] == progress[-1][2]
    merge = report["merge"]  # the default dtype keeps the update; the figures are in the verdict
    assert merge["dtype"] in ("float16", "float32") and merge["kept"][merge["dtype"]] >= 0.99
    assert f"Merged weights in {merge['dtype']}" in report["verdict"]
    gguf_loader = "llama.cpp" if llama_cpp_installed() else "transformers' GGUF reader"
    assert forms["gguf-f16"]["loader"] == forms["gguf-q8_0"]["loader"] == gguf_loader
    assert f"gguf-q8_0 ({gguf_loader})" in report["verdict"] and "merged (transformers)" in report["verdict"]
    if llama_cpp_installed():  # llama.cpp itself: same tokens as the trained tokenizer on every probe string
        assert forms["gguf-f16"]["tokenizer_same"] and forms["gguf-q8_0"]["probes_same"] >= 5 + prompts

    # Independently of the check: the trained model (base + run's adapter) against the written forms.
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    trained_model = PeftModel.from_pretrained(base, str(Path(trained["run_dir"]) / "adapter")).eval()
    gguf_dir = out.path / "gguf"
    f16 = next(gguf_dir.glob("*-f16.gguf"))
    with torch.no_grad():
        want = trained_model(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(out.path / "merged"), dtype=torch.float32)(ids).logits
        from_gguf = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=f16.name, dtype=torch.float32)
        gguf_logits = from_gguf(ids).logits
    assert torch.allclose(merged, want, atol=0.05) and torch.allclose(gguf_logits, want, atol=0.05)
    assert (merged.argmax(-1) == want.argmax(-1)).all() and (gguf_logits.argmax(-1) == want.argmax(-1)).all()

    # The GGUF carries the tokenizer, the chat template and the special tokens.
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    fields = GGUFReader(str(f16)).fields
    assert fields["tokenizer.chat_template"].contents() == tok.chat_template
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tok.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.eot_token_id"].contents() == tok.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.bos_token_id"].contents() == tok.bos_token_id
    assert fields["tokenizer.ggml.add_bos_token"].contents() is (tok("a").input_ids[0] == tok.bos_token_id)
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert types[tokens.index(special)] == 3  # CONTROL
    gguf_tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=f16.name)
    sample = 'What is 12 plus 12? {"answer": 24}'
    assert gguf_tok(sample).input_ids == tok(sample).input_ids

    # A Modelfile per GGUF: its template renders the model's chat template's text; its stop token ends the turn.
    q8 = next(gguf_dir.glob("*-q8_0.gguf"))
    for name, gguf_file in (("Modelfile", f16), ("Modelfile.q8_0", q8)):
        modelfile = (gguf_dir / name).read_text()
        assert f"FROM ./{gguf_file.name}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
        template = re.search(r'TEMPLATE """(.*?)"""', modelfile, re.S).group(1)
        for conv in CONVERSATIONS:
            want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            assert _go_render(template, conv) == want

    # The model card names the real settings.
    card = (out.path / "README.md").read_text()
    from finetune_studio.engine.export.card import file_sha256

    cfg = trained["config"]
    assert file_sha256(trained["dataset"]) in card and f"| lora_rank | `{cfg.lora_rank}` |" in card
    assert f"| learning_rate | `{cfg.learning_rate}` |" in card and "| Steps | 6 of 6 |" in card
    assert "| Best eval loss |" in card and "transformers" in card and str(tiny_model_dir) in card
    assert "ollama create my-model -f Modelfile" in card and "ollama create my-model-q8_0 -f Modelfile.q8_0" in card
    assert "ollama run my-model" in card and f"Stored in {merge['dtype']} (chosen by the export)" in card


def test_a_gguf_that_would_never_stop_fails_the_check_and_keeps_its_files(run_id, monkeypatch):
    """The classic conversion bug: the file names <|endoftext|> as its end token while the chat template ends
    turns with <|im_end|>, so llama.cpp and Ollama never stop. The check must catch it, keep the files and
    mark the export failed."""
    import gguf

    monkeypatch.setattr(gguf.GGUFWriter, "add_eot_token_id", lambda self, _id: None)
    real_eos = gguf.GGUFWriter.add_eos_token_id
    monkeypatch.setattr(gguf.GGUFWriter, "add_eos_token_id", lambda self, _id: real_eos(self, 0))  # <|endoftext|>
    out = export(ExportRequest(run=run_id, formats=("gguf",), quants=("f16",)))
    report = json.loads((out.path / "check.json").read_text())
    forms = {f["label"]: f for f in report["forms"]}
    assert not report["passed"] and report["verdict"].startswith("FAILED")
    assert forms["adapter"]["passed"] and not forms["gguf-f16"]["passed"]
    assert "<|im_end|> is not among its stop tokens" in report["verdict"]
    assert next((out.path / "gguf").glob("*.gguf")).is_file() and read_marker(out.path)


def test_check_rules():
    from finetune_studio.engine.export.check import judge

    ref = {"ended_at_eot": True, "eot_token": "<|im_end|>", "answer_tokens": 3, "answer": "4.", "prompts": "3 prompts"}
    good = dict(
        prompt_same=True,
        stops_on_eot=True,
        greedy_same=True,
        greedy_same_count=3,
        prompts=3,
        ended_at_eot=True,
        agreement=1.0,
        answer_agreement=1.0,
        positions=120,
        answer_positions=30,
    )
    results = [
        dict(good, label="merged", loader="transformers", approximate=False),
        dict(good, label="gguf-q4_0", loader="llama.cpp", approximate=True, greedy_same=False, greedy_same_count=1)
        | dict(ended_at_eot=False, agreement=0.8, answer_agreement=0.95, tokenizer_same=True, probes=8, probes_same=8),
    ]
    passed = judge(ref, [dict(r) for r in results], [])
    assert passed["passed"] and "merged (transformers): same answer on 3 of 3 prompts" in passed["verdict"]
    assert (
        "gguf-q4_0 (llama.cpp): same next token at 80.0% of 120 positions (95.0% of the answers'" in passed["verdict"]
    )
    bad = judge(ref, [dict(good, label="merged", approximate=False, ended_at_eot=False, stops_on_eot=False)], [])
    assert not bad["passed"] and "not among its stop tokens" in bad["verdict"] and "does not end" in bad["verdict"]
    low = judge(ref, [dict(good, label="gguf-q4_0", approximate=True, answer_agreement=0.5)], [])
    assert not low["passed"] and "50%" in low["verdict"]
    differs = judge(ref, [dict(good, label="merged", approximate=False, greedy_same=False, greedy_same_count=1)], [])
    assert not differs["passed"] and "differs from the trained model's on 2 of 3 prompts" in differs["verdict"]
    split = judge(ref, [dict(results[1], tokenizer_same=False, probes_same=6)], [])
    assert not split["passed"] and "llama.cpp splits 2 of 8 probe strings into other tokens" in split["verdict"]


def test_ollama_refuses_a_template_it_cannot_write():
    from tiny_model import build_tokenizer

    from finetune_studio.engine.export.ollama import go_template, learn_pieces, write_modelfile

    tok = build_tokenizer()
    assert "{{ .Content }}" in go_template(learn_pieces(tok))
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
        "{% if loop.last %}{{ ' (last)' }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(ExportError, match="cannot write this chat template as an Ollama template"):
        write_modelfile(tok, Path("x.gguf"), Path("/nonexistent/Modelfile"))


# --- unwritable, full disk, cancel ----------------------------------------------------------------


def test_unwritable_place_is_a_clear_message(run_id, tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ExportError, match="cannot write the export"):
        export(ExportRequest(run=run_id, out=tmp_path / "a-file" / "export", check=False))
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ExportError, match="choose a folder you can write to"):
            export(ExportRequest(run=run_id, out=locked / "export", check=False))


def test_full_disk_leaves_nothing_half_written_and_keeps_the_previous_export(run_id, tmp_path, monkeypatch):
    from finetune_studio.engine.export import writer as export_module

    target = tmp_path / "exports" / "mine"
    export(ExportRequest(run=run_id, out=target, check=False))
    before = (target / "adapter_model.safetensors").read_bytes()
    real_copy = shutil.copy2

    def copy_then_fill_the_disk(src, dst, *a, **kw):
        real_copy(src, dst, *a, **kw)
        if str(dst).endswith(".safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_module.shutil, "copy2", copy_then_fill_the_disk)
    with pytest.raises(ExportError, match="is full"):
        export(ExportRequest(run=run_id, out=target, check=False, force=True))
    with pytest.raises(ExportError, match="is full"):
        export(ExportRequest(run=run_id, out=tmp_path / "exports" / "fresh", check=False))
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["mine"]  # no temporary folder, no "fresh"
    assert (target / "adapter_model.safetensors").read_bytes() == before and read_marker(target)


def test_cancel_leaves_nothing_behind(run_id, tmp_path):
    seen = []
    with pytest.raises(ExportCancelled):
        export(
            ExportRequest(run=run_id, out=tmp_path / "out" / "x", formats=("gguf",), quants=("f16",)),
            progress=lambda stage, done, total, msg: seen.append(done),
            cancel=lambda: len(seen) >= 2,
        )
    assert list((tmp_path / "out").iterdir()) == []


def test_export_result_event_round_trips():
    event = ev.ExportResult(
        run_id="r", path="/x", passed=False, verdict="FAILED - gguf-q8_0: ...", formats=["adapter", "gguf-q8_0"]
    )
    assert ev.parse_event(event.to_json()) == event


def test_qlora_is_merged_onto_its_dequantised_base_and_the_difference_is_reported(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune_studio.engine.models import load_causal_lm
    from finetune_studio.engine.train.recipe import train_run
    from finetune_studio.engine.train.reporting import Reporter

    cfg = tiny_config(tiny_model_dir, write_sft(tmp_path / "d.jsonl"), max_steps=3, method="qlora", learning_rate=3e-2)
    run = train_run(cfg, reporter=Reporter())
    out = export(ExportRequest(run=run.run_id, out=tmp_path / "q", formats=("merged",), dtype="float32", check=False))
    note = next(n for n in out.report["notes"] if n.startswith("QLoRA"))
    assert "de-quantised NF4 base" in note and "max |logit difference|" in note
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    nf4 = load_causal_lm(tiny_model_dir, dtype=torch.float32, device="cpu", quantize_4bit=True)
    trained_model = PeftModel.from_pretrained(nf4, str(run.adapter_dir)).eval()
    original = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    onto_original = PeftModel.from_pretrained(original, str(run.adapter_dir)).eval()
    with torch.no_grad():
        want = trained_model(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(out.path / "merged"), dtype=torch.float32)(ids).logits
        naive = onto_original(ids).logits
    merged_err, naive_err = (merged - want).abs().max().item(), (naive - want).abs().max().item()
    print(f"QLoRA merge: dequantised base {merged_err:.2e}, original base {naive_err:.2e}")
    # The 4-bit model computes through bitsandbytes' CPU kernel (bfloat16 inside), hence a few 1e-3.
    assert merged_err < 1e-2 and merged_err * 5 < naive_err


def test_cli_cancel_by_sigterm_leaves_nothing_behind(run_id, studio_home, tmp_path):
    import signal

    target = tmp_path / "out" / "x"
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "finetune_studio.engine", "export", run_id, str(target), "--format", "gguf"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, paths.ENV_HOME: str(studio_home)},
    )
    first = ev.parse_event(proc.stdout.readline())
    assert first.type == "progress"
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read().strip().splitlines()
    assert proc.wait(timeout=120) == 130
    assert ev.parse_event(rest[-1]).kind == "cancelled"
    assert list((tmp_path / "out").iterdir()) == []
