"""secagg inside Flower, end to end on this machine (``make flower-demo``).

    python clients/flower/run.py [--simulation | --deployment] [--supernodes 3] [--rounds 2] [--workdir DIR]

1. ``secagg keygen`` writes the sites' ``client.key`` and the aggregator's ``server.key``;
2. a local Flower deployment starts on 127.0.0.1 (``loopback.py``): one SuperLink in simulation
   mode (the sites are simulated SuperNodes), or with ``--deployment`` one SuperLink and one
   ``flower-supernode`` process per site, each told its key by ``--node-config secagg-key=...``;
3. ``flwr run`` runs the example app (``app/``): every round, each site trains a PyTorch
   LSTM forecaster on its own pedestrian sensor, secagg's Mod encrypts the update, and the
   ServerApp's ``EncryptedFedAvg`` adds ciphertexts only;
4. after the last round every site decrypts the global model and compares it with the plaintext
   weighted mean of the round's updates (a demo-only check: the sites share this disk).

Prints one line per round and ``max error: <value>`` (the largest over the sites); exits 1 if it
exceeds 1e-6 or anything failed. Everything runs offline and everything it starts is stopped.
Without ``--workdir`` the work directory is a temporary one, removed after a successful run and
kept (with its logs) after a failure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a script: loopback.py sits beside it
    sys.path.insert(0, str(HERE))

from loopback import Loopback, LoopbackError  # noqa: E402

#: The example Flower App (a FAB directory).
APP_DIR = HERE / "app"
#: What run_demo writes in its work directory (and replaces when it is reused).
DEMO_FILES = ("keys", "aggregator-state", "plaintext-reference", "result.json", "flower")
#: The largest acceptable distance between the decrypted global and the plaintext weighted mean.
TOLERANCE = 1e-6


class DemoError(RuntimeError):
    """The demo ran but its result is missing or wrong."""


@dataclass(frozen=True)
class DemoResult:
    """What the ServerApp wrote to ``result-path``, plus where and how long."""

    rounds: int
    history: list[dict]
    train_metrics: dict[str, dict]
    sites: dict[str, dict]
    max_error: float | None
    seconds: float
    phases: dict[str, float]
    workdir: Path

    @property
    def accepted(self) -> list[int]:
        """Encrypted updates accepted per round."""
        return [int(h.get("accepted", 0)) for h in self.history]


def keygen(out: Path) -> tuple[Path, Path]:
    """``secagg keygen --out OUT``; returns (client.key, server.key)."""
    res = subprocess.run([sys.executable, "-m", "secagg.cli", "keygen", "--out", str(out)], capture_output=True,
                         text=True, timeout=300)
    if res.returncode != 0:
        raise DemoError(f"secagg keygen failed: {res.stderr.strip() or res.stdout.strip()}")
    client, server = out / "client.key", out / "server.key"
    if not (client.exists() and server.exists()):
        raise DemoError(f"secagg keygen wrote no client.key/server.key in {out}")
    return client, server


def run_demo(workdir: Path, *, simulation: bool = True, supernodes: int = 3, rounds: int = 2,
             timeout: float = 900, run_config: dict[str, object] | None = None) -> DemoResult:
    """Keys, a Loopback deployment, one ``flwr run`` of the example app; its result.

    ``run_config`` overrides further app settings (``app/pyproject.toml``). Raises
    ``LoopbackError`` if Flower failed and ``DemoError`` if the app wrote no result.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # A fresh start: stale reference updates or a stale result would falsify the check.
    for name in DEMO_FILES:
        path = workdir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    started = time.monotonic()
    client_key, server_key = keygen(workdir / "keys")
    result_path = workdir / "result.json"
    config: dict[str, object] = {
        "num-server-rounds": rounds,
        "min-nodes": supernodes,
        "secagg-key": str(client_key),  # read only by simulated sites (no node config of their own)
        "secagg-server-key": str(server_key),
        "secagg-state-dir": str(workdir / "aggregator-state"),
        "reference-dir": str(workdir / "plaintext-reference"),  # demo only, see client_app.py
        "result-path": str(result_path),
        **(run_config or {}),
    }
    # A real site would hold only its own key file; here every site reads the one keygen wrote.
    node_configs = [{"partition-id": i, "num-partitions": supernodes, "secagg-key": str(client_key)}
                    for i in range(supernodes)]
    phases = {"keygen": time.monotonic() - started}
    mark = time.monotonic()
    with Loopback(workdir / "flower", supernodes, simulation=simulation, node_configs=node_configs) as link:
        phases["start Flower"], mark = time.monotonic() - mark, time.monotonic()
        link.run(APP_DIR, config, {"num-supernodes": supernodes} if simulation else None, timeout=timeout)
        phases["flwr run"], mark = time.monotonic() - mark, time.monotonic()
    phases["stop Flower"] = time.monotonic() - mark
    if not result_path.exists():
        raise DemoError(f"the run finished but wrote no {result_path}; logs in {workdir / 'flower' / 'logs'}")
    result = json.loads(result_path.read_text(encoding="utf-8"))
    max_error = result.get("max-error")
    return DemoResult(rounds=int(result["rounds"]), history=list(result["history"]),
                      train_metrics=dict(result.get("train-metrics", {})), sites=dict(result["sites"]),
                      max_error=None if max_error is None else float(max_error),
                      seconds=time.monotonic() - started, phases=phases, workdir=workdir)


def check(result: DemoResult, supernodes: int) -> None:
    """Raise ``DemoError`` unless every round closed with every site and the max error is within ``TOLERANCE``."""
    if len(result.history) != result.rounds:
        raise DemoError(f"{len(result.history)} of {result.rounds} rounds ran")
    for h in result.history:
        if h.get("state") != "closed" or int(h.get("accepted", 0)) != supernodes:
            raise DemoError(f"round {h.get('round')} ended {h.get('state')} with {h.get('accepted')} of {supernodes} "
                            f"updates: {h.get('reason') or h.get('refused')}")
    if len(result.sites) != supernodes:
        raise DemoError(f"{len(result.sites)} of {supernodes} sites answered the final query")
    if result.max_error is None:
        raise DemoError("no site reported max-error")
    if not result.max_error <= TOLERANCE:
        raise DemoError(f"max error {result.max_error:.3g} exceeds {TOLERANCE:g}: the decrypted global model differs "
                        f"from the plaintext weighted mean")


def report(result: DemoResult) -> None:
    """Per-round lines, per-site lines and ``max error: <value>``."""
    for h in result.history:
        loss = result.train_metrics.get(str(h["round"]), {}).get("train-loss")
        print(f"round {h['round']}: {h['state']}, {h.get('accepted')}/{h.get('sampled')} encrypted updates accepted, "
              f"{float(h.get('seconds', 0.0)):.1f} s, up {int(h.get('bytes_up', 0)) / 1e6:.2f} MB/site, "
              f"down {int(h.get('bytes_down', 0)) / 1e6:.2f} MB/site"
              + (f", mean train-loss {float(loss):.4f}" if loss is not None else ""))
    for node, metrics in sorted(result.sites.items()):
        print(f"site node-{node}: val-loss {float(metrics.get('val-loss', float('nan'))):.4f}, "
              f"max error {float(metrics.get('max-error', float('nan'))):.3g} "
              f"(vs {int(metrics.get('reference-updates', 0))} plaintext updates)")
    print("time: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.phases.items()))
    print(f"max error: {result.max_error:.3g}" if result.max_error is not None else "max error: none")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--simulation", dest="simulation", action="store_true", default=True,
                      help="simulated SuperNodes in one SuperLink (default)")
    mode.add_argument("--deployment", dest="simulation", action="store_false",
                      help="one flower-supernode process per site")
    p.add_argument("--supernodes", type=int, default=3, help="sites (at least 3, secagg's minimum cohort; default 3)")
    p.add_argument("--rounds", type=int, default=2, help="federated rounds (default 2)")
    p.add_argument("--workdir", type=Path, help="keep keys, state, logs and result.json here, replacing a previous demo's "
                                                "(default: a temporary directory, removed after success)")
    p.add_argument("--timeout", type=float, default=900, help="seconds the run may take (default 900)")
    args = p.parse_args(argv)
    if args.supernodes < 3:
        p.error("--supernodes must be at least 3: secagg refuses to release a sum of fewer sites")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    # A SIGTERM (e.g. from a CI timeout) unwinds like Ctrl-C, so Loopback stops what it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="secagg-flower-"))
    mode_name = "simulation" if args.simulation else "deployment"
    print(f"secagg inside Flower: {args.supernodes} sites, {args.rounds} rounds, {mode_name}, work dir {workdir}",
          flush=True)
    try:
        result = run_demo(workdir, simulation=args.simulation, supernodes=args.supernodes, rounds=args.rounds,
                          timeout=args.timeout)
        report(result)
        check(result, args.supernodes)
    except (LoopbackError, DemoError) as err:
        print(f"flower demo: error: {err}\nflower demo: logs and keys kept in {workdir}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"flower demo: interrupted; everything it started is stopped; files in {workdir}", file=sys.stderr)
        return 130
    print(f"ok: {result.seconds:.0f} s")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
