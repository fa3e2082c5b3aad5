"""A person's files under faults (issue 22, item 7): exports that would overwrite them, shell lines smuggled into a
SLURM script, a lone surrogate in a data file, a damaged database, the order of a run's last records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from engine_helpers import tiny_config, write_sft

from finetune_studio.core.store import Store
from finetune_studio.engine.cli import data as data_cli
from finetune_studio.engine.cli import pairs as pairs_cli


def _store_with_pairs(n: int = 3) -> None:
    store = Store()
    store.add_pairs([{"prompt": f"Say {i}.", "chosen": f"{i}", "rejected": f"not {i}"} for i in range(n)])
    store.close()


# --- pairs export and data convert never replace a person's files ---------------------------------------------


def test_pairs_export_refuses_a_folder_of_someone_elses_files_unless_forced(tmp_path, capsys):
    _store_with_pairs()
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "pairs.jsonl").write_text("my own data\n")
    (folder / "notes.txt").write_text("keep me\n")
    assert pairs_cli.main(["export", str(folder), "--format", "trl"]) == 1
    err = capsys.readouterr().err
    assert str(folder) in err and "--force" in err and "empty folder" in err
    assert (folder / "pairs.jsonl").read_text() == "my own data\n"
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "pairs.jsonl"]
    assert pairs_cli.main(["export", str(folder), "--format", "trl", "--force"]) == 0
    assert len((folder / "pairs.jsonl").read_text().splitlines()) == 3
    assert (folder / "notes.txt").read_text() == "keep me\n"


def test_pairs_export_replaces_its_own_previous_export(tmp_path):
    _store_with_pairs()
    folder = tmp_path / "export"
    assert pairs_cli.main(["export", str(folder), "--format", "trl"]) == 0
    assert pairs_cli.main(["export", str(folder), "--format", "llama-factory"]) == 0  # no --force needed
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["dataset_info.json", "pairs.json", "snapshot.json"]  # the trl file of the first is gone
    assert json.loads((folder / "snapshot.json").read_text())["format"] == "llama-factory"


def test_pairs_export_refuses_a_file_given_as_the_folder(tmp_path, capsys):
    _store_with_pairs()
    target = tmp_path / "a-file"
    target.write_text("x")
    assert pairs_cli.main(["export", str(target), "--format", "trl", "--json"]) == 1
    assert "not a folder" in json.loads(capsys.readouterr().out.splitlines()[-1])["message"]
    assert target.read_text() == "x"


def test_data_convert_refuses_an_existing_out_unless_forced(tmp_path, capsys):
    data = write_sft(tmp_path / "d.jsonl", n=4)
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    assert data_cli.main(["convert", str(data), str(out), "--to", "trl"]) == 1
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err
    assert out.read_text() == "precious\n"
    assert data_cli.main(["convert", str(data), str(out), "--to", "trl", "--force"]) == 0
    assert len(out.read_text().splitlines()) == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


# --- the last records of a run ---------------------------------------------------------------------------------


def test_the_finished_event_is_written_before_the_store_says_completed(tmp_path, tiny_model_dir):
    """A kill between the two writes must never leave 'completed' with no finished event in events.jsonl."""
    from finetune_studio.engine.train.recipe import train_run
    from finetune_studio.engine.train.reporting import Reporter

    seen = {}

    def listener(event):  # called after the event reached events.jsonl
        if event.type == "finished":
            run = Store().get_run(event.run_id)
            seen["status"] = run.status.value
            lines = (Path(run.run_dir) / "events.jsonl").read_text().splitlines()
            seen["last"] = json.loads(lines[-1])["type"]

    config = tiny_config(tiny_model_dir, write_sft(tmp_path / "d.jsonl", n=12), max_steps=1)
    result = train_run(config, reporter=Reporter(extra=listener))
    assert seen["last"] == "finished"
    assert seen["status"] != "completed"  # the store said completed only after the event was on disk
    assert Store().get_run(result.run_id).status.value == "completed"


# --- the SLURM script: a value is one value, never a shell line ----------------------------------------------


def _slurm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-m", "finetune_studio.engine", "slurm", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("option", ["--job-name", "--partition", "--time", "--home"])
def test_a_line_break_in_a_slurm_option_is_refused(tmp_path, option):
    config = tmp_path / "c.json"
    config.write_text("{}")
    out = _slurm(str(config), option, "x\ntouch /tmp/owned")
    assert out.returncode == 2 and out.stdout == ""
    assert option.removeprefix("--").replace("-", " ") in out.stderr and "line break" in out.stderr
    assert "Traceback" not in out.stderr


def test_slurm_values_with_spaces_stay_one_value(tmp_path):
    config = tmp_path / "c.json"
    config.write_text("{}")
    out = _slurm(str(config), "--job-name", "my run; rm -rf ~", "--partition", "gpu,debug")
    assert out.returncode == 0, out.stderr
    assert '#SBATCH --job-name="my run; rm -rf ~"' in out.stdout.splitlines()
    assert "#SBATCH --partition=gpu,debug" in out.stdout.splitlines()
    refused = _slurm(str(config), "--partition", "gpu --exclusive")
    assert refused.returncode == 2 and "partition" in refused.stderr


# --- a lone surrogate escape drops its row, not the file --------------------------------------------------------

SURROGATE_ROW = '{"prompt": "\\ud800 half a pair", "chosen": "c", "rejected": "r"}'


def _surrogate_file(path: Path, as_list: bool = False) -> Path:
    rows = [json.dumps({"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"}) for i in range(3)]
    rows.insert(1, SURROGATE_ROW)
    path.write_text(("[\n" + ",\n".join(rows) + "\n]\n") if as_list else "\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("as_list", [False, True], ids=["jsonl", "json-list"])
def test_a_lone_surrogate_is_a_problem_of_its_line(tmp_path, tiny_model_dir, capsys, as_list):
    data = _surrogate_file(tmp_path / ("d.json" if as_list else "d.jsonl"), as_list)
    assert data_cli.main(["inspect", str(data), "--model", str(tiny_model_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["type"] == "dataset_report" and report["rows"] == 3
    (problem,) = [p for p in report["problems"] if p["level"] == "dropped"]
    assert problem["line"] == (3 if as_list else 2)
    assert "\\ud800" in problem["message"] and "prompt" in problem["message"]


def test_pairs_import_keeps_the_other_rows_of_a_file_with_a_lone_surrogate(tmp_path, capsys):
    data = _surrogate_file(tmp_path / "pairs.jsonl")
    assert pairs_cli.main(["import", str(data), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["added"] == 3 and sum(summary["dropped"].values()) == 1
    assert len(Store().pairs()) == 3


# --- the dataset panel's check of a file whose name reads as an option ---------------------------------------


def test_the_dataset_panels_check_reads_a_file_named_like_an_option(
    qtbot, tmp_path, tiny_model_dir, monkeypatch, capsys
):
    """The panel's arguments, run by the real `data inspect`: a file named ``-h`` is read, not taken for help."""
    from finetune_studio.studio.state.setup import SetupState
    from finetune_studio.studio.widgets.dataset_panel import DatasetPanel

    monkeypatch.chdir(tmp_path)
    write_sft(tmp_path / "-h", n=6)
    panel = DatasetPanel(SetupState({"dataset": "-h", "model": str(tiny_model_dir)}))
    qtbot.addWidget(panel)
    asked: list[tuple[str, ...]] = []
    panel.job.command = lambda *args: asked.append(args) or [sys.executable, "-c", "pass"]
    panel.inspect()
    (args,) = asked
    assert args[:2] == ("data", "inspect")
    assert data_cli.main(list(args[1:])) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["type"] == "dataset_report" and report["file"] == "-h" and report["rows"] == 6


# --- a damaged database: a message naming the file and `db recover`, never a traceback ---------------------------


def _damage_database() -> Path:
    from finetune_studio.core import paths

    Store().close()
    path = paths.db_path()
    with open(path, "r+b") as fh:
        fh.write(b"this is no SQLite header, a failing disk wrote it" * 2)
    return path


@pytest.mark.parametrize(
    "command",
    [["pairs", "stats"], ["pairs", "export", "OUT", "--format", "trl"], ["runs", "lineage", "someid"]],
    ids=["pairs stats", "pairs export", "runs lineage"],
)
def test_a_damaged_database_is_named_with_db_recover(tmp_path, capsys, command):
    from finetune_studio.engine.cli import runs as runs_cli

    path = _damage_database()
    main = pairs_cli.main if command[0] == "pairs" else runs_cli.main
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in command[1:]]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "db recover" in err
    assert main([*argv, "--json"]) == 1
    failed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert failed["type"] == "failed" and failed["kind"] == "database" and "db recover" in failed["message"]
    assert not (tmp_path / "out").exists()


def test_export_with_a_damaged_database_names_it_and_db_recover(tmp_path):
    path = _damage_database()
    out = subprocess.run(
        [sys.executable, "-P", "-m", "finetune_studio.engine", "export", "someid", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    failed = json.loads(out.stdout.splitlines()[-1])
    assert failed["type"] == "failed" and failed["kind"] == "database"
    assert str(path) in failed["message"] and "db recover" in failed["message"]
