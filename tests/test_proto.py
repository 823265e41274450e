"""The committed gRPC modules are exactly what `make proto` generates from proto/secagg.proto."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ["secagg_pb2.py", "secagg_pb2_grpc.py", "secagg_pb2.pyi"]


def _make_proto_recipe() -> tuple[str, str]:
    """The protoc command line and the sed expression of the Makefile's `proto` target."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    recipe = text.split("\nproto:", 1)[1].split("\n\n", 1)[0]
    protoc = re.search(r"-m grpc_tools\.protoc (.+)", recipe).group(1).strip()
    sed = re.search(r"sed -i '([^']+)' secagg/transport/secagg_pb2_grpc\.py", recipe).group(1)
    return protoc, sed


def test_generated_modules_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    protoc, sed = _make_proto_recipe()
    # The same arguments, with the output directory moved to tmp_path.
    args = protoc.split()
    assert args.count("--python_out=secagg/transport") == 1 and args[-1] == "proto/secagg.proto"
    args = [a.replace("=secagg/transport", f"={tmp_path}") for a in args]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", *args], cwd=ROOT, check=True, capture_output=True)
    # The Makefile's sed fix-up, applied the same way.
    m = re.fullmatch(r"s/(.+?)/(.+?)/", sed)
    pattern, replacement = m.group(1), m.group(2)
    grpc_file = tmp_path / "secagg_pb2_grpc.py"
    grpc_file.write_text("".join(re.sub(pattern, replacement, line) for line in grpc_file.read_text().splitlines(True)))
    assert "from secagg.transport import secagg_pb2 as" in grpc_file.read_text()

    for name in GENERATED:
        fresh = (tmp_path / name).read_text()
        committed = (ROOT / "secagg" / "transport" / name).read_text()
        assert fresh == committed, f"secagg/transport/{name} is stale or edited: run `make proto`"


def test_proto_matches_the_servicer():
    """Every rpc of the proto is implemented by the servicer."""
    from secagg.transport import secagg_pb2 as pb
    from secagg.transport.server import AggregatorServicer

    service = pb.DESCRIPTOR.services_by_name["Aggregator"]
    assert pb.DESCRIPTOR.package == "secagg.v1"
    for method in service.methods:
        assert method.name in AggregatorServicer.__dict__, method.name
