"""The engine's processes start with glibc's malloc settings (core.process_env), and keep the user's own."""

import os
import subprocess
import sys

import pytest

from finetune_studio.core import process_env
from finetune_studio.core.paths import python_argv

GLIBC = process_env.uses_glibc()
OURS = "glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0"


def test_tunables_are_added_and_the_users_own_kept():
    assert process_env.merged_tunables(None) == OURS
    assert process_env.merged_tunables("") == OURS
    assert process_env.merged_tunables("glibc.malloc.arena_max=2") == "glibc.malloc.arena_max=2:" + OURS
    # a value the user chose wins, and merging is idempotent
    mine = "glibc.malloc.tcache_count=3"
    assert process_env.merged_tunables(mine) == mine + ":glibc.malloc.mxfast=0"
    assert process_env.merged_tunables(process_env.merged_tunables(mine)) == mine + ":glibc.malloc.mxfast=0"


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_engine_environment_adds_them_without_touching_this_process():
    before = os.environ.get("GLIBC_TUNABLES")
    env = process_env.engine_environment({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:" + OURS}
    assert os.environ.get("GLIBC_TUNABLES") == before
    assert process_env.has_engine_environment(env)
    assert not process_env.has_engine_environment({"PATH": "/bin"})


SCRIPT = """
import os, sys
from finetune_studio.core.process_env import restart_with_engine_environment
print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
restart_with_engine_environment()
print("end", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_restart_replaces_the_process_once_with_the_same_arguments():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [*python_argv(), "-c", SCRIPT, "train", "x.yaml"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    lines = [line.split(" ", 3) for line in out.stdout.splitlines()]
    assert [line[0] for line in lines] == ["start", "start", "end"]  # ran again once, then went on
    assert len({line[1] for line in lines}) == 1  # the same process (exec), not a child
    assert lines[0][2] == "None" and lines[1][2] == lines[2][2] == OURS
    assert {line[3] for line in lines} == {"['train', 'x.yaml']"}


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_a_process_with_the_settings_is_not_restarted():
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.mxfast=0:glibc.malloc.tcache_count=1")
    out = subprocess.run([*python_argv(), "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert [line.split(" ")[0] for line in out.stdout.splitlines()] == ["start", "end"], out.stderr


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_glibc_applies_the_settings_in_the_started_process():
    """With tcache off, a freed small chunk is not handed straight back by the next malloc of its size from the
    thread's cache; glibc reads the tunable at start, so this shows the setting took effect, not only that the
    variable is set."""
    probe = (
        "import ctypes; c = ctypes.CDLL(None); c.malloc.restype = ctypes.c_void_p; c.free.argtypes = [ctypes.c_void_p];"
        "a = [c.malloc(200) for _ in range(3)]; c.free(a[0]); c.free(a[2]); b = c.malloc(200);"
        "print('lifo' if b == a[2] else 'other')"
    )
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    plain = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    tuned = subprocess.run(
        [sys.executable, "-c", probe], env=process_env.engine_environment(env), capture_output=True, text=True
    )
    assert plain.stdout.strip() == "lifo"  # tcache: the last freed chunk of that size comes back first
    assert tuned.stdout.strip() == "other"
