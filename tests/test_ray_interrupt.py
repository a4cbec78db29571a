"""Ctrl-C with ``--executor ray``: the CLI stops at once, and so does its work on Ray.

Each test runs the real ``oamipc`` command line in a subprocess of its own session, through a
small launcher (:data:`LAUNCHER`) that slows one thing down so that the interrupt lands where it
should, deterministically:

* ``tasks``: every Ray task first drops a file named after its worker process into a marks
  directory, then sleeps for ten minutes; the test sends SIGINT once a task has started.
* ``start``: right after the embedded Ray has launched its raylet, the launcher waits until the
  raylet has started its agents, then raises ``KeyboardInterrupt`` in the driver (what Python
  does on a Ctrl-C at that moment).

The pareto and cluster cases are ``slow`` (about 30 s each here; ``-m slow``).  What the user
must get (the oracle for every case): exit code 130, the one line ``interrupted (no
output was written)``, an empty output directory, and -- with an embedded Ray -- no process left
in the command's session (the embedded Ray's processes all live there).  With ``--ray-address``
the task's worker process on the cluster is gone, and the cluster still runs a task afterwards;
under a Ray that the calling program started itself, the task's worker is gone and that Ray is up.

The launcher's wrappers are defined in ``__main__``, so Ray pickles them by value: the workers
run them without importing anything that is not oamipc's.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from oamipc.cli import EXIT_INTERRUPTED
from oamipc.executor import OWNER_ENV, kill_marked

pytest.importorskip("ray", reason="Ray is not installed (pip install 'oamipc[ray]')")
if not Path("/proc/self/stat").exists():
    pytest.skip("the leftover-process checks read /proc (Linux)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
MLP = str(ROOT / "examples" / "digits_mlp.pt")
CNN = str(ROOT / "examples" / "digits_cnn.pt")
MESSAGE = "interrupted (no output was written)"
WAIT_S = 180  # for a mark, for the command to exit, for the cluster: generous, the machine may be busy
# For the processes the command leaves after it exited: killed, they are gone at once; Ray's agents
# left behind by a half-started Ray used to linger about a minute, until their own time-outs.
GONE_S = 20
SKIP_CODE = 77  # the launcher's "this Ray has no hook for the start case"

LAUNCHER = textwrap.dedent('''
    """Runs ``oamipc`` with a test's slow-down (tests/test_ray_interrupt.py); argv as for oamipc."""
    import functools
    import os
    import signal
    import sys
    import time
    from pathlib import Path

    # A test run started in the background inherits SIGINT ignored, and Python then leaves it so:
    # take it back, as a terminal's foreground job has it.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    MARKS = os.environ["TEST_MARKS"]


    def slow_task(fn, shared, item):
        Path(MARKS, f"task-{os.getpid()}").write_text("")
        time.sleep(600)
        return fn(shared, item)


    def _children(pid):
        out = []
        for d in os.listdir("/proc"):
            try:
                stat = Path("/proc", d, "stat").read_text()
            except OSError:
                continue
            if d.isdigit() and int(stat.rpartition(")")[2].split()[1]) == pid:
                out.append(Path("/proc", d, "cmdline").read_bytes())
        return out


    if os.environ["TEST_MODE"] == "tasks":
        import oamipc.executor as executor

        real_map = executor.RayExecutor.map

        def map(self, fn, shared, items, done=None):
            return real_map(self, functools.partial(slow_task, fn), shared, items, done)

        executor.RayExecutor.map = map
    else:
        import ray._private.node as node

        real_start = getattr(node.Node, "start_raylet", None)
        if real_start is None:
            sys.exit(77)

        def start_raylet(self, *args, **kwargs):
            real_start(self, *args, **kwargs)
            raylet = self.all_processes["raylet"][0].process.pid
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and sum(b"agent" in c for c in _children(raylet)) < 2:
                time.sleep(0.1)
            Path(MARKS, "raylet-started-agents").write_text(str(raylet))
            raise KeyboardInterrupt

        node.Node.start_raylet = start_raylet

    from oamipc.cli import main

    sys.argv[0] = "oamipc"
    if not os.environ.get("TEST_OWN_RAY"):
        main()
    else:  # a program that runs Ray itself: oamipc uses that Ray, and leaves it running
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            main()
        finally:
            worker = int(next(Path(MARKS).iterdir()).name.removeprefix("task-"))
            deadline = time.monotonic() + 20
            while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            gone = not Path(f"/proc/{worker}").exists()
            Path(MARKS, "after").write_text(f"{ray.is_initialized()} {gone}")
            ray.shutdown()
''')


def _session(sid: int) -> list[str]:
    """The live (not zombie) processes of session ``sid``, as ``pid name``."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat.rpartition(")")[2].split()
        if d.name.isdigit() and int(fields[3]) == sid and fields[0] != "Z":
            found.append(f"{d.name} {name}")
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _until(condition: Callable[[], bool], what: str, wait_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + wait_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {wait_s} s: {what}")
        time.sleep(0.2)


class Cli:
    """``oamipc ARGS`` through the launcher, in a session of its own."""

    def __init__(self, tmp: Path, mode: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.marks = tmp / "marks"
        self.marks.mkdir()
        launcher = tmp / "launch.py"
        launcher.write_text(LAUNCHER)
        self.proc = subprocess.Popen([sys.executable, str(launcher), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=tmp,
                                     env={**os.environ, **(env or {}), "TEST_MARKS": str(self.marks),
                                          "TEST_MODE": mode, "OAMIPC_DEBUG": ""})

    def wait_for_task(self) -> int:
        """The pid of the first Ray worker that started a task."""
        _until(lambda: any(self.marks.iterdir()) or self.proc.poll() is not None, "a Ray task started")
        assert self.proc.poll() is None, self.finish()
        return int(next(self.marks.glob("task-*")).name.removeprefix("task-"))

    def finish(self) -> str:
        try:
            _, err = self.proc.communicate(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            pytest.fail(f"the command did not exit within {WAIT_S} s after the interrupt:\n{err}")
        return err

    def assert_interrupted(self, out: Path) -> None:
        err = self.finish()
        if self.proc.returncode == SKIP_CODE:
            pytest.skip("this Ray has no Node.start_raylet to stop after")
        assert self.proc.returncode == EXIT_INTERRUPTED, err
        assert "Traceback" not in err, err
        # Ray itself may warn on stderr while it starts (token authentication); ours is the last line
        assert err.strip().splitlines()[-1] == MESSAGE, err
        assert not any(line.startswith(("interrupted", "error")) for line in err.strip().splitlines()[:-1]), err
        assert list(out.iterdir()) == []

    def assert_session_empty(self) -> None:
        deadline = time.monotonic() + GONE_S
        while (left := _session(self.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"still running {GONE_S} s after the command exited: {left}"


@pytest.fixture
def out(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


def _mip_compile(out: Path, *extra: str) -> list[str]:
    """The paper formulation's class problems: the MIP's first Ray tasks, a few seconds in."""
    return ["compile", MLP, "--data", "digits", "--importance", "mip", "--formulation", "paper", "--relax",
            "--flops-budget", "0.3", "--calib-samples", "128", "--no-bench", "--no-reconstruct",
            "-o", str(out / "m.onnx"), "--report", str(out / "r.json"), "--executor", "ray", *extra]


def test_ctrl_c_stops_an_embedded_rays_tasks_and_the_ray(tmp_path: Path, out: Path) -> None:
    cli = Cli(tmp_path, "tasks", _mip_compile(out, "--jobs", "2"))
    worker = cli.wait_for_task()
    assert any(line.startswith(f"{worker} ") for line in _session(cli.proc.pid)), "the task runs in the session"
    os.kill(cli.proc.pid, signal.SIGINT)  # the driver alone: stopping Ray is the driver's job
    cli.assert_interrupted(out)
    cli.assert_session_empty()


def test_ctrl_c_while_the_embedded_ray_starts_leaves_none_of_it(tmp_path: Path, out: Path) -> None:
    """A Ctrl-C between the raylet's start and ray.init's return: Ray's agents used to outlive it."""
    cli = Cli(tmp_path, "start", _mip_compile(out, "--jobs", "1"))
    cli.assert_interrupted(out)
    assert (cli.marks / "raylet-started-agents").exists(), "the interrupt came before the raylet started"
    cli.assert_session_empty()


def test_ctrl_c_cancels_the_tasks_on_a_ray_the_program_runs_itself(tmp_path: Path, out: Path) -> None:
    """Where Ray was started by the program that calls oamipc, oamipc neither stops nor leaves its tasks."""
    cli = Cli(tmp_path, "tasks", _mip_compile(out, "--jobs", "2"), {"TEST_OWN_RAY": "1"})
    cli.wait_for_task()
    os.kill(cli.proc.pid, signal.SIGINT)
    cli.assert_interrupted(out)
    assert (cli.marks / "after").read_text() == "True True", "after the interrupt: Ray still up, the task's worker gone"


@pytest.mark.slow  # about 30 s here; the same executor path as a compile's, which the default run checks
def test_ctrl_c_stops_pareto_on_ray(tmp_path: Path) -> None:
    """``oamipc pareto``: its compiles are the Ray tasks; Ctrl-C from a terminal reaches the whole group."""
    out = tmp_path / "front"
    out.mkdir()
    cli = Cli(tmp_path, "tasks", ["pareto", CNN, "--data", "digits", "--budgets", "0.3,0.6", "--importance", "l1",
                                  "--out-dir", str(out), "--executor", "ray", "--workers", "2"])
    cli.wait_for_task()
    os.killpg(cli.proc.pid, signal.SIGINT)
    cli.assert_interrupted(out)
    cli.assert_session_empty()


def test_kill_marked_kills_only_the_processes_with_the_token(tmp_path: Path) -> None:
    token = f"test-{os.getpid()}-{time.monotonic_ns()}"
    sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
    marked = subprocess.Popen(sleep, env={**os.environ, OWNER_ENV: token})
    other = subprocess.Popen(sleep, env={**os.environ, OWNER_ENV: token + "-other"})
    try:
        _until(lambda: OWNER_ENV.encode() in Path(f"/proc/{other.pid}/environ").read_bytes(), "the processes ran")
        assert kill_marked(token) == 1
        assert marked.wait(timeout=WAIT_S) == -signal.SIGKILL
        assert other.poll() is None
    finally:
        marked.kill()
        other.kill()
        marked.wait()
        other.wait()


# ---- a running cluster (--ray-address) ------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A one-node Ray cluster of this test's own (``ray start --head --block``), and the environment
    that joins it.  Torn down by its session, never with ``ray stop`` (which stops every cluster of
    this user on the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # A Ray temporary directory of its own: `ray start` writes the address of "the current cluster"
    # there, where every plain ray.init() on this machine would otherwise find and join it.  Short,
    # because Ray's socket paths inside it must fit a Unix socket's 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="oamipc-ray-", dir="/tmp"))
    # Token authentication is left off on both sides: the test does not touch ~/.ray/auth_token.
    env = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             f"--port={port}", "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **env}, cwd=tmp_path)
    address = f"127.0.0.1:{port}"
    try:
        _until(lambda: head.poll() is not None or _runs_a_task(address, env, probe=True), "the cluster is up")
        assert head.poll() is None, head.communicate()[1]
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        for line in _session(head.pid):
            with_pid = int(line.split()[0])
            try:
                os.kill(with_pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


def _runs_a_task(address: str, env: dict[str, str], probe: bool = False) -> bool:
    code = (f"import ray; ray.init(address={address!r}, log_to_driver=False); "
            "print(ray.get(ray.remote(lambda: 41 + 1).remote()))")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**os.environ, **env})
    except subprocess.TimeoutExpired:
        return False
    assert probe or done.returncode == 0, done.stderr
    return done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == ["42"]


@pytest.mark.slow  # starts a cluster of its own: about 35 s here
def test_ctrl_c_cancels_the_tasks_on_a_cluster_and_leaves_it_running(tmp_path: Path, out: Path,
                                                                      cluster: tuple[str, dict[str, str]]) -> None:
    address, env = cluster
    cli = Cli(tmp_path, "tasks", _mip_compile(out, "--jobs", "2", "--ray-address", address), env)
    worker = cli.wait_for_task()
    assert worker not in {int(line.split()[0]) for line in _session(cli.proc.pid)}, "the task runs on the cluster"
    os.kill(cli.proc.pid, signal.SIGINT)
    cli.assert_interrupted(out)
    _until(lambda: not _alive(worker), f"the cluster's worker {worker} (running the interrupted task) gone", GONE_S)
    assert _runs_a_task(address, env)
