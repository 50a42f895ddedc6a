"""Running model-written code: each program in its own isolated Python process, under limits.

Generated code is untrusted and often broken: it may loop forever, allocate without bound, print
without end, exit the interpreter or crash it. Each program therefore runs in a fresh `python -I`
child, in its own session (so a timeout kills everything it spawned), in an empty temporary
directory, with address-space, CPU-time, file-size and core-dump limits, and with sockets disabled.
Whatever happens to the child is recorded as that sample's failure; the run goes on.

Those guards contain accidents, not attackers: a program can start another interpreter, or `curl`, which the
socket guard does not reach, and write wherever the user can. So where bubblewrap (`bwrap`, Debian's
`bubblewrap`) works, each child also runs under OS isolation: new network, PID, IPC and user namespaces (no
network at all; everything it spawned dies with it), the filesystem read-only, and a private empty /tmp and home
(so the user's files are not even readable); only its own directory is writable. Where bwrap is missing or
cannot create namespaces, the run goes on with the guards alone and says so once on stderr.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

Isolation = Literal["auto", "bwrap", "guard"]  # auto: bwrap where it works, else the guards alone (with a warning)
SANDBOX_DIR = "/tmp/gale-exec"  # where a program's own directory appears inside bwrap

# The child's whole script: no network, run the program, then leave a marker, so that a program that
# exits early with status 0 (sys.exit(0), os._exit(0) before its tests ran) does not count as passing.
_GUARD = """\
import _socket, socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the gale eval sandbox")
socket.socket = socket.create_connection = socket.getaddrinfo = socket.socketpair = _no_network
_socket.socket = _socket.getaddrinfo = _no_network
del _socket, socket, _no_network
exec(compile(open("program.py", encoding="utf-8").read(), "program.py", "exec"), {"__name__": "__main__"})
open(".finished", "w").close()
"""


@dataclass
class ExecResult:
    passed: bool
    status: str  # "passed", "timeout", "exit code N: <last stderr line>", "killed by signal N (NAME)", ...


def _limits(memory_mb: int, cpu_s: int) -> None:
    """Runs in the child between fork and exec (so only async-signal-safe work: setrlimit)."""
    import resource

    mem = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2**20, 16 * 2**20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _outcome(proc: subprocess.Popen, workdir: Path, timed_out: bool, bwrap: bool) -> ExecResult:
    if timed_out:
        return ExecResult(False, "timeout")
    if proc.returncode == 0:
        finished = (workdir / ".finished").exists()
        return ExecResult(finished, "passed" if finished else "exited with status 0 before the program ended")
    # bwrap exits with 128 + N when its child was killed by signal N
    killed_by = -proc.returncode if proc.returncode < 0 else proc.returncode - 128 if bwrap else 0
    names = {int(x): x.name for x in signal.Signals}
    if killed_by in names:
        return ExecResult(False, f"killed by signal {killed_by} ({names[killed_by]})")
    err = (workdir / "stderr.txt").read_text(errors="replace").strip().splitlines()
    return ExecResult(False, f"exit code {proc.returncode}: {err[-1][:200] if err else ''}")


def _bwrap_args(workdir: Path) -> list[str]:
    """bubblewrap around one child: read-only root, private /tmp and homes, no network, its own PID namespace
    (killing bwrap kills everything inside), only `workdir` writable (seen as SANDBOX_DIR)."""
    hidden = ["/tmp", "/var/tmp", "/run", "/home", "/root", os.path.expanduser("~")]
    args = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for path in dict.fromkeys(hidden):
        if os.path.isdir(path):
            args += ["--tmpfs", path]
    # The interpreter may live under a hidden directory (pyenv in the home): show it again, read-only.
    for path in dict.fromkeys(map(os.path.realpath, (sys.base_prefix, sys.prefix))):
        if any(path == h or path.startswith(h.rstrip("/") + "/") for h in hidden):
            args += ["--ro-bind", path, path]
    return args + ["--bind", str(workdir), SANDBOX_DIR, "--chdir", SANDBOX_DIR, "--unshare-all", "--cap-drop", "ALL",
                   "--die-with-parent", "--new-session", "--hostname", "sandbox", "--setenv", "HOME", "/tmp"]


@functools.cache
def bwrap_works() -> bool:
    """Whether bubblewrap is installed and may create the namespaces (unprivileged user namespaces, or root)."""
    if shutil.which("bwrap") is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        probe = subprocess.run([*_bwrap_args(Path(tmp)), sys.executable, "-I", "-c", "pass"],
                               capture_output=True, timeout=30)
    return probe.returncode == 0


@functools.cache
def _warn_no_isolation() -> None:
    print("warning: bubblewrap (bwrap) is not available here, so model-written programs run with Gale's process "
          "guards alone, which stop accidents but not a program that means harm (apt-get install bubblewrap)",
          file=sys.stderr)


def _use_bwrap(isolation: Isolation) -> bool:
    if isolation == "guard":
        return False
    if bwrap_works():
        return True
    if isolation == "bwrap":
        raise RuntimeError("isolation='bwrap' but bubblewrap is not installed or cannot create namespaces here")
    _warn_no_isolation()
    return False


def run_programs(programs: list[str], *, timeout: float = 10.0, memory_mb: int = 2048,
                 workers: int | None = None, isolation: Isolation = "auto") -> list[ExecResult]:
    """Run each program (a complete Python script; exit status 0 = passed), up to `workers` at a time.

    Processes are started and watched from this thread alone: preexec_fn is not safe with threads.
    """
    workers = workers or os.cpu_count() or 1
    bwrap = _use_bwrap(isolation)
    results: list[ExecResult | None] = [None] * len(programs)
    running: dict[int, tuple[subprocess.Popen, float, tempfile.TemporaryDirectory]] = {}
    pending = list(range(len(programs)))[::-1]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    while pending or running:
        while pending and len(running) < workers:
            i = pending.pop()
            tmp = tempfile.TemporaryDirectory(prefix="gale-exec-")
            work = Path(tmp.name)
            (work / "program.py").write_text(programs[i], encoding="utf-8")
            command = [sys.executable, "-I", "-B", "-c", _GUARD]
            with open(work / "stderr.txt", "wb") as err:
                proc = subprocess.Popen(
                    _bwrap_args(work) + command if bwrap else command, cwd=work, env=env, stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                    preexec_fn=partial(_limits, memory_mb, int(timeout) + 1),
                )
            running[i] = (proc, time.monotonic(), tmp)
        time.sleep(0.005)
        for i, (proc, start, tmp) in list(running.items()):
            timed_out = proc.poll() is None and time.monotonic() - start > timeout
            if proc.returncode is None and not timed_out:
                continue
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the child (if still running) and anything it spawned
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            results[i] = _outcome(proc, Path(tmp.name), timed_out, bwrap)
            tmp.cleanup()
            del running[i]
    return results  # type: ignore[return-value]


def run_program(program: str, **limits: float) -> ExecResult:
    return run_programs([program], **limits)[0]  # type: ignore[arg-type]
