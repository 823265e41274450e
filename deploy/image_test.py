"""``make image-test``: the aggregator's image, built and run by a real container engine.

1. Builds the aggregator image (``make image``) and the compose demo's site image (``make
   image-site``) with podman or docker; as root on Debian, installs podman, runc and docker-compose
   if no docker daemon answers and they are missing.
2. Runs the aggregator image as production would: its own config, non-root, read-only root, no
   capabilities, state on a named volume, the TLS files and ``server.key`` mounted read-only, ports
   published on 127.0.0.1.
3. From the host, with this repository's ``secagg``: an admin creates a round for three enrolled
   sites, two submit under mutual TLS, the container is SIGKILLed and started again on the same
   volume, the round still holds both submissions, the third site submits, all three fetch, and the
   global model is compared with the float64 weighted average.
4. Checks the image's HEALTHCHECK, its user, that ``tensorflow``, ``torch`` and ``tenseal`` are not
   importable in it, and that SIGTERM stops it with exit code 0; prints the image size.
5. Runs ``deploy/docker-compose.yml`` as its header says (``run --rm check``) with Docker's compose
   (the plugin or docker-compose v1); under podman through podman's Docker-compatible API. Its
   ``check`` service must pass and the three site services exit 0: they completed the round.

Every container, volume and temporary directory it creates is removed, also on failure.
Exit 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "deploy" / "docker-compose.yml"
IMAGE = os.environ.get("IMAGE", "secagg-aggregator")
SITE_IMAGE = os.environ.get("SITE_IMAGE", "secagg-site")
SECAGG = str(Path(sys.executable).with_name("secagg"))
UID = 10001  # the image's USER
SITES = {"site1": 250.0, "site2": 75.0, "site3": 1000.0}  # client id -> weight (sample count)
LAYOUT = {"lstm/kernel": (8, 128), "lstm/recurrent_kernel": (32, 128), "lstm/bias": (128,),
          "dense/kernel": (32, 1), "dense/bias": (1,)}
MAX_ERROR = 1e-6


class CheckFailed(Exception):
    """A check of the image failed; the message says which and what was seen."""


def log(message: str) -> None:
    print(f"image-test: {message}", flush=True)


def run(argv: list[str], *, check: bool = True, capture: bool = True, timeout: float = 900,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, text=True, capture_output=capture, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        out = (proc.stdout or "") + (proc.stderr or "") if capture else ""
        raise CheckFailed(f"{' '.join(argv[:4])} ... exited {proc.returncode}\n{out.strip()[-3000:]}")
    return proc


# -- the engine ----------------------------------------------------------------------------------------


@dataclass
class Engine:
    name: str  # "podman" or "docker"
    compose: list[str] = field(default_factory=list)  # the compose command, run against DOCKER_HOST

    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return run([self.name, *args], check=check, timeout=timeout)

    def inspect(self, what: str, name: str) -> dict:
        return json.loads(self(what, "inspect", name).stdout)[0]


def _works(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _compose_command() -> list[str]:
    """Docker's compose plugin, else Compose v1 (Debian's docker-compose)."""
    for argv in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(argv[0]) and _works([*argv, "version"]):
            return argv
    return []


def ensure_engine() -> Engine:
    """podman (with runc and a compose tool, installed if missing as root on Debian) or a docker that
    reaches its daemon. With podman, compose talks to podman's Docker-compatible API (see compose_round)."""
    wanted = os.environ.get("ENGINE")
    if wanted != "podman" and (wanted == "docker" or not shutil.which("podman")) and _works(["docker", "info"]):
        engine = Engine("docker", _compose_command())
    else:
        missing = [tool for tool in ("podman", "runc") if not shutil.which(tool)]
        if not _compose_command():
            missing.append("docker-compose")
        if missing:
            if os.geteuid() != 0 or not shutil.which("apt-get"):
                raise CheckFailed(f"missing: {', '.join(missing)} (and 'docker info' fails); install them "
                                  "(Debian: apt-get install podman runc docker-compose), or run this as root on "
                                  "Debian to have them installed")
            log(f"installing {' '.join(missing)} (apt-get)")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            run(["apt-get", "update", "-qq"], env=env)
            engine_packages = [p for p in missing if p != "docker-compose"]
            if engine_packages:
                run(["apt-get", "install", "-y", "-qq", *engine_packages], env=env, timeout=1800)
            if "docker-compose" in missing:  # without its recommended docker.io: podman is the engine
                run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker-compose"], env=env,
                    timeout=1800)
        conf = os.environ.get("PODMAN_CONF", str(REPO / "deploy" / "containers.conf"))
        if conf:
            os.environ["CONTAINERS_CONF"] = conf  # for every podman below, its API service included
        engine = Engine("podman", _compose_command())
    if not engine.compose:
        raise CheckFailed("no compose tool: install Docker's compose plugin or docker-compose")
    log(f"engine: {engine('--version').stdout.strip()}; compose: {' '.join(engine.compose)} "
        f"({run([*engine.compose, 'version'], check=False).stdout.splitlines()[0]})")
    return engine


# -- helpers -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def secagg(*args: str, tls: dict[str, Path] | None = None, timeout: float = 300) -> str:
    tls_args = [f"--tls-{k}={v}" for k, v in (tls or {}).items()]
    return run([SECAGG, *args, *tls_args], timeout=timeout).stdout


def make_model(path: Path, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {k: rng.standard_normal(s) * 0.5 for k, s in LAYOUT.items()}
    np.savez(path, **arrays)
    return arrays


def wait_healthy(engine: Engine, container: str, healthcheck: list[str], timeout: float = 120) -> float:
    """Run the image's HEALTHCHECK command in the container until it passes; returns the seconds taken."""
    start = time.monotonic()
    while True:
        state = engine.inspect("container", container)["State"]
        if not state["Running"]:
            logs = engine("logs", container, check=False)
            raise CheckFailed(f"{container} stopped (exit {state['ExitCode']}):\n{(logs.stdout + logs.stderr)[-3000:]}")
        if engine("exec", container, *healthcheck, check=False, timeout=30).returncode == 0:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise CheckFailed(f"{container}: HEALTHCHECK still failing after {timeout:.0f} s")
        time.sleep(1)


def image_healthcheck(engine: Engine, image: str) -> list[str]:
    """The image's HEALTHCHECK command as an argv (it is dropped by podman's OCI format)."""
    info = engine.inspect("image", image)
    health = (info.get("Config") or {}).get("Healthcheck") or info.get("Healthcheck") or {}
    test = health.get("Test") or []
    if not test or test[0] != "CMD":
        raise CheckFailed(f"{image} has no HEALTHCHECK in exec form (podman: build with --format docker): {health}")
    return test[1:]


# -- the checks ----------------------------------------------------------------------------------------


def build(engine: Engine) -> dict:
    env = dict(os.environ, ENGINE=engine.name)
    times = {}
    for target in ("image", "image-site"):
        start = time.monotonic()
        run(["make", "-C", str(REPO), target], capture=False, timeout=3600, env=env)
        times[target] = time.monotonic() - start
    size = int(engine.inspect("image", f"{IMAGE}:latest")["Size"])
    site_size = int(engine.inspect("image", f"{SITE_IMAGE}:latest")["Size"])
    log(f"OK: built {IMAGE} in {times['image']:.0f} s ({size / 1e6:.0f} MB), "
        f"{SITE_IMAGE} in {times['image-site']:.0f} s ({site_size / 1e6:.0f} MB)")
    return {"build_s": times["image"], "site_build_s": times["image-site"], "image_bytes": size,
            "site_image_bytes": site_size}


def inspect_image(engine: Engine) -> dict:
    """What is (not) in the image, read by the image's own Python."""
    probe = ("import importlib.metadata as m, importlib.util as u, json, sys; "
             "print(json.dumps({'python': sys.version.split()[0], "
             "'distributions': sorted(d.metadata['Name'] for d in m.distributions()), "
             "'importable': [n for n in ('tensorflow', 'torch', 'tenseal', 'keras') if u.find_spec(n)]}))")
    out = json.loads(engine("run", "--rm", "--entrypoint", "python", f"{IMAGE}:latest", "-c", probe).stdout)
    if out["importable"]:
        raise CheckFailed(f"importable in {IMAGE}: {out['importable']}")
    # And the imports themselves, as a user would try them.
    for module in ("tensorflow", "torch", "tenseal"):
        proc = engine("run", "--rm", "--entrypoint", "python", f"{IMAGE}:latest", "-c", f"import {module}",
                      check=False)
        if proc.returncode == 0 or "ModuleNotFoundError" not in proc.stderr:
            raise CheckFailed(f"'import {module}' in {IMAGE}: exit {proc.returncode} {proc.stderr.strip()[-300:]}")
    log(f"OK: Python {out['python']}, {len(out['distributions'])} distributions "
        f"({', '.join(out['distributions'])}); tensorflow, torch, tenseal not importable")
    return out


def serve_a_round(engine: Engine, stack: ExitStack, tmp: Path) -> dict:
    """The image serves a real round over mutual TLS, survives SIGKILL mid-round, stops on SIGTERM."""
    tag = secrets.token_hex(4)
    container, volume = f"secagg-image-test-{tag}", f"secagg-image-test-{tag}"
    pki, keys = tmp / "pki", tmp / "keys"
    secagg("certs", "init", "--dir", str(pki))
    secagg("certs", "issue", "--dir", str(pki), "--name", "server", "--server", "--host", "localhost",
           "--host", "127.0.0.1")
    for site in SITES:
        secagg("certs", "issue", "--dir", str(pki), "--name", site)
    secagg("certs", "issue", "--dir", str(pki), "--name", "ops", "--admin")
    secagg("keygen", "--out", str(keys))

    # The aggregator's mounts: copies readable by its uid, as a Secret with fsGroup would make them.
    tls_dir, key_dir = tmp / "aggregator-tls", tmp / "aggregator-key"
    for d, files in ((tls_dir, [pki / "ca.crt", pki / "server.crt", pki / "server.key"]), (key_dir, [keys / "server.key"])):
        d.mkdir()
        for f in files:
            shutil.copy(f, d / f.name)
            os.chmod(d / f.name, 0o440)
        os.chmod(d, 0o750)
        if os.geteuid() == 0:
            for p in (d, *d.iterdir()):
                os.chown(p, 0, UID)
        else:  # rootless: the container's uid is a subordinate id; let it read the copies
            for p in (d, *d.iterdir()):
                os.chmod(p, 0o755 if p.is_dir() else 0o444)

    engine("volume", "create", volume)
    stack.callback(engine, "volume", "rm", "-f", volume, check=False)
    grpc_port, metrics_port = free_port(), free_port()
    stack.callback(engine, "rm", "-f", "-t", "0", container, check=False)
    engine("run", "-d", "--name", container,
           "-p", f"127.0.0.1:{grpc_port}:50051", "-p", f"127.0.0.1:{metrics_port}:9090",
           "-v", f"{volume}:/var/lib/secagg", "-v", f"{tls_dir}:/etc/secagg/tls:ro",
           "-v", f"{key_dir}:/etc/secagg/federation:ro",
           "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
           "-e", "SECAGG_LOG_FORMAT=json", f"{IMAGE}:latest")
    healthcheck = image_healthcheck(engine, f"{IMAGE}:latest")
    started = wait_healthy(engine, container, healthcheck)
    proc1 = engine("exec", container, "sh", "-c", "grep -E '^(Uid|CapEff)' /proc/1/status").stdout.split()
    uid, cap_eff = proc1[1], proc1[-1]
    if uid != str(UID) or int(cap_eff, 16) != 0:
        raise CheckFailed(f"the aggregator runs as uid {uid} with capabilities {cap_eff}")
    log(f"OK: healthy after {started:.1f} s (the image's HEALTHCHECK: {' '.join(healthcheck)}); "
        f"process 1 runs as uid {uid}, CapEff {cap_eff}")

    server = f"127.0.0.1:{grpc_port}"
    admin_tls = {"ca": pki / "ca.crt", "cert": pki / "ops.crt", "key": pki / "ops.key"}
    site_tls = {s: {"ca": pki / "ca.crt", "cert": pki / f"{s}.crt", "key": pki / f"{s}.key"} for s in SITES}
    models = {s: make_model(tmp / f"{s}.npz", seed) for seed, s in enumerate(SITES, start=1)}
    round_id = "image-test"
    secagg("round", "create", "--server", server, "--round", round_id, "--clients", str(len(SITES)),
           "--template", str(tmp / "site1.npz"), "--enroll", ",".join(SITES), tls=admin_tls)

    def submit(site: str) -> None:
        secagg("submit", "--server", server, "--round", round_id, "--key", str(keys / "client.key"),
               "--client-id", site, "--model", str(tmp / f"{site}.npz"), "--weight", f"{SITES[site]:g}",
               "--quiet", tls=site_tls[site])

    def status() -> dict:
        return json.loads(secagg("round", "status", "--server", server, "--round", round_id, tls=admin_tls))

    first, last = list(SITES)[:2], list(SITES)[2]
    for site in first:
        submit(site)
    before = status()
    if before["state"] != "collecting" or before["submitted"] != 2:
        raise CheckFailed(f"after two submissions: {before}")

    engine("kill", "-s", "KILL", container)
    engine("wait", container, timeout=60)
    exit_code = engine.inspect("container", container)["State"]["ExitCode"]
    engine("start", container)
    restarted = wait_healthy(engine, container, healthcheck)
    after = status()
    if (after["state"], after["submitted"], sorted(after["clients"])) != ("collecting", 2, sorted(first)):
        raise CheckFailed(f"after SIGKILL and restart on the same volume the round is {after}, was {before}")
    log(f"OK: SIGKILLed mid-round (exit {exit_code}), healthy again after {restarted:.1f} s on the same "
        f"volume: round '{round_id}' still {after['state']} with {after['submitted']} of {after['expected']} "
        f"({', '.join(after['clients'])})")

    submit(last)
    weights = np.array(list(SITES.values()))
    expected = {k: sum(w * models[s][k] for w, s in zip(weights, SITES)) / weights.sum() for k in LAYOUT}
    errors = []
    for site in SITES:
        out = tmp / f"{site}-global.npz"
        secagg("fetch", "--server", server, "--round", round_id, "--key", str(keys / "client.key"),
               "--template", str(tmp / f"{site}.npz"), "--out", str(out), "--wait", "120", "--quiet",
               tls=site_tls[site])
        got = np.load(out)
        errors.append(max(float(np.abs(got[k] - v).max()) for k, v in expected.items()))
    max_error = max(errors)
    if max_error > MAX_ERROR:
        raise CheckFailed(f"the global model is not the weighted average: errors {errors}")
    log(f"OK: a mutual-TLS round through the container: 3 sites, weights {', '.join(f'{w:g}' for w in weights)}, "
        f"{sum(int(np.prod(s)) for s in LAYOUT.values())} parameters; max error vs the float64 weighted "
        f"average {max_error:.2e}")

    rss_kb = int(engine("exec", container, "sh", "-c", "grep VmRSS /proc/1/status").stdout.split()[1])
    log(f"OK: the aggregator's resident memory after the round: {rss_kb / 1024:.0f} MiB")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    if "secagg_" not in metrics:
        raise CheckFailed("the metrics port serves no secagg_ metrics")
    health = {}
    if engine.name == "podman":
        proc = engine("healthcheck", "run", container, check=False)
        if proc.returncode != 0:
            raise CheckFailed(f"podman healthcheck run: exit {proc.returncode} {proc.stdout}{proc.stderr}")
        health = {"podman_healthcheck_run": (proc.stdout.strip() or "healthy")}
        log(f"OK: podman healthcheck run {container}: {health['podman_healthcheck_run']}; /metrics serves secagg_*")

    engine("stop", "-t", "30", container, timeout=60)
    stop_code = engine.inspect("container", container)["State"]["ExitCode"]
    if stop_code != 0:
        raise CheckFailed(f"SIGTERM: the aggregator exited {stop_code}, not 0")
    log("OK: SIGTERM stops it with exit code 0")
    return {"max_error": max_error, "errors": errors, "healthy_after_s": started, "restart_healthy_s": restarted,
            "kill_exit_code": exit_code, "uid": int(uid), "rss_kb": rss_kb, **health}


def podman_api(stack: ExitStack, tmp: Path) -> str:
    """podman's Docker-compatible API on a socket of this run (stopped at the end); its DOCKER_HOST."""
    sock = tmp / "podman.sock"
    service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"],
                               stdout=subprocess.DEVNULL, stderr=open(tmp / "podman-service.log", "w"))

    def stop() -> None:
        service.terminate()
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()

    stack.callback(stop)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if service.poll() is not None or time.monotonic() > deadline:
            raise CheckFailed(f"podman system service did not start: {(tmp / 'podman-service.log').read_text()}")
        time.sleep(0.2)
    return f"unix://{sock}"


def run_due_healthchecks(engine: Engine, project: str, stop: threading.Event) -> None:
    """Run the HEALTHCHECK of the project's containers that have not passed it yet.

    podman schedules health checks with systemd timers; without systemd (this sandbox: "unable to get
    systemd connection to add healthchecks") they never run and a `service_healthy` dependency would
    wait forever. This does what the timer would, with the container's own HEALTHCHECK command.
    """
    while not stop.wait(2):
        due = engine("ps", "-q", "--filter", f"label=com.docker.compose.project={project}",
                     "--filter", "health=starting", check=False).stdout.split()
        for container in due:
            engine("healthcheck", "run", container, check=False, timeout=60)


def compose_round(engine: Engine, stack: ExitStack, tmp: Path) -> dict:
    """deploy/docker-compose.yml as its header says to run it: `run --rm check` must pass, i.e. the
    compose tool started certs, keygen, the aggregator, admin and the three sites in their depends_on
    order and the sites completed the round."""
    project = f"secagg-image-test-{secrets.token_hex(4)}"
    env = dict(os.environ, SECAGG_DEMO_GRPC_PORT=str(free_port()), SECAGG_DEMO_METRICS_PORT=str(free_port()))
    if engine.name == "podman":
        env["DOCKER_HOST"] = podman_api(stack, tmp)
    base = [*engine.compose, "-p", project, "-f", str(COMPOSE_FILE)]
    stack.callback(run, [*base, "down", "-v", "-t", "5"], check=False, timeout=300, env=env)
    if engine.name == "podman" and not Path("/run/systemd/system").exists():
        stop = threading.Event()
        checker = threading.Thread(target=run_due_healthchecks, args=(engine, project, stop), daemon=True)
        checker.start()
        stack.callback(checker.join)
        stack.callback(stop.set)
    start = time.monotonic()
    proc = run([*base, "run", "--rm", "check"], check=False, timeout=900, env=env)
    seconds = time.monotonic() - start
    out = proc.stdout + proc.stderr
    line = next((x for x in out.splitlines() if "max error of each site's global model" in x), "")
    if proc.returncode != 0 or not line:
        logs = run([*base, "logs", "--no-color"], check=False, timeout=120, env=env)
        raise CheckFailed(f"compose: 'run --rm check' exited {proc.returncode}\n{out[-4000:]}\n"
                          f"--- logs ---\n{(logs.stdout + logs.stderr)[-6000:]}")
    ids = engine("ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={project}").stdout.split()
    states = {}
    for container in ids:
        info = engine.inspect("container", container)
        states[info["Config"]["Labels"].get("com.docker.compose.service")] = info["State"]
    exited = sorted(s for s, state in states.items() if s and s.startswith("site") and not state["Running"]
                    and state["ExitCode"] == 0)
    if exited != ["site1", "site2", "site3"]:
        raise CheckFailed(f"compose: the site services did not all exit 0: {states}")
    log(f"OK: {COMPOSE_FILE.relative_to(REPO)} with {' '.join(engine.compose)} in {seconds:.0f} s: "
        f"{', '.join(exited)} exited 0; check: {line.strip()}")
    return {"compose_s": seconds, "compose_check": line.strip()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-build", action="store_true", help="use the images already built")
    parser.add_argument("--no-compose", action="store_true", help="skip the compose demo")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    start = time.monotonic()
    report: dict = {}
    try:
        engine = ensure_engine()
        report["engine"] = engine.name
        if not args.skip_build:
            report.update(build(engine))
        report["image"] = inspect_image(engine)
        with ExitStack() as stack:
            tmp = Path(tempfile.mkdtemp(prefix="secagg-image-test."))
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
            report.update(serve_a_round(engine, stack, tmp))
        if not args.no_compose:
            with ExitStack() as stack:
                tmp = Path(tempfile.mkdtemp(prefix="secagg-image-test."))
                stack.callback(shutil.rmtree, tmp, ignore_errors=True)
                report.update(compose_round(engine, stack, tmp))
    except (CheckFailed, subprocess.TimeoutExpired) as err:
        log(f"FAILED: {err}")
        return 1
    report["total_s"] = time.monotonic() - start
    size = report.get("image_bytes") or int(engine.inspect("image", f"{IMAGE}:latest")["Size"])
    log(f"PASSED in {report['total_s']:.0f} s; image {IMAGE}:latest {size / 1e6:.0f} MB"
        + (f", built in {report['build_s']:.0f} s" if "build_s" in report else ""))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
