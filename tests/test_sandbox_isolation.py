"""Model-written programs that mean harm: under bubblewrap they reach no network, write nothing outside their
directory, read no home and leave no process behind; with the process guards alone (the fallback) the run still
goes on, and the weaknesses bwrap closes are shown (they are why it is used)."""

import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from gale.eval import sandbox
from gale.eval.sandbox import run_programs

needs_bwrap = pytest.mark.skipif(not sandbox.bwrap_works(), reason="bubblewrap is not usable here")
MARK = "gale-sandbox-test-sleeper"


@pytest.fixture
def listener():
    """A loopback TCP server on the host that counts connections."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    hits, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                hits.append(1)
                conn.close()
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1], hits
    stop.set()
    t.join()
    srv.close()


def hostile(port: int, tmp_path) -> dict[str, str]:
    connect = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2).close()"
    (tmp_path / "secret.txt").write_text("s3cret")
    outside, secret = str(tmp_path / "outside.txt"), str(tmp_path / "secret.txt")
    return {
        "socket": f"import socket\ns = socket.SocketType()  # the class itself: the guard only replaced names\n"
                  f"s.settimeout(2)\ns.connect(('127.0.0.1', {port}))",
        "python_c": f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {connect!r}], check=True)",
        "curl": f"import subprocess\nr = subprocess.run(['curl', '-s', '-m', '3', 'http://127.0.0.1:{port}/'])\n"
                "assert r.returncode in (0, 28, 52, 56)  # connected (not 7): 52 an empty reply, 56 a reset by the\n"
                "# listener closing at once, 28 no reply in time",
        "write_outside": f"open({outside!r}, 'w').write('pwned')",
        "read_secret": f"assert open({secret!r}).read() == 's3cret'",
        "fork_bomb": "import os, time\nfor _ in range(200):\n    if os.fork() == 0:\n"
                     f"        os.setsid(); time.sleep(60); os._exit(0)  # {MARK}\ntime.sleep(60)",
        "ok": "open('mine.txt', 'w').write('x')\nassert open('mine.txt').read() == 'x'",
    }


def leftover_sleepers() -> int:
    out = subprocess.run(["pgrep", "-f", "gale eval sandbox"], capture_output=True, text=True).stdout.split()
    return len(out)


@needs_bwrap
def test_bwrap_contains_hostile_programs(listener, tmp_path):
    port, hits = listener
    programs = hostile(port, tmp_path)
    before = leftover_sleepers()
    results = dict(zip(programs, run_programs(list(programs.values()), timeout=3, memory_mb=512,
                                              isolation="bwrap")))
    assert results.pop("ok").passed, "a well-behaved program still passes"
    assert not any(r.passed for r in results.values()), results
    assert results["fork_bomb"].status == "timeout"
    assert hits == [] and not (tmp_path / "outside.txt").exists()
    time.sleep(0.5)
    assert leftover_sleepers() <= before, "a process outlived its sandbox"


def test_the_guards_alone_keep_the_run_going_and_warn(listener, tmp_path, monkeypatch, capsys):
    port, hits = listener
    programs = hostile(port, tmp_path)
    programs.pop("fork_bomb")  # setsid() children would outlive the guards: that is bwrap's job
    monkeypatch.setattr(sandbox, "bwrap_works", lambda: False)
    sandbox._warn_no_isolation.cache_clear()
    results = dict(zip(programs, run_programs(list(programs.values()), timeout=5, memory_mb=512)))
    assert "bubblewrap" in capsys.readouterr().err
    assert results["ok"].passed
    assert "network access is disabled" in run_programs(
        ["import socket\nsocket.create_connection(('127.0.0.1', 9))"], isolation="guard")[0].status
    # What the guards do not stop, and bwrap does (tested above): another interpreter's sockets, writes anywhere.
    curl = shutil.which("curl") is not None
    assert results["socket"].passed and results["python_c"].passed and results["curl"].passed == curl, results
    deadline = time.time() + 10
    while len(hits) < 2 + curl and time.time() < deadline:  # the listener accepts in its own time under load
        time.sleep(0.1)
    assert len(hits) == 2 + curl
    assert results["write_outside"].passed and (tmp_path / "outside.txt").exists() and results["read_secret"].passed


def test_bwrap_demanded_but_missing_is_an_error(monkeypatch):
    monkeypatch.setattr(sandbox, "bwrap_works", lambda: False)
    with pytest.raises(RuntimeError, match="bubblewrap"):
        run_programs(["pass"], isolation="bwrap")


@needs_bwrap
def test_signals_are_reported_through_bwrap():
    [r] = run_programs(["import ctypes\nctypes.string_at(0)"], isolation="bwrap")
    assert "SIGSEGV" in r.status and sys.platform == "linux"
