"""``engine pairs``: import every preference layout, export as TRL / LLaMA-Factory, re-import keeps each pair once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from finetune_studio.core.store import Store


def _pairs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-m", "finetune_studio.engine", "pairs", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _contents(store: Store) -> list[tuple]:
    return sorted(
        (json.dumps(p.prompt), json.dumps(p.chosen), json.dumps(p.rejected)) for p in store.preferences.pairs()
    )


def test_import_export_reimport_keeps_every_pair_once(tmp_path):
    trl = _write(
        tmp_path / "trl.jsonl",
        [{"prompt": f"Say {i}.", "chosen": f"{i}", "rejected": f"not {i}"} for i in range(6)],
    )
    conversational = _write(
        tmp_path / "conv.jsonl",
        [
            {
                "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                "chosen": [{"role": "assistant", "content": "Hello."}],
                "rejected": [{"role": "assistant", "content": "Greetings, dear friend, how are you?"}],
            }
        ],
    )
    hh = _write(
        tmp_path / "hh.jsonl",
        [
            {
                "chosen": "\n\nHuman: Name a fruit.\n\nAssistant: Apple.",
                "rejected": "\n\nHuman: Name a fruit.\n\nAssistant: A car.",
            }
        ],
    )
    for f, fmt in ((trl, "trl"), (conversational, "trl-conversational"), (hh, "hh")):
        done = _pairs("import", str(f), "--json")
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert summary["format"] == fmt and summary["added"] == summary["pairs"] > 0
    again = json.loads(_pairs("import", str(trl), "--json").stdout)
    assert (again["added"], again["unchanged"]) == (0, 6)

    store = Store()
    prefs = store.preferences
    # A tie and a both-bad decision: never DPO pairs, and the export says so.
    pid = prefs.add_prompt("Pick one.")
    x, y = prefs.add_candidate(pid, "x"), prefs.add_candidate(pid, "y")
    prefs.compare(x, y, "tie")
    z = prefs.add_candidate(pid, "z")
    prefs.compare(x, z, "both_bad")
    before = _contents(store)
    assert len(before) == 8
    store.close()

    snapshots = set()
    for fmt in ("trl-conversational", "llama-factory", "trl"):
        out = tmp_path / f"out-{fmt}"
        done = _pairs("export", str(out), "--format", fmt)
        assert done.returncode == 0, done.stderr
        assert "left out of DPO data: 1 both bad, 1 tie" in done.stdout
        manifest = json.loads((out / "snapshot.json").read_text())
        snapshots.add(manifest["snapshot"])
        assert manifest["snapshot"] in done.stdout and manifest["left_out"] == {"tie": 1, "both_bad": 1}
        if fmt == "llama-factory":
            info = json.loads((out / "dataset_info.json").read_text())
            assert (
                info[manifest["snapshot"]]["ranking"] is True
                and info[manifest["snapshot"]]["file_name"] == "pairs.json"
            )
            data = json.loads((out / "pairs.json").read_text())
            assert len(data) == 8 and {"conversations", "chosen", "rejected"} <= set(data[0])
        else:
            assert len((out / "pairs.jsonl").read_text().splitlines()) == manifest["pairs"]
        if fmt == "trl":
            # The system turn of the conversational pair cannot be a TRL string prompt: dropped, and said so.
            assert manifest["pairs"] == 7 and "not written" in done.stdout
        else:
            assert manifest["pairs"] == 8
        reimport = _pairs("import", str(out / ("pairs.json" if fmt == "llama-factory" else "pairs.jsonl")), "--json")
        assert reimport.returncode == 0, reimport.stderr
        assert json.loads(reimport.stdout)["added"] == 0
    assert len(snapshots) == 1  # unchanged data, one snapshot id
    store = Store()
    assert _contents(store) == before
    stats = store.preferences.stats()
    assert stats["pairs"] == 8 and stats["decisions"]["tie"] == 1 and stats["decision_changes"] == 0
    store.close()
    shown = _pairs("stats")
    assert shown.returncode == 0 and "DPO pairs:   8" in shown.stdout


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}], "not preference"),
    ],
)
def test_import_refuses_data_that_is_not_pairs(tmp_path, rows, message):
    done = _pairs("import", str(_write(tmp_path / "sft.jsonl", rows)))
    assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr


def test_export_of_an_empty_store_and_an_unknown_snapshot_are_clear_errors(tmp_path):
    done = _pairs("export", str(tmp_path / "o"), "--format", "trl")
    assert done.returncode == 1 and "no pairs to export" in done.stderr
    done = _pairs("export", str(tmp_path / "o"), "--format", "trl", "--snapshot", "pairs-unknown")
    assert done.returncode == 1 and "no pairs snapshot 'pairs-unknown'" in done.stderr


def test_json_answers_are_typed_events_and_a_failure_is_a_failed_event(tmp_path):
    from finetune_studio.core.protocol.events import Failed, FailureKind, parse_event
    from finetune_studio.core.protocol.pairs_report import PairsExported, PairsImported, PairsStats

    trl = _write(
        tmp_path / "trl.jsonl", [{"prompt": f"Say {i}.", "chosen": f"{i}", "rejected": "no"} for i in range(3)]
    )
    imported = parse_event(_pairs("import", str(trl), "--json").stdout)
    assert isinstance(imported, PairsImported) and (imported.format, imported.added) == ("trl", 3)
    exported = parse_event(_pairs("export", str(tmp_path / "out"), "--format", "trl", "--json").stdout)
    assert isinstance(exported, PairsExported) and exported.pairs == 3
    on_disk = json.loads((tmp_path / "out" / "snapshot.json").read_text())
    assert "type" not in on_disk and on_disk["snapshot"] == exported.snapshot  # the manifest as it always was
    stats = parse_event(_pairs("stats", "--json").stdout)
    assert isinstance(stats, PairsStats) and stats.pairs == 3 and stats.snapshots == 1
    sft = _write(
        tmp_path / "sft.jsonl",
        [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
    )
    refused = _pairs("import", str(sft), "--json")
    failed = parse_event(refused.stdout)
    assert refused.returncode == 1 and isinstance(failed, Failed) and failed.kind is FailureKind.DATA
    assert "not preference pairs" in failed.message and "not preference pairs" in refused.stderr


@pytest.mark.parametrize("fmt", ["trl-conversational", "llama-factory", "trl"])
def test_re_importing_the_stores_own_export_of_labelled_pairs_is_an_exact_round_trip(tmp_path, fmt):
    """Pairs a person labelled in the app (their own annotator, candidates with their origin) exported, then imported:
    the same pairs, no new comparison (the import's annotator is no new opinion on the same pair)."""
    store = Store()
    prefs = store.preferences
    for i in range(5):
        pid = prefs.add_prompt(f"Question {i}?", source="session")
        a = prefs.add_candidate(pid, f"answer A{i}", model="m1", seed=i, source="session")
        b = prefs.add_candidate(pid, f"answer B{i}", model="m2", seed=i, source="session")
        prefs.compare(a, b, "a" if i % 2 else "b", annotator="alice", shown_left=a, source="session")
    before, stats = _contents(store), prefs.stats()
    store.close()
    out = tmp_path / "out"
    assert _pairs("export", str(out), "--format", fmt).returncode == 0
    done = _pairs("import", str(out / ("pairs.json" if fmt == "llama-factory" else "pairs.jsonl")), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["pairs"], summary["added"], summary["unchanged"], summary["changed"]) == (5, 0, 5, 0)
    store = Store()
    after = store.preferences.stats()
    assert _contents(store) == before and len(before) == 5
    assert (after["comparisons"], after["pairs"], after["candidates"], after["prompts"]) == (5, 5, 10, 5)
    assert after["annotators"] == stats["annotators"] == 1
