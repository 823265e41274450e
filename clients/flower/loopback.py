"""A local Flower deployment on 127.0.0.1, started and stopped from Python.

``Loopback`` starts a real Flower 1.42 SuperLink (and, outside simulation, real SuperNodes) as
child processes, runs Flower Apps on it with ``flwr run``, and stops everything it started. The
secagg Flower demo (``clients/flower/run.py``), its deployment test and the Flower benchmark use it::

    with Loopback(workdir, supernodes=3, node_configs=[{"secagg-key": "/keys/client.key"}] * 3) as link:
        link.run(Path("clients/flower/app"), run_config={"num-server-rounds": 2})

Two shapes:

- ``simulation=True``: one ``flower-superlink --simulation``; the run's ClientApps are simulated
  SuperNodes (Ray actors), their number given per run (``federation_config={"num-supernodes": 3}``).
- ``simulation=False``: one SuperLink plus ``supernodes`` ``flower-supernode`` processes, each
  with its own runtime port and ``--node-config`` (``node_configs[i]``, written as TOML values).

Everything is offline: runtime dependency installation and the update check are off, and the
CLI talks to our SuperLink through a connection written to ``workdir/flwr-home/config.toml``
(``FLWR_HOME``), never ``":local:"``, which would start a detached SuperLink that outlives us.
Logs go to ``workdir/logs/``; errors quote their tails.

Stopping: the SuperLink and each SuperNode start a ``flower-superexec`` child in a new session,
which starts the ServerApp, ClientApps or simulation (and Ray) processes. Every process we start
carries a unique marker in its environment, which its descendants inherit, so ``stop`` finds them
all by scanning ``/proc`` (Linux), SIGTERMs them, waits, SIGKILLs what remains and checks that none
is left: it never signals a process by name.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

import tomli_w

#: The environment variable that marks every process of one Loopback (value: a random token).
MARKER_ENV = "SECAGG_FLOWER_LOOPBACK"
#: The name of our SuperLink connection in ``config.toml``.
CONNECTION = "loopback"
#: How long a SuperLink or SuperNode may take to come up.
START_TIMEOUT = 120.0
#: How long stopped processes get between SIGTERM and SIGKILL.
TERM_GRACE = 10.0
#: What a SuperNode logs once the SuperLink registered it.
_NODE_ID = re.compile(r"SuperNode ID: \d+")


class LoopbackError(RuntimeError):
    """A Flower process failed to start, a run failed or timed out, or a process outlived stop()."""


class Loopback:
    """A Flower SuperLink (+ SuperNodes) on 127.0.0.1; a context manager.

    Args:
        workdir: directory for logs and ``flwr-home/`` (created if missing).
        supernodes: number of ``flower-supernode`` processes (ignored with ``simulation``).
        simulation: run a simulation SuperLink instead of SuperNodes.
        node_configs: one dict per SuperNode, passed as ``--node-config`` (values become TOML).
        env: extra environment variables for every Flower process.
    """

    def __init__(self, workdir: Path, supernodes: int = 3, *, simulation: bool = False,
                 node_configs: list[dict[str, object]] | None = None, env: dict[str, str] | None = None) -> None:
        if not simulation and supernodes < 1:
            raise ValueError("a deployment needs at least one SuperNode")
        if node_configs is not None and not simulation and len(node_configs) != supernodes:
            raise ValueError(f"node_configs has {len(node_configs)} entries for {supernodes} SuperNodes")
        self.workdir = Path(workdir).resolve()
        self.supernodes = 0 if simulation else supernodes
        self.simulation = simulation
        self.node_configs = node_configs or [{} for _ in range(self.supernodes)]
        self.flwr_home = self.workdir / "flwr-home"
        self.log_dir = self.workdir / "logs"
        self.address = ""
        self.token = secrets.token_hex(8)
        self._bin = _venv_bin()
        self._env = _flower_env(self._bin, self.flwr_home, extra=env)
        self._env[MARKER_ENV] = self.token
        self._procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self._runs = 0

    # ── lifecycle ────────────────────────────────────────────────────────────────────────────

    def __enter__(self) -> Loopback:
        try:
            self.start()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.stop()
        except LoopbackError as err:
            if exc is None:
                raise
            print(f"loopback: {err}", file=sys.stderr)  # don't hide the error already raised

    def start(self) -> None:
        """Start the SuperLink and the SuperNodes and wait until each is ready."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self._write_connection()
        cmd = [str(self._bin / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
               "--disable-runtime-dependency-installation"]
        if self.simulation:
            cmd.append("--simulation")
        link = self._spawn("superlink", cmd)
        self._wait_listening("superlink", link, port)
        runtime_ports: list[int] = []
        for i, node_config in enumerate(self.node_configs[: self.supernodes]):
            runtime_port = free_port(exclude={port, *runtime_ports})
            runtime_ports.append(runtime_port)
            cmd = [str(self._bin / "flower-supernode"), "--insecure", "--superlink", self.address,
                   "--port", str(runtime_port)]
            if node_config:
                cmd += ["--node-config", node_config_arg(node_config)]
            self._spawn(f"supernode-{i}", cmd)
        for (name, proc, _), runtime_port in zip(self._procs[1:], runtime_ports):
            self._wait_listening(name, proc, runtime_port)
        if self.supernodes:
            self._wait_registered()

    def stop(self) -> None:
        """SIGTERM everything this Loopback started (and their descendants), SIGKILL stragglers,
        and raise ``LoopbackError`` if a process survives."""
        # Runs and SuperNodes before the SuperLink (reverse start order), then every marked
        # process: the SuperExecs in their own sessions and whatever they started.
        for _name, proc, _log in reversed(self._procs):
            _signal_group(proc, signal.SIGTERM)
        for pid in self.marked_pids():
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE
        while time.monotonic() < deadline and (self._alive_children() or self.marked_pids()):
            time.sleep(0.2)
        for _name, proc, _log in self._procs:
            _signal_group(proc, signal.SIGKILL)
        for pid in self.marked_pids():
            _kill(pid, signal.SIGKILL)
        for _name, proc, _log in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and self.marked_pids():
            time.sleep(0.1)
        left = self.marked_pids()
        if left or self._alive_children():
            raise LoopbackError(f"processes still alive after SIGKILL: {sorted(left)}")

    def marked_pids(self) -> set[int]:
        """Live (non-zombie) processes that carry this Loopback's marker: those we started and
        all their descendants, including the ones started in new sessions."""
        return marked_pids(self.token)

    # ── runs ─────────────────────────────────────────────────────────────────────────────────

    def run(self, app_dir: Path, run_config: Mapping[str, object] | None = None,
            federation_config: Mapping[str, object] | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """Run the Flower App in ``app_dir`` to its end with ``flwr run APP loopback --stream``.

        ``run_config`` overrides the app's ``[tool.flwr.app.config]`` (keys must exist there);
        ``federation_config`` is the simulation's, e.g. ``{"num-supernodes": 3}``. Returns the
        finished process, its combined output in ``stdout`` (also in ``logs/run-N.log``). Raises
        ``LoopbackError`` with the tails of the logs if the run fails, does not finish within
        ``timeout`` seconds, or a Flower process died.
        """
        if not self.address:
            raise LoopbackError("the Loopback is not started: use it as a context manager")
        self._runs += 1
        log_path = self.log_dir / f"run-{self._runs}.log"
        cmd = [str(self._bin / "flwr"), "run", str(Path(app_dir).resolve()), CONNECTION, "--stream"]
        if run_config:
            config_path = self.workdir / f"run-config-{self._runs}.toml"
            config_path.write_text(tomli_w.dumps(dict(run_config)), encoding="utf-8")
            cmd += ["--run-config", str(config_path)]
        if federation_config:
            cmd += ["--federation-config", " ".join(f"{k}={toml_value(v)}" for k, v in federation_config.items())]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self._env, cwd=self.workdir, start_new_session=True)
            self._procs.append((f"run-{self._runs}", proc, log_path))
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGTERM)
                proc.wait()
                run_id = _run_id(log_path.read_text(encoding="utf-8", errors="replace"))
                if run_id is not None:  # so that the Loopback can take another run
                    self._flwr("stop", str(run_id), CONNECTION)
                raise LoopbackError(f"the run did not finish within {timeout:.0f} s\n{self._run_tails()}") from None
        output = log_path.read_text(encoding="utf-8", errors="replace")
        if proc.returncode != 0:
            raise LoopbackError(f"flwr run exited with {proc.returncode}\n{self._run_tails()}")
        run_id = _run_id(output)
        status = self.run_status(run_id) if run_id is not None else "unknown (no run id in the output)"
        if not status.startswith("finished:completed"):
            raise LoopbackError(f"run {run_id} ended as {status!r}\n{self._run_tails()}")
        dead = [name for name, p, _ in self._procs if not name.startswith("run-") and p.poll() is not None]
        if dead:
            raise LoopbackError(f"Flower processes died during the run: {', '.join(dead)}\n{self._run_tails()}")
        return subprocess.CompletedProcess(cmd, proc.returncode, stdout=output, stderr="")

    def run_status(self, run_id: int) -> str:
        """The run's status from ``flwr ls``, e.g. ``finished:completed`` or ``finished:failed``."""
        res = self._flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        match = re.search(r'"status"\s*:\s*"([^"]+)"', res.stdout)
        return match.group(1) if match else f"unknown (flwr ls: {res.stdout.strip()} {res.stderr.strip()})"

    def log_tails(self, lines: int = 25, names: Iterable[str] | None = None) -> str:
        """The last ``lines`` lines of the logs of ``names`` (default: every process), one block each."""
        wanted = None if names is None else list(names)
        procs = self._procs if wanted is None else sorted(
            (p for p in self._procs if p[0] in wanted), key=lambda p: wanted.index(p[0]))
        blocks = []
        for name, _proc, path in procs:
            try:
                # The SuperLink logs every HTTP request; those lines bury the ones that explain an error.
                text = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                        if "[uvicorn.access]" not in line]
            except OSError:
                continue
            blocks.append(f"--- {name} ({path}), last {lines} lines:\n" + "\n".join(text[-lines:]))
        return "\n".join(blocks)

    # ── internals ────────────────────────────────────────────────────────────────────────────

    def _run_tails(self) -> str:
        """The current run's log (longer), then the SuperLink's and SuperNodes'."""
        current = f"run-{self._runs}"
        servers = [name for name, _p, _l in self._procs if not name.startswith("run-")]
        return self.log_tails(60, [current]) + "\n" + self.log_tails(25, servers)

    def _flwr(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A ``flwr`` CLI command against our SuperLink (best effort: never raises on failure)."""
        try:
            return subprocess.run([str(self._bin / "flwr"), *args], capture_output=True, text=True, env=self._env,
                                  cwd=self.workdir, timeout=120)
        except subprocess.TimeoutExpired as err:
            return subprocess.CompletedProcess(err.cmd, -1, stdout="", stderr=f"timed out after {err.timeout} s")

    def _write_connection(self) -> None:
        config = {"superlink": {"default": CONNECTION, CONNECTION: {"address": self.address, "insecure": True}}}
        (self.flwr_home / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            # A session of its own: its process group can be signalled without touching ours.
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self._env, cwd=self.workdir, start_new_session=True)
        self._procs.append((name, proc, log_path))
        return proc

    def _wait_listening(self, name: str, proc: subprocess.Popen[bytes], port: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LoopbackError(f"{name} exited with {proc.returncode} while starting\n{self.log_tails()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise LoopbackError(f"{name} did not listen on 127.0.0.1:{port} within {START_TIMEOUT:.0f} s\n"
                            f"{self.log_tails()}")

    def _wait_registered(self) -> None:
        """Wait until every SuperNode has registered with the SuperLink: it then logs the node id
        the SuperLink gave it (cheaper than polling ``flwr supernode ls``, a CLI start each time)."""
        deadline = time.monotonic() + START_TIMEOUT
        nodes = [(name, proc, log) for name, proc, log in self._procs if name.startswith("supernode-")]
        waiting = nodes
        while time.monotonic() < deadline:
            waiting = [(name, proc, log) for name, proc, log in waiting
                       if _NODE_ID.search(log.read_text(encoding="utf-8", errors="replace")) is None]
            if not waiting:
                return
            for name, proc, _log in self._procs:
                if proc.poll() is not None:
                    raise LoopbackError(f"{name} exited with {proc.returncode} while starting\n{self.log_tails()}")
            time.sleep(0.2)
        raise LoopbackError(f"{len(waiting)} of {len(nodes)} SuperNodes did not register within "
                            f"{START_TIMEOUT:.0f} s\n{self.log_tails()}")

    def _alive_children(self) -> list[str]:
        return [name for name, proc, _log in self._procs if proc.poll() is None]


# ── helpers ──────────────────────────────────────────────────────────────────────────────────


def free_port(exclude: Iterable[int] = ()) -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (and is not in ``exclude``)."""
    excluded = set(exclude)
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in excluded:
            return port
    raise LoopbackError("no free port on 127.0.0.1")


def toml_value(value: object) -> str:
    """``value`` as a TOML value (strings quoted and escaped), as ``--node-config`` and
    ``--run-config``/``--federation-config`` pairs expect it."""
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def node_config_arg(config: Mapping[str, object]) -> str:
    """``{"secagg-key": "/k/client.key", "partition-id": 0}`` -> ``secagg-key="/k/client.key" partition-id=0``."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in config.items())


def marked_pids(token: str) -> set[int]:
    """Live, non-zombie processes whose environment has ``MARKER_ENV=token``."""
    needle = f"{MARKER_ENV}={token}".encode()
    found: set[int] = set()
    if not os.path.isdir("/proc"):  # not Linux: only the processes we started directly are tracked
        return found
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            if needle not in environ:
                continue
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:  # gone, or not ours to read
            continue
        if state not in (b"Z", b"X"):
            found.add(pid)
    return found


def _venv_bin() -> Path:
    """The directory of this interpreter's scripts (the venv's bin), where Flower's commands are."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "flower-superlink").exists():
        raise LoopbackError(f"flower-superlink not found next to {sys.executable}: install secagg[flower]")
    return bin_dir


def _flower_env(bin_dir: Path, flwr_home: Path, extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    # SuperExec starts flwr-serverapp / flwr-clientapp / flwr-simulation by name: from our venv.
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def _run_id(output: str) -> int | None:
    match = re.search(r"Successfully started run (\d+)", output)
    return int(match.group(1)) if match else None


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the process group we created for ``proc`` (pgid = its pid) while ``proc`` lives.

    Once it is reaped its pid may be reused; group members that outlive it carry the marker and
    are found by ``marked_pids``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
