"""`python -m finetune_studio.engine` as the app runs it: events on stdout, failures as `failed` events, SIGTERM."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from engine_helpers import tiny_config, write_sft

from finetune_studio.core import process_env
from finetune_studio.core.protocol.events import parse_event
from finetune_studio.core.store import Store

ROOT = Path(__file__).resolve().parents[2]


def engine(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-m", "finetune_studio.engine", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def events_of(stdout: str) -> list:
    return [parse_event(line) for line in stdout.splitlines() if line.strip()]


def write_config(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_train_prints_only_events_and_records_the_run(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, write_sft(tmp_path / "d.jsonl"), max_steps=3, checkpoint_every=2)
    out = engine("train", str(write_config(tmp_path / "c.json", cfg.to_dict())))
    assert out.returncode == 0, out.stderr[-2000:]
    events = events_of(out.stdout)  # every stdout line parses as an event
    kinds = [e.type for e in events]
    assert kinds.index("started") < kinds.index("step") and kinds[-1] == "finished"
    started = events[kinds.index("started")]
    assert Path(started.run_dir).is_dir() and started.run_id
    assert "checkpoint" in kinds
    assert Store().get_run(started.run_id)["status"] == "completed"
    logged = (Path(started.run_dir) / "events.jsonl").read_text().splitlines()
    assert [json.loads(x)["type"] for x in logged][-1] == "finished"


def test_unknown_config_field_fails_naming_it(tmp_path):
    out = engine("train", str(write_config(tmp_path / "c.json", {"dataset": "x.jsonl", "batchsize": 4})))
    assert out.returncode == 2
    failed = events_of(out.stdout)[-1]
    assert failed.type == "failed" and failed.kind == "config"
    assert "batchsize" in failed.message and "batch_size" in failed.message
    assert "Traceback" not in out.stderr


def test_missing_dataset_fails_and_marks_the_run(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "nowhere.jsonl")
    out = engine("train", str(write_config(tmp_path / "c.json", cfg.to_dict())))
    assert out.returncode == 1
    failed = events_of(out.stdout)[-1]
    assert failed.type == "failed" and failed.kind == "data" and "nowhere.jsonl" in failed.message
    assert Store().get_run(failed.run_id)["status"] == "failed"


def test_pickle_checkpoint_is_refused_unless_allowed(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pickled = tmp_path / "pickled-model"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(pickled, safe_serialization=False)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(pickled)
    for f in pickled.glob("*.safetensors"):  # transformers may still write safetensors: keep only the pickle
        f.unlink()
    if not list(pickled.glob("*.bin")):
        import torch

        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    data = write_sft(tmp_path / "d.jsonl")
    out = engine("train", str(write_config(tmp_path / "c.json", tiny_config(pickled, data).to_dict())))
    assert out.returncode == 1
    failed = events_of(out.stdout)[-1]
    assert failed.kind == "model" and "pickle" in failed.message and "allow_pickle" in failed.message


def test_sigterm_checkpoints_marks_stopped_and_exits_zero(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, write_sft(tmp_path / "d.jsonl"), max_steps=100000)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-P",
            "-m",
            "finetune_studio.engine",
            "train",
            str(write_config(tmp_path / "c.json", cfg.to_dict())),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    seen, environ = [], []
    for line in proc.stdout:
        seen.append(parse_event(line))
        if seen[-1].type == "step" and seen[-1].step >= 2:
            environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0
    seen += events_of(rest)
    finished = seen[-1]
    assert finished.type == "finished" and finished.status == "stopped"
    assert any(e.type == "checkpoint" and e.step == finished.step for e in seen)
    run = Store().get_run(finished.run_id)
    assert run["status"] == "stopped" and run["step"] == finished.step
    if process_env.uses_glibc() and "GLIBC_TUNABLES" not in os.environ:
        # started by hand, the run restarted itself with glibc's malloc settings (glibc shows the first of them
        # in /proc/PID/environ once it has read them)
        assert any(e.startswith(b"GLIBC_TUNABLES=glibc.malloc.tcache_count=0") for e in environ)


def test_resume_of_unknown_run_is_a_clear_failure():
    out = engine("train", "--resume", "nope")
    assert out.returncode == 2 and "no run named 'nope'" in events_of(out.stdout)[-1].message


def test_model_info_describes_a_folder_and_explains_a_missing_one(tiny_model_dir, tmp_path):
    out = engine("model", "info", str(tiny_model_dir))
    info = events_of(out.stdout)[-1]
    assert out.returncode == 0 and info.type == "model"
    assert info.layers == 2 and info.hidden_size == 64 and info.parameters > 0
    missing = engine("model", "info", "someone/not-cached-model")
    assert missing.returncode == 1 and "not in the local Hugging Face cache" in events_of(missing.stdout)[-1].message


def test_export_cli(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, write_sft(tmp_path / "d.jsonl"), max_steps=2)
    run = engine("train", str(write_config(tmp_path / "c.json", cfg.to_dict())))
    run_id = events_of(run.stdout)[-1].run_id
    out = engine("export", run_id, str(tmp_path / "adapter"))
    assert out.returncode == 0 and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    result = events_of(out.stdout)[-1]
    assert result.type == "export" and result.passed and result.path == str((tmp_path / "adapter").resolve())
    assert "Check: passed" in out.stderr and (tmp_path / "adapter" / "check.json").is_file()
    again = engine("export", run_id, str(tmp_path / "adapter"))
    assert again.returncode == 1 and "not empty" in again.stderr


def test_run_goes_on_when_its_reader_goes_away(tiny_model_dir, tmp_path):
    """The app lets a run continue and exits: stdout and stderr close; training completes, logs land in a file."""
    cfg = tiny_config(tiny_model_dir, write_sft(tmp_path / "d.jsonl"), max_steps=12)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-P",
            "-m",
            "finetune_studio.engine",
            "train",
            str(write_config(tmp_path / "c.json", cfg.to_dict())),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:
        event = parse_event(line)
        if event.type == "started":
            run_id, run_dir = event.run_id, Path(event.run_dir)
        if event.type == "step":
            break
    proc.stdout.close()
    proc.stderr.close()
    assert proc.wait(timeout=240) == 0
    run = Store().get_run(run_id)
    assert run["status"] == "completed" and run["step"] == 12
    assert len(Store().metrics(run_id)) == 12
    assert "event stream closed" in (run_dir / "engine.log").read_text()
