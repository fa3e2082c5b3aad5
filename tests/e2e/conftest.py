"""The end-to-end harness: the real app in a real X server, driven only through the window system.

Each test starts Xvfb on a free display (``-displayfd``), starts the app as a person does
(``python -P -m finetune_studio.studio``, ``QT_QPA_PLATFORM=xcb``, its own ``FINETUNE_STUDIO_HOME``), and sends keys
and clicks with xdotool (XTEST: the X server delivers them as if typed, so Qt's shortcut, focus and wheel dispatch
happen as on a desktop). Where to click comes from the app's read-only probe (``studio/probe.py``, on only under
``FINETUNE_STUDIO_E2E_PROBE``): the named widgets' places on screen, their text and state. Screenshots are the X
server's root window (ImageMagick's ``import``); what was stored is read from the SQLite database.

The Debian packages (xvfb, xdotool, imagemagick, x11-utils) come with ``bash packaging/bootstrap.sh test`` when run
as root; the tests install them the same way when root and skip, naming them, only where that is impossible.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEBS = ("xvfb", "xdotool", "imagemagick", "x11-utils")
TOOLS = ("Xvfb", "xdotool", "import")


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.e2e)


def _missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


@pytest.fixture(scope="session")
def x_tools() -> None:
    """Xvfb, xdotool and ImageMagick on this machine (installed with apt-get when running as root)."""
    if _missing_tools() and os.geteuid() == 0 and shutil.which("apt-get"):
        cmd = ["apt-get", "install", "-y", "-qq", *DEBS]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            subprocess.run(cmd, capture_output=True)
    missing = _missing_tools()
    if missing:
        pytest.skip(
            f"the end-to-end tests need {', '.join(missing)} (Debian packages: {' '.join(DEBS)}); "
            f"install them with: sudo apt-get install {' '.join(DEBS)}"
        )


class XServer:
    """One Xvfb screen of ``width`` x ``height`` on a display it picked itself."""

    def __init__(self, width: int, height: int):
        read, write = os.pipe()
        self.proc = subprocess.Popen(
            ["Xvfb", "-displayfd", str(write), "-screen", "0", f"{width}x{height}x24", "-nolisten", "tcp", "-noreset"],
            pass_fds=(write,),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(write)
        with os.fdopen(read) as fh:
            number = fh.readline().strip()
        if not number:
            raise RuntimeError("Xvfb did not start")
        self.display = f":{number}"
        self.size = (width, height)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def inside(rect: list[int], screen: list[int]) -> bool:
    """Whether ``rect`` (x, y, width, height) lies wholly on ``screen``."""
    x, y, w, h = rect
    sx, sy, sw, sh = screen
    return x >= sx and y >= sy and x + w <= sx + sw and y + h <= sy + sh


def off_screen(state: dict, names) -> dict[str, list[int]]:
    """The named widgets a person cannot fully see: not shown at all ([]), clipped by a scroll area or a parent, or
    past the screen's edge (their rectangle); empty when every one is in view."""
    out = {}
    for name in names:
        w = state["widgets"].get(name)
        if w is None:
            out[name] = []  # not shown at all
        elif w["visible"] != w["rect"] or not inside(w["rect"], state["screen"]):
            out[name] = w["rect"]
    return out


def wait_for(check: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    """Poll ``check`` until it returns something true; fail naming ``what`` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class App:
    """The studio as a person runs it, on ``xserver``, with its data in ``home``."""

    def __init__(self, xserver: XServer, home: Path, shots: Path):
        self.x, self.home, self.shots = xserver, home, shots
        self.probe_dir = home / "probe"
        self.probe_dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.window = ""
        self.log_path = home / "app.log"

    # --- life ------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DISPLAY=self.x.display,
            QT_QPA_PLATFORM="xcb",
            FINETUNE_STUDIO_HOME=str(self.home),
            FINETUNE_STUDIO_E2E_PROBE=str(self.probe_dir),
        )
        for name in ("PYTEST_CURRENT_TEST", "PYTEST_VERSION"):
            env.pop(name, None)
        return env

    def start(self) -> App:
        log = open(self.log_path, "a", encoding="utf-8")
        log.write(f"\n--- start {time.strftime('%H:%M:%S')} ---\n")
        log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "finetune_studio.studio"],
            cwd=str(ROOT),
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.window = wait_for(self._find_window, 60, "the app's window")
        self.state(timeout=30)  # the event loop runs
        self.focus()
        return self

    def _find_window(self) -> str:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the app exited with {self.proc.returncode}:\n{self.log()}")
        found = self.xdotool("search", "--onlyvisible", "--pid", str(self.proc.pid), "--name", "Finetune Studio")
        return found.split()[0] if found else ""

    def focus(self) -> None:
        """Give the window the keyboard (there is no window manager: XSetInputFocus, as a click would)."""
        self.xdotool("windowfocus", "--sync", self.window)
        wait_for(lambda: self.state()["window"]["active"], 10, "the window to become active")

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._kill_children()

    def _kill_children(self) -> None:
        """The app's own children (its generation worker, engine jobs), by the process group it started."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def quit(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                self._kill_children()
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._kill_children()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-6000:]

    # --- looking ---------------------------------------------------------------------
    def state(self, timeout: float = 10) -> dict:
        """The probe's answer: named widgets' screen rectangles, text and state; focus, tabs, status."""
        rid = uuid.uuid4().hex
        answer = self.probe_dir / "state.json"
        (self.probe_dir / "request.tmp").write_text(rid)
        os.replace(self.probe_dir / "request.tmp", self.probe_dir / "request")

        def read():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the app exited with {self.proc.returncode}:\n{self.log()}")
            try:
                data = json.loads(answer.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            return data if data.get("request") == rid else None

        return wait_for(read, timeout, "the app's probe")

    def widget(self, name: str, state: dict | None = None) -> dict:
        widgets = (state or self.state())["widgets"]
        if name not in widgets:
            raise AssertionError(f"no visible widget {name!r}; visible: {sorted(widgets)}")
        return widgets[name]

    def text(self, name: str) -> str:
        return self.widget(name)["text"] or ""

    def wait_text(self, name: str, check: Callable[[str], bool], timeout: float, what: str = "") -> str:
        def ok():
            w = self.state()["widgets"].get(name)
            return w["text"] if w and w["text"] is not None and check(w["text"]) else ""

        try:
            return wait_for(ok, timeout, what or f"{name}'s text")
        except AssertionError as exc:
            w = self.state()["widgets"].get(name)
            raise AssertionError(f"{exc}; it reads {w and w['text']!r}") from None

    def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        subprocess.run(["import", "-window", "root", str(path)], env=self.env, check=True, capture_output=True)
        return path

    # --- acting ----------------------------------------------------------------------
    def xdotool(self, *args: str) -> str:
        out = subprocess.run(["xdotool", *args], env=self.env, capture_output=True, text=True, timeout=30)
        return out.stdout.strip()

    def key(self, *keys: str, settle: float = 0.25) -> None:
        """Keys as a person presses them (xdotool names: 'a', 'shift+e', 'ctrl+Return', 'Escape', 'Right')."""
        for k in keys:
            self.xdotool("key", "--clearmodifiers", k)
            time.sleep(0.05)
        time.sleep(settle)

    def type(self, text: str) -> None:
        """Text as typed; each newline is a press of Return."""
        for i, line in enumerate(text.split("\n")):
            if i:
                self.xdotool("key", "Return")
            if line:
                self.xdotool("type", "--delay", "8", line)
        time.sleep(0.2)

    def click(self, name: str, *, at: tuple[float, float] = (0.5, 0.5), wait: float = 10) -> None:
        """Click the middle of the named widget (waiting until it is visible and enabled)."""

        def ready():
            w = self.state()["widgets"].get(name)
            return w if w and w["enabled"] else None

        w = wait_for(ready, wait, f"{name} to be visible and enabled")
        x, y, width, height = w["visible"]  # the part a click reaches (a scroll area may clip it)
        if width < 4 or height < 4:
            raise AssertionError(f"{name} is scrolled out of view (its rectangle: {w['rect']})")
        self.click_at(int(x + width * at[0]), int(y + height * at[1]))

    def click_at(self, x: int, y: int) -> None:
        self.move_to(x, y)
        self.xdotool("click", "1")
        time.sleep(0.25)

    def move_to(self, x: int, y: int) -> None:
        """The pointer to (x, y). ``mousemove --sync`` waits for the pointer to move, which never comes when it is
        there already (xdotool gives up after about 15 s): such a move is skipped."""
        where = dict(line.split("=", 1) for line in self.xdotool("getmouselocation", "--shell").splitlines())
        if (where.get("X"), where.get("Y")) != (str(x), str(y)):
            self.xdotool("mousemove", "--sync", str(x), str(y))

    def choose_menu(self, text: str, wait: float = 10) -> None:
        """Click the item of the open menu (a button's drop-down) whose text is ``text``."""

        def item():
            menus = self.state()["menus"]
            return next((m for m in menus if m["text"].replace("&", "") == text), None)

        found = wait_for(item, wait, f"the menu item {text!r}")
        x, y, w, h = found["rect"]
        self.click_at(x + w // 2, y + h // 2)

    def click_row(self, table: str, check: Callable[[list[str]], bool], wait: float = 10) -> None:
        """Click the first row of the named table whose cells pass ``check``."""

        def row():
            rows = self.state()["widgets"].get(table, {}).get("rows") or []
            return next((r for r in rows if check(r["cells"])), None)

        found = wait_for(row, wait, f"a matching row in {table}")
        x, y, w, h = found["rect"]
        self.click_at(x + min(w // 4, 120), y + h // 2)

    def scroll_to(self, name: str, area: str, most: int = 60) -> None:
        """Turn the mouse wheel over the scroll area ``area`` until the named widget is wholly in view."""
        for _ in range(most):
            state = self.state()
            w, box = state["widgets"].get(name), self.widget(area, state)
            if w is not None and w["visible"] == w["rect"]:
                return
            ax, ay, aw, ah = box["visible"]
            up = w is not None and w["rect"][1] < ay
            self.move_to(ax + 4, ay + ah // 2)  # the margin: no field takes the wheel
            self.xdotool("click", "4" if up else "5")
            time.sleep(0.1)
        raise AssertionError(f"{name} did not come into view in {area}")

    def click_tab(self, text: str) -> None:
        tab = next((t for t in self.state()["tabs"] if text in t["text"]), None)
        assert tab is not None, f"no tab {text!r}"
        x, y, w, h = tab["rect"]
        self.click_at(x + w // 2, y + h // 2)

    def fill(self, name: str, text: str) -> None:
        """Click a text field, select what it holds and type ``text`` over it."""
        self.click(name)
        self.key("ctrl+a", "BackSpace", settle=0.1)
        if text:
            self.type(text)

    # --- the database ----------------------------------------------------------------
    def query(self, sql: str, *args) -> list[tuple]:
        path = self.home / "studio.sqlite3"
        if not path.exists():
            return []
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()


@pytest.fixture
def xserver_factory(x_tools):
    servers: list[XServer] = []

    def make(width: int = 1440, height: int = 900) -> XServer:
        server = XServer(width, height)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def app_factory(xserver_factory, tmp_path, request):
    """Apps on their own X servers; each one's home in the test's temporary folder, screenshots beside it."""
    apps: list[App] = []
    shots = Path(os.environ.get("FINETUNE_STUDIO_E2E_SHOTS", tmp_path / "shots")) / request.node.name
    shots.mkdir(parents=True, exist_ok=True)

    def make(home: Path | None = None, size: tuple[int, int] = (1440, 900), settings: dict | None = None) -> App:
        home = home or tmp_path / f"home-{len(apps)}"
        home.mkdir(parents=True, exist_ok=True)
        if settings is not None:
            (home / "studio-settings.json").write_text(json.dumps(settings))
        app = App(xserver_factory(*size), home, shots)
        apps.append(app)
        return app

    yield make
    failed = getattr(getattr(request.node, "rep_call", None), "failed", False)
    for i, app in enumerate(apps):
        if failed and app.proc is not None and app.proc.poll() is None:
            try:
                shot = app.screenshot(f"failure-{i}")
                widgets = app.state()["widgets"]
                texts = {k: w["text"] for k, w in widgets.items() if w["text"] and len(w["text"]) < 300}
                sys.stderr.write(f"--- on screen at the failure ({shot}) ---\n{json.dumps(texts, indent=1)}\n")
            except (AssertionError, subprocess.CalledProcessError) as exc:
                sys.stderr.write(f"no picture of the failure: {exc}\n")
        app.quit()
        if failed:
            sys.stderr.write(f"--- app log ({app.home}) ---\n{app.log()}\n")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.rep_call = report
    return report
