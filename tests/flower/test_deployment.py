"""A real Flower deployment on 127.0.0.1: one SuperLink, three SuperNode processes, the example app.

One encrypted round of ``clients/flower/app`` through ``clients/flower/run.py`` in deployment mode:
every site trains its forecaster, secagg's Mod encrypts the update, ``EncryptedFedAvg`` adds
ciphertexts, and each site's decrypted global model must equal the plaintext weighted mean of the
round's updates. The sites get their key only from their SuperNode's ``--node-config``. Afterwards
no process that the deployment started may be left.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("torch")

FLOWER_CLIENTS = Path(__file__).resolve().parents[2] / "clients" / "flower"
sys.path.insert(0, str(FLOWER_CLIENTS))

import loopback  # noqa: E402

_spec = importlib.util.spec_from_file_location("secagg_flower_demo", FLOWER_CLIENTS / "run.py")
assert _spec is not None and _spec.loader is not None
demo = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = demo  # dataclasses look their module up there
_spec.loader.exec_module(demo)

SITES = 3


def _processes_with_env(name: str, value: str) -> set[int]:
    """Live processes whose environment has ``name=value`` (a check independent of Loopback's marker)."""
    needle = f"{name}={value}".encode()
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                    continue
        except OSError:
            continue
        found.add(int(pid))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find the processes")
def test_three_supernodes_average_one_encrypted_round_and_leave_nothing(tmp_path: Path, monkeypatch) -> None:
    links: list[loopback.Loopback] = []
    running: list[set[int]] = []
    real_enter, real_run = loopback.Loopback.__enter__, loopback.Loopback.run

    def enter(self: loopback.Loopback) -> loopback.Loopback:
        links.append(self)
        return real_enter(self)

    def run(self: loopback.Loopback, *args, **kwargs):
        out = real_run(self, *args, **kwargs)
        running.append(self.marked_pids())
        return out

    monkeypatch.setattr(loopback.Loopback, "__enter__", enter)
    monkeypatch.setattr(loopback.Loopback, "run", run)

    # No run-config key: the sites must find theirs in their SuperNode's node config.
    result = demo.run_demo(tmp_path, simulation=False, supernodes=SITES, rounds=1, timeout=600,
                           run_config={"secagg-key": ""})

    assert len(links) == 1 and not links[0].simulation
    # While it ran: the SuperLink, 3 SuperNodes and their SuperExecs (at least 1 + 3).
    assert len(running[0]) >= 1 + SITES
    flwr_home = str(tmp_path / "flower" / "flwr-home")
    assert links[0].marked_pids() == set()
    assert _processes_with_env("FLWR_HOME", flwr_home) == set()
    assert all(proc.poll() is not None for _name, proc, _log in links[0]._procs)

    [round1] = result.history
    assert round1["state"] == "closed", round1
    assert round1["accepted"] == SITES and round1["sampled"] == SITES and not round1["refused"]
    assert round1["bytes_up"] > 0
    assert len(result.sites) == SITES
    for metrics in result.sites.values():
        assert metrics["reference-updates"] == SITES
        assert 0.0 <= metrics["max-error"] <= demo.TOLERANCE
    assert result.max_error is not None and result.max_error <= demo.TOLERANCE
    demo.check(result, SITES)
