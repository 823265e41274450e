"""secagg[flower] installs beside Flower, and the ServerApp side stays free of TenSEAL and frameworks."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_this_environment_runs_flower_1_42_on_protobuf_6():
    assert version("flwr") == "1.42.0"
    assert version("protobuf").split(".")[0] == "6"
    # Both generated codes and gRPC's health service load in one process (their runtime checks pass).
    out = subprocess.run([sys.executable, "-c",
                          "import flwr.proto.fleet_pb2, secagg.transport.secagg_pb2, secagg.transport.secagg_pb2_grpc, "
                          "grpc_health.v1.health; print('ok')"], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.slow
def test_secagg_flower_resolves_with_flwr_simulation_in_a_fresh_virtualenv(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    report = tmp_path / "report.json"
    done = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "--dry-run", "--quiet",
                           "--report", str(report), f"secagg[flower] @ {ROOT.as_uri()}", "flwr[simulation]==1.42.0"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    resolved = {item["metadata"]["name"].lower(): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    assert resolved["flwr"] == "1.42.0" and resolved["secagg"]
    assert resolved["protobuf"].split(".")[0] == "6"
    assert "tenseal" in resolved  # the site's half (secagg[client]) comes with the extra


# The ServerApp's process: imports of TenSEAL and the frameworks fail; build the strategy, report what loaded.
_CHILD = """
import importlib.abc, json, sys
BLOCKED = {"tenseal", "_tenseal_cpp", "zstandard", "tensorflow", "keras", "torch"}

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked by the test")
        return None

sys.meta_path.insert(0, Refuse())
from secagg.flower import EncryptedFedAvg
s = EncryptedFedAvg(sys.argv[1], sys.argv[2])
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)))
"""


def test_the_server_strategy_needs_neither_tenseal_nor_a_framework(keypair, tmp_path):
    out = subprocess.run([sys.executable, "-c", _CHILD, str(keypair.server), str(tmp_path / "state")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
