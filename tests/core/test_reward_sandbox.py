"""A person's Python reward function runs in a separate, limited process; each escape is stopped with a message."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from finetune_studio.core.rewards import RewardError, RewardSet
from finetune_studio.core.rewards.sandbox import SandboxedReward, SandboxLimits

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs POSIX process limits")


def reward_file(tmp_path, body: str):
    path = tmp_path / "my_reward.py"
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture
def sandboxed(tmp_path):
    """Build SandboxedReward(function) from a file's text; every worker is ended after the test."""
    made = []

    def make(body: str, function: str = "reward", **limits) -> SandboxedReward:
        fn = SandboxedReward(reward_file(tmp_path, body), function, limits=SandboxLimits(**limits))
        made.append(fn)
        return fn

    yield make
    for fn in made:
        fn.close()


def test_a_correct_function_gets_the_columns_as_keyword_arguments_in_another_process(tmp_path):
    path = reward_file(
        tmp_path,
        """
        import os

        def reward(prompts, completions, answer, difficulty, **kwargs):
            with open("seen.txt", "a") as f:  # the scratch folder is its working folder
                f.write("x")
            calls = len(open("seen.txt").read())
            return [
                (1.0 if c.strip() == a else 0.0) * d + 1000 * (os.getpid() != kwargs["parent_pid"][0]) + 10000 * calls
                for c, a, d in zip(completions, answer, difficulty)
            ]
        """,
    )
    with RewardSet([{"kind": "python", "path": str(path), "name": "mine", "weight": 0.5}]) as rewards:
        columns = {"answer": ["4", "5"], "difficulty": [2, 3], "parent_pid": [os.getpid()] * 2}
        first = rewards.score(["2+2?", "2+3?"], ["4\n", "6"], columns)
        assert first.by_function["mine"] == [11002.0, 11000.0]  # right, wrong; another process; first call
        assert first.total == [5501.0, 5500.0]
        second = rewards.score(["2+2?"], ["4"], {k: v[:1] for k, v in columns.items()})
        assert second.by_function["mine"] == [21002.0]  # the same long-lived worker: its scratch file grew


def test_chat_completions_reach_the_function_as_messages(sandboxed):
    fn = sandboxed(
        "def reward(prompts, completions, **kw):\n    return [float(len(c[0]['content'])) for c in completions]\n"
    )
    assert fn(
        prompts=[[{"role": "user", "content": "hi"}]], completions=[[{"role": "assistant", "content": "abc"}]]
    ) == [3.0]


def test_ordinary_libraries_load_and_their_numbers_count_as_scores(sandboxed):
    pytest.importorskip("numpy")
    body = """
    import numpy as np  # loads its C parts through ctypes.dlopen, which the sandbox allows

    def reward(prompts, completions, **kw):
        return np.array([len(c) for c in completions], dtype=np.float32) / 2
    """
    assert sandboxed(body)(prompts=["p", "q"], completions=["ab", "abcd"]) == [1.0, 2.0]


def test_an_endless_loop_is_stopped_by_the_wall_clock(sandboxed):
    fn = sandboxed("import time\ndef reward(prompts, completions, **kw):\n    time.sleep(60)\n", timeout_s=1.0)
    with pytest.raises(RewardError, match=r"reward\(\) in .*my_reward.py did not answer within 1 s .* timeout_s"):
        fn(prompts=["p"], completions=["a"])


def test_a_busy_loop_is_stopped_by_the_cpu_limit(sandboxed):
    fn = sandboxed("def reward(prompts, completions, **kw):\n    while True:\n        pass\n", timeout_s=20, cpu_s=1)
    with pytest.raises(RewardError, match="used more than 1 s of CPU time on one batch"):
        fn(prompts=["p"], completions=["a"])


def test_unbounded_allocation_is_stopped_by_the_memory_limit(sandboxed):
    body = """
    def reward(prompts, completions, **kw):
        grow = []
        while True:
            grow.append(bytearray(16 * 1024 * 1024))
    """
    fn = sandboxed(body, memory_mb=256, timeout_s=20)
    with pytest.raises(RewardError, match="ran out of its 256 MiB memory limit .* memory_mb"):
        fn(prompts=["p"], completions=["a"])


def test_opening_a_socket_is_stopped(sandboxed):
    body = """
    import socket

    def reward(prompts, completions, **kw):
        socket.create_connection(("127.0.0.1", 9), timeout=1)
        return [1.0]

    def quiet(prompts, completions, **kw):
        try:  # a refusal the function swallows is still reported
            socket.socket().close()
        except OSError:
            pass
        return [1.0]
    """
    with pytest.raises(RewardError, match="tried to use the network .* run without network"):
        sandboxed(body)(prompts=["p"], completions=["a"])
    with pytest.raises(RewardError, match=r"quiet\(\) .* tried to use the network \(opened a socket\)"):
        sandboxed(body, "quiet")(prompts=["p"], completions=["a"])


def test_the_worker_has_no_network_interfaces_where_the_kernel_allows_a_namespace(sandboxed):
    body = """
    def reward(prompts, completions, **kw):
        lines = open("/proc/self/net/dev").read().splitlines()[2:]
        names = sorted(line.split(":")[0].strip() for line in lines)
        return [1.0 if names == ["lo"] else 0.0]
    """
    fn = sandboxed(body)
    result = fn(prompts=["p"], completions=["a"])
    if fn.layers["network"].startswith("unavailable"):
        pytest.skip(f"no network namespace here: {fn.layers['network']}")
    assert result == [1.0]


def test_writing_outside_the_scratch_folder_is_stopped(sandboxed, tmp_path):
    outside = tmp_path / "outside.txt"
    keep = tmp_path / "keep.txt"
    keep.write_text("data")
    body = f"""
    import os

    def reward(prompts, completions, **kw):
        with open({str(outside)!r}, "w") as f:
            f.write("escaped")
        return [1.0]

    def remove(prompts, completions, **kw):
        os.remove({str(keep)!r})
        return [1.0]

    def via_folder_fd(prompts, completions, **kw):
        folder = os.open({str(tmp_path)!r}, os.O_RDONLY)
        os.remove("keep.txt", dir_fd=folder)
        return [1.0]

    def whole_folder(prompts, completions, **kw):
        import shutil
        shutil.rmtree({str(tmp_path)!r})
        return [1.0]

    def via_link(prompts, completions, **kw):
        os.symlink({str(keep)!r}, "link.txt")  # a link in the scratch folder pointing out of it
        with open("link.txt", "a") as f:
            f.write("escaped")
        return [1.0]
    """
    with pytest.raises(RewardError, match=f"tried to write to '{outside}', outside its scratch folder"):
        sandboxed(body)(prompts=["p"], completions=["a"])
    with pytest.raises(RewardError, match=f"tried to change '{keep}', outside its scratch folder"):
        sandboxed(body, "remove")(prompts=["p"], completions=["a"])
    with pytest.raises(RewardError, match=f"tried to write to '{keep}', outside its scratch folder"):
        sandboxed(body, "via_link")(prompts=["p"], completions=["a"])
    with pytest.raises(RewardError, match=f"tried to change '{keep}', outside its scratch folder \\(os.remove"):
        sandboxed(body, "via_folder_fd")(prompts=["p"], completions=["a"])
    with pytest.raises(RewardError, match=f"tried to change '{tmp_path}', outside its scratch folder \\(shutil.rmtree"):
        sandboxed(body, "whole_folder")(prompts=["p"], completions=["a"])
    assert not outside.exists()
    assert keep.read_text() == "data"


def test_ordinary_file_work_inside_the_scratch_folder_is_allowed(sandboxed):
    body = """
    import os, shutil, sqlite3, tempfile

    def reward(prompts, completions, **kw):
        os.makedirs("cache/deep")
        os.chmod("cache", 0o755)
        with open("cache/deep/notes.txt", "w") as f:
            f.write("x")
        os.rename("cache/deep/notes.txt", "cache/notes.txt")
        folder = tempfile.mkdtemp()  # TMPDIR is the scratch folder
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False) as f:
            f.write("y")
        shutil.copyfile(f.name, os.path.join(os.environ["HOME"], "copy.txt"))
        shutil.rmtree(folder)  # removes through folder descriptors
        sqlite3.connect("scores.db").execute("create table t (x)")
        shutil.rmtree("cache")
        os.symlink("/", "outward")  # a link pointing out of the folder may be made, renamed and removed
        os.rename("outward", "outward2")
        os.remove("outward2")
        return [float(sorted(os.listdir(".")) == ["copy.txt", "scores.db"])]
    """
    assert sandboxed(body)(prompts=["p"], completions=["a"]) == [1.0]


def test_spawning_a_process_is_stopped(sandboxed, tmp_path):
    marker = tmp_path / "ran.txt"
    body = f"""
    import os, subprocess

    def reward(prompts, completions, **kw):
        subprocess.run(["touch", {str(marker)!r}])
        return [1.0]

    def shell(prompts, completions, **kw):
        os.system("touch {marker}")
        return [1.0]
    """
    with pytest.raises(RewardError, match="tried to start another program or process \\(subprocess.Popen"):
        sandboxed(body)(prompts=["p"], completions=["a"])
    with pytest.raises(RewardError, match="tried to start another program or process \\(os.system"):
        sandboxed(body, "shell")(prompts=["p"], completions=["a"])
    assert not marker.exists()


def test_an_exception_comes_back_with_its_traceback_and_the_worker_restarts(sandboxed):
    body = """
    import os

    def reward(prompts, completions, **kw):
        if completions[0] == "boom":
            return helper()
        return [float(os.getpid())]

    def helper():
        return {}["missing"]
    """
    fn = sandboxed(body)
    (first_pid,) = fn(prompts=["p"], completions=["fine"])
    with pytest.raises(RewardError) as err:
        fn(prompts=["p"], completions=["boom"])
    message = str(err.value)
    assert "raised KeyError: 'missing'; fix the function" in message
    assert 'my_reward.py", line 6, in reward' in message and "line 10, in helper" in message
    assert "_sandbox_worker" not in message  # the worker's own frames are left out
    (second_pid,) = fn(prompts=["p"], completions=["fine"])
    assert second_pid != first_pid  # a fresh worker after the failure


@pytest.mark.parametrize(
    "returned,message",
    [
        ("{'a': 1.0}", "must return a list of numbers \\(one per completion\\), not dict"),
        ("[1.0]", "returned 1 score\\(s\\) for 2 completion\\(s\\)"),
        ("[1.0, float('nan')]", "score 1 is nan; return finite numbers"),
        ("[1.0, None]", "score 1 is None"),
        ("[1.0, '2']", "score 1 is '2' \\(str\\)"),
        ("[1.0, 10**400]", "score 1 is too large for a float"),
    ],
)
def test_a_wrong_result_is_named(sandboxed, returned, message):
    fn = sandboxed(f"def reward(prompts, completions, **kw):\n    return {returned}\n")
    with pytest.raises(RewardError, match=message):
        fn(prompts=["p", "q"], completions=["a", "b"])


def test_a_file_that_fails_to_load_is_reported(sandboxed):
    fn = sandboxed("import no_such_module_here\n\ndef reward(prompts, completions, **kw):\n    return [1.0]\n")
    with pytest.raises(RewardError, match="loading .*my_reward.py failed: ModuleNotFoundError"):
        fn(prompts=["p"], completions=["a"])
    stuck = sandboxed("while True:\n    pass\n", startup_timeout_s=1.0)
    with pytest.raises(RewardError, match="loading .*my_reward.py did not finish within 1 s .* top level"):
        stuck(prompts=["p"], completions=["a"])


def test_the_environment_is_cleared(sandboxed, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    fn = sandboxed(
        "import os\ndef reward(prompts, completions, **kw):\n    return [float('SECRET_TOKEN' in os.environ)]\n"
    )
    assert fn(prompts=["p"], completions=["a"]) == [0.0]


def test_closing_removes_the_scratch_folder(sandboxed):
    fn = sandboxed("import os\ndef reward(prompts, completions, **kw):\n    return [1.0]\n")
    fn(prompts=["p"], completions=["a"])
    scratch = fn._holder[0].scratch
    assert os.path.isdir(scratch)
    fn.close()
    assert not os.path.exists(scratch)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the worker's state from /proc")
def test_a_worker_ends_and_clears_its_scratch_folder_when_its_parent_dies(tmp_path):
    path = reward_file(tmp_path, "def reward(prompts, completions, **kw):\n    return [1.0]\n")
    parent = textwrap.dedent(
        f"""
        import os
        from finetune_studio.core.rewards.sandbox import SandboxedReward
        fn = SandboxedReward({str(path)!r})
        fn(prompts=["p"], completions=["a"])
        print(fn._holder[0].proc.pid, fn._holder[0].scratch, flush=True)
        os._exit(0)  # no clean-up: as if the engine were killed
        """
    )
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=60, check=True)
    pid, scratch = out.stdout.split()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (_running(int(pid)) or os.path.exists(scratch)):
        time.sleep(0.05)
    assert not _running(int(pid))
    assert not os.path.exists(scratch)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
