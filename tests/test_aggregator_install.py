"""The aggregator installs and runs without TenSEAL, zstandard or any ML framework.

Sites install ``secagg[client]`` (TenSEAL to encrypt and decrypt); the aggregator is the base
install: it adds first polynomials with numpy (``secagg.polys``). Two checks: the base dependencies
in pyproject.toml name none of those packages, and a real ``secagg serve`` whose import system
refuses them serves a complete round to clients that do have TenSEAL.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import numpy as np
import pytest

import secagg
from secagg.release import grid

ROOT = Path(__file__).resolve().parent.parent
# What a site needs and the aggregator must not: SEAL (through TenSEAL), SEAL's compression, frameworks.
# (TenSEAL's compiled module is the top-level _tenseal_cpp.)
CLIENT_ONLY = ("tenseal", "_tenseal_cpp", "zstandard", "tensorflow", "keras", "torch")
# Shared objects these packages load; none may be mapped into the aggregator's process.
CLIENT_ONLY_LIBRARIES = ("tenseal", "_sealapi", "libseal", "zstandard", "tensorflow", "keras", "torch")

# The aggregator's process: an import finder that refuses CLIENT_ONLY (and records who asked), then
# `secagg serve` exactly as the console script runs it; at exit it reports what it imported.
_CHILD = """
import importlib.abc, json, sys
BLOCKED = set(sys.argv[1].split(","))
attempts = []

class RefuseClientPackages(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ImportError(f"{name} is not installed on the aggregator (blocked by the test)")
        return None

sys.meta_path.insert(0, RefuseClientPackages())
from secagg.cli import main
rc = main(sys.argv[2:])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("REPORT " + json.dumps({"rc": rc, "loaded": loaded, "attempts": attempts}), flush=True)
"""


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_base_dependencies_leave_out_tenseal_and_frameworks():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {_requirement_name(r) for r in project["dependencies"]}
    assert "numpy" in base and "grpcio" in base  # the parse found the real list
    forbidden = {"tenseal", "zstandard", "tensorflow", "tensorflow-cpu", "keras", "torch"}
    assert not base & forbidden, f"the aggregator's base install pulls {sorted(base & forbidden)}"
    # ... and sites still get them: the client extra carries SEAL and its compression.
    client = {_requirement_name(r) for r in project["optional-dependencies"]["client"]}
    assert {"tenseal", "zstandard"} <= client


class _BlockedAggregator:
    """``secagg serve`` in a child process whose imports of CLIENT_ONLY packages fail."""

    def __init__(self, server_key: Path, state_dir: Path) -> None:
        argv = ["serve", "--key", str(server_key), "--listen", "127.0.0.1:0", "--state-dir", str(state_dir)]
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, ",".join(CLIENT_ONLY), *argv],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        self.address = ""
        found = threading.Event()

        def pump() -> None:  # keep reading stderr so the server never blocks on a full pipe
            for line in self.proc.stderr:
                self.stderr.append(line)
                m = re.search(r"secagg: serving on (\S+)", line)
                if m and not found.is_set():
                    self.address = m.group(1)
                    found.set()
            found.set()

        self._reader = threading.Thread(target=pump, daemon=True)
        self._reader.start()
        found.wait(60)
        if not self.address:
            self.kill()
            raise AssertionError("the aggregator did not start without TenSEAL:\n" + "".join(self.stderr))

    def mapped_libraries(self) -> set[str]:
        """Paths of the shared objects mapped into the running aggregator."""
        maps = Path(f"/proc/{self.proc.pid}/maps").read_text()
        return {line.split()[-1] for line in maps.splitlines() if ".so" in line and "/" in line}

    def stop(self) -> dict:
        """SIGTERM, as an operator stops it; returns the child's report of what it imported."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        self._reader.join(10)
        reports = [line[len("REPORT "):] for line in out.splitlines() if line.startswith("REPORT ")]
        assert reports, "the aggregator did not report at exit:\n" + "".join(self.stderr)
        return json.loads(reports[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see the process's shared objects")
def test_aggregator_without_tenseal_serves_a_complete_round(keypair, client_key, tmp_path):
    aggregator = _BlockedAggregator(keypair.server, tmp_path / "state")
    try:
        n = 20_000  # 3 ciphertexts
        rng = np.random.default_rng(7)
        models = [rng.standard_normal(n).astype(np.float32) * 0.05 for _ in range(3)]
        weights = [120.0, 45.0, 800.0]
        status = secagg.create_round(aggregator.address, "no-tenseal", {"w": np.zeros(n, np.float32)}, clients=3,
                                     max_weight=1000.0)
        for i, (model, weight) in enumerate(zip(models, weights)):
            receipt = secagg.submit(aggregator.address, "no-tenseal", client_key, f"site-{i}", {"w": model},
                                    weight=weight)
            assert receipt.submitted == i + 1 and not receipt.already_accepted
        average = secagg.fetch_average(aggregator.address, "no-tenseal", client_key, wait=30)
        libraries = aggregator.mapped_libraries()
    finally:
        report = aggregator.stop() if aggregator.proc.poll() is None else {}
        aggregator.kill()

    assert average.contributions == 3 and set(average.clients) == {"site-0", "site-1", "site-2"}
    expected = sum(w * m.astype(np.float64) for m, w in zip(models, weights)) / sum(weights)
    # Released sums are rounded to the round's grid (secagg.release) in encoded units, where a weight W
    # is encoded as headroom * W / max_weight: the average can be off by about a grid step over the
    # encoded total weight, times (1 + |average|) because the total weight is rounded too.
    headroom = 2.0**18 / (status.expected * status.value_bound)
    encoded_weight = headroom * sum(weights) / status.max_weight
    tolerance = grid(3) * (1 + float(np.max(np.abs(expected)))) / encoded_weight
    error = float(np.max(np.abs(average.vector - expected)))
    assert error <= tolerance, f"max error {error:.3g} > {tolerance:.3g}"
    assert average.total_weight == pytest.approx(sum(weights), rel=1e-6)

    # The process never loaded them: nothing in its memory map, nothing in sys.modules at exit.
    assert not [p for p in libraries if any(name in Path(p).name.lower() or f"/{name}" in p.lower()
                                            for name in CLIENT_ONLY_LIBRARIES)]
    assert report["rc"] == 0
    assert report["loaded"] == [], f"the aggregator imported {report['loaded']}"
    # Nothing even tried (a module that falls back quietly on ImportError would still be a dependency).
    assert report["attempts"] == [], f"the aggregator tried to import {report['attempts']}"
