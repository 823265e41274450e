"""Operating the aggregator: health checks, reflection, Prometheus metrics, JSON logs, configuration.

Real servers on 127.0.0.1 with ephemeral ports, in-process (``secagg.serve``) or as ``secagg serve``
subprocesses; real encryption. The aggregator's default minimum cohort (3) applies: rounds have 3 clients.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import prometheus_client
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

import secagg
from secagg import cli as secagg_cli
from secagg import config, healthcheck
from secagg.contribution import CHECK_LABEL, TAG_LABEL
from secagg.errors import DuplicateSubmissionError, KeyFileError, RoundNotFoundError, RoundStateError, SecAggError
from secagg.keys import _read_key_file
from secagg.transport import secagg_pb2 as pb
from secagg.transport import secagg_pb2_grpc as pb_grpc
from secagg.transport.client import AggregatorClient
from secagg.updates import SealedUpdate

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
AGGREGATOR = "secagg.v1.Aggregator"
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
README = Path(__file__).resolve().parents[1] / "README.md"
DISTINCTIVE = 87.654321  # a weight value that must never show up in the aggregator's logs


@pytest.fixture
def ops_server(keypair, tmp_path):
    """An aggregator with a metrics port and a health-only port (default minimum cohort 3)."""
    srv = secagg.serve(keypair.server, "127.0.0.1:0", tmp_path / "ops-state", metrics_port=0,
                       health_listen="127.0.0.1:0")
    try:
        yield srv
    finally:
        srv.stop(grace=0)


def health_check(address: str, service: str = "", credentials: grpc.ChannelCredentials | None = None) -> int:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=10).status


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# -- health checking and reflection -------------------------------------------------------------------


def test_health_serving_then_not_serving_while_stopping(ops_server):
    for address in (ops_server.address, ops_server.health_address):
        assert health_check(address) == SERVING
        assert health_check(address, AGGREGATOR) == SERVING
    with pytest.raises(grpc.RpcError) as err:
        health_check(ops_server.address, "no.such.Service")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    channel = grpc.insecure_channel(ops_server.address)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=AGGREGATOR))
    assert next(watch).status == SERVING
    # The open Watch is an in-flight call: the aggregator's port drains it for up to the grace period.
    stopping = threading.Thread(target=ops_server.stop, kwargs={"grace": 30})
    stopping.start()
    try:
        assert next(watch).status == NOT_SERVING
        # While the aggregator's port drains, the health-only port tells probes the server is going away.
        assert health_check(ops_server.health_address) == NOT_SERVING
    finally:
        watch.cancel()
        stopping.join(30)
        channel.close()
    assert not stopping.is_alive()
    with pytest.raises(grpc.RpcError) as err:
        health_check(ops_server.health_address)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def reflected_services(address: str) -> tuple[set[str], ProtoReflectionDescriptorDatabase, grpc.Channel]:
    channel = grpc.insecure_channel(address)
    db = ProtoReflectionDescriptorDatabase(channel)
    return set(db.get_services()), db, channel


def test_reflection_lists_the_services(ops_server):
    services, db, channel = reflected_services(ops_server.address)
    with channel:
        assert services == {AGGREGATOR, HEALTH, REFLECTION}
        aggregator = descriptor_pool.DescriptorPool(db).FindServiceByName(AGGREGATOR)
        assert {"GetServerInfo", "CreateRound", "GetRound", "Submit", "FetchAggregate"} <= set(aggregator.methods_by_name)

    # The health-only port serves health (and its reflection), never the aggregator itself.
    services, _, channel = reflected_services(ops_server.health_address)
    with channel:
        assert services == {HEALTH, REFLECTION}
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.AggregatorStub(channel).GetServerInfo(pb.ServerInfoRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_health_under_mutual_tls(keypair, pki, tmp_path):
    srv = secagg.serve(keypair.server, "127.0.0.1:0", tmp_path / "state", tls=pki.server_tls(),
                       health_listen="127.0.0.1:0")
    try:
        ca = pki.ca.read_bytes()
        site = pki.certs["site0"]
        # No client certificate: the TLS handshake refuses the probe before gRPC sees the call.
        with pytest.raises(grpc.RpcError) as err:
            health_check(srv.address, credentials=grpc.ssl_channel_credentials(ca))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # Any certificate of the federation's CA may ask; the health-only port needs none.
        mtls = grpc.ssl_channel_credentials(ca, site.key.read_bytes(), site.cert.read_bytes())
        assert health_check(srv.address, credentials=mtls) == SERVING
        assert health_check(srv.health_address) == SERVING

        assert healthcheck.main(["--server", srv.health_address]) == 0
        assert healthcheck.main(["--server", srv.address, "--tls-ca", str(pki.ca)]) == 1
        assert healthcheck.main(["--server", srv.address, "--tls-ca", str(pki.ca), "--tls-cert", str(site.cert),
                                 "--tls-key", str(site.key), "--service", AGGREGATOR]) == 0
    finally:
        srv.stop(grace=0)


def run_probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "secagg.healthcheck", *args], capture_output=True, text=True,
                          timeout=120)


def test_healthcheck_command_exit_codes(ops_server, capsys):
    ok = run_probe("--server", ops_server.address)
    assert (ok.returncode, ok.stdout.strip(), ok.stderr) == (0, "SERVING", "")
    assert run_probe("--server", ops_server.health_address, "--service", AGGREGATOR).returncode == 0
    unknown = run_probe("--server", ops_server.address, "--service", "no.such.Service")
    assert unknown.returncode == 1 and "knows no service 'no.such.Service'" in unknown.stderr
    assert run_probe().returncode == 2  # usage: --server is required

    # NOT_SERVING while stopping (an open Watch keeps the aggregator's port draining).
    channel = grpc.insecure_channel(ops_server.address)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
    next(watch)
    stopping = threading.Thread(target=ops_server.stop, kwargs={"grace": 30})
    stopping.start()
    try:
        assert next(watch).status == NOT_SERVING
        capsys.readouterr()
        assert healthcheck.main(["--server", ops_server.health_address]) == 1
        assert capsys.readouterr().out.strip() == "NOT_SERVING"
    finally:
        watch.cancel()
        stopping.join(30)
        channel.close()

    gone = run_probe("--server", ops_server.address, "--timeout", "2")
    assert gone.returncode == 1 and gone.stderr.startswith("secagg-healthcheck: error: cannot ask")
    assert gone.stderr.count("\n") == 1


# -- metrics --------------------------------------------------------------------------------------------


def test_metrics_after_rounds(ops_server, keypair, client_key, npz_models, helpers):
    address = ops_server.address
    paths, tensors = npz_models(3)
    secagg.create_round(address, "r1", template=paths[0], clients=3)
    receipts = [secagg.submit(address, "r1", keypair.client, f"site-{i}", paths[i]) for i in range(2)]
    with pytest.raises(DuplicateSubmissionError):  # re-encrypted: different bytes, refused
        secagg.submit(address, "r1", keypair.client, "site-0", paths[0])
    # The third site with the raw client, twice: the identical resend is acknowledged, counted once.
    status = secagg.round_status(address, "r1")
    header, chunks = helpers.sealed_update(client_key, status, "site-2", tensors[2])
    with AggregatorClient(address) as raw:
        with pytest.raises(RoundNotFoundError):
            raw.submit(dataclasses.replace(header, round_id="nope"), chunks)
        first, again = raw.submit(header, chunks), raw.submit(header, chunks)
    assert (first.already_accepted, again.already_accepted, again.submitted) == (False, True, 3)
    third_bytes = SealedUpdate(header, chunks).wire_bytes
    secagg.fetch_average(address, "r1", keypair.client)

    secagg.create_round(address, "r2", template=paths[0], clients=3)  # stays open
    with pytest.raises(RoundStateError, match="still collecting"):
        secagg.fetch_average(address, "r2", keypair.client)
    secagg.create_round(address, "r3", template=paths[0], clients=3, deadline=0.2)  # fails: nobody submits
    assert helpers.wait_for(lambda: secagg.round_status(address, "r3").state == "failed", timeout=30)

    m = scrape(ops_server.metrics_url)
    assert m[("secagg_submissions_accepted_total", ())] == 3
    assert m[("secagg_submissions_resent_total", ())] == 1
    assert m[("secagg_submissions_refused_total", (("reason", "DuplicateSubmissionError"),))] == 1
    assert m[("secagg_submissions_refused_total", (("reason", "RoundNotFoundError"),))] == 1
    assert sum(v for (name, _), v in m.items() if name == "secagg_submissions_refused_total") == 2
    assert m[("secagg_rounds_created_total", ())] == 3
    assert m[("secagg_rounds_closed_total", ())] == 1
    assert m[("secagg_rounds_failed_total", ())] == 1
    assert m[("secagg_round_duration_seconds_count", ())] == 1
    assert 0 < m[("secagg_round_duration_seconds_sum", ())] < 600
    assert m[("secagg_open_rounds", ())] == 1
    assert m[("secagg_fetches_total", ())] == 1
    assert m[("secagg_fetches_refused_total", (("reason", "RoundStateError"),))] == 1
    # Every byte of the three accepted updates was read, plus protobuf framing and ids and the headers
    # of the refused updates and of the resend (their chunks are refused unread).
    accepted_bytes = sum(r.wire_bytes for r in receipts) + third_bytes
    received = m[("secagg_received_bytes_total", ())]
    assert accepted_bytes <= received < 1.02 * accepted_bytes + 2048, (received, accepted_bytes)
    assert m[("process_resident_memory_bytes", ())] > 0 and ("process_open_fds", ()) in m
    # Labels name error classes only: no round or client id leaks into a scrape.
    assert not any(v in ("r1", "r2", "r3", "site-0") for _, labels in m for _, v in labels)
    # The registry is the server's own: the global default registry stays clean between tests.
    assert not [n for n in prometheus_client.REGISTRY._names_to_collectors if n.startswith("secagg_")]


# -- logs -------------------------------------------------------------------------------------------------


def serve_env(**variables: str) -> dict[str, str]:
    """This process's environment without any SECAGG_* setting, plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECAGG_")}
    return env | {"PYTHONUNBUFFERED": "1"} | variables


class ServeProcess:
    """``secagg serve`` with stderr kept; the address is read from the text or the JSON "serving on" line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "secagg.cli", "serve", *args], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env or serve_env())
        self.address = ""
        started = threading.Event()

        def pump() -> None:
            for line in self.proc.stderr:
                self.lines.append(line)
                m = re.search(r"secagg: serving on ([^\s\"]+)", line)
                if m and not started.is_set():
                    self.address = m.group(1)
                    started.set()
            started.set()

        self._reader = threading.Thread(target=pump, daemon=True)
        self._reader.start()
        started.wait(timeout)
        if not self.address:
            self.stop()
            raise RuntimeError("secagg serve did not start:\n" + "".join(self.lines))

    def records(self) -> list[dict]:
        """Every stderr line as JSON (fails on a line that is not)."""
        return [json.loads(line) for line in self.lines]

    def stop(self) -> list[str]:
        """SIGTERM, wait, and return everything it wrote to stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._reader.join(10)
        return self.lines


@pytest.fixture
def serve_subprocess():
    started: list[ServeProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServeProcess:
        started.append(ServeProcess(*args, env=env))
        return started[-1]

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(30)


def decoded_runs(text: str) -> list[bytes]:
    """The bytes of every run of 32+ hex or base64 characters in ``text``, decoded at every alignment."""
    out = []
    for run in re.findall(r"[0-9a-fA-F]{32,}", text):
        out += [bytes.fromhex(run[s:s + (len(run) - s) // 2 * 2]) for s in range(2)]
    for run in re.findall(r"[A-Za-z0-9+/_-]{32,}", text):
        for s in range(4):
            part = run[s:s + (len(run) - s) // 4 * 4]
            out.append(base64.b64decode(part.replace("-", "+").replace("_", "/")))
    return out


def leaks(text: str, secrets: dict[str, bytes]) -> list[str]:
    """The labels of ``secrets`` of which 16 bytes or more appear in ``text``: hex, base64 (any offset,
    standard or URL-safe alphabet) or a bytes repr."""
    runs = [d for d in decoded_runs(text) if len(d) >= 16]
    found = []
    for label, data in secrets.items():
        if any(d[i:i + 16] in data for d in runs for i in range(0, len(d) - 15, 8)):
            found.append(f"{label} (encoded)")
        step = max(len(data) // 64, 1)
        if any(repr(data[i:i + 16])[2:-1] in text for i in range(0, len(data) - 15, step)):
            found.append(f"{label} (repr)")
    return found


def test_json_logs_of_a_round_hold_no_secrets(serve_subprocess, keypair, client_key, other_client_key, helpers,
                                              rng, tmp_path):
    srv = serve_subprocess("--key", str(keypair.server), "--listen", "127.0.0.1:0", "--state-dir",
                           str(tmp_path / "state"), "--log-format", "json")
    models = [helpers.random_tensors(rng) for _ in range(3)]
    for m in models:
        m["dense/bias"][:8] = DISTINCTIVE
    # Max weight 1 (every site's weight): the average is exact well within atol (helpers.release_bound).
    status = secagg.create_round(srv.address, "r1", template=models[0], clients=3, max_weight=1.0)
    sealed = [helpers.sealed_update(client_key, status, f"site-{i}", m) for i, m in enumerate(models)]
    with AggregatorClient(srv.address) as raw:
        raw.submit(*sealed[0])
        with pytest.raises(KeyFileError):  # another federation's key
            raw.submit(*helpers.sealed_update(other_client_key, status, "site-1", models[1]))
        raw.submit(*sealed[1])
        with pytest.raises(DuplicateSubmissionError):
            raw.submit(*helpers.sealed_update(client_key, status, "site-0", models[1]))
        with pytest.raises(SecAggError, match="invalid client id"):
            raw.submit(*helpers.sealed_update(client_key, status, "../site", models[1]))
        raw.submit(*sealed[2])
    average = secagg.fetch_average(srv.address, "r1", keypair.client)
    assert average.contributions == 3 and np.allclose(average.vector[4096:4104], DISTINCTIVE, atol=1e-4)
    lines = srv.stop()
    text = "".join(lines)

    records = srv.records()  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert any(r["message"].startswith("secagg: serving on") and r["address"] == srv.address for r in records)
    accepted = [r for r in records if r["message"] == "update accepted"]
    assert sorted((r["round"], r["client"]) for r in accepted) == [("r1", "site-0"), ("r1", "site-1"), ("r1", "site-2")]
    refused = {r["reason"]: r for r in records if r["message"].startswith("update refused")}
    assert set(refused) == {"KeyFileError", "DuplicateSubmissionError", "EnvelopeError"}
    assert (refused["DuplicateSubmissionError"]["round"], refused["DuplicateSubmissionError"]["client"]) == ("r1", "site-0")
    assert "client" not in refused["EnvelopeError"]  # a malformed id is not a log field
    assert any(r["message"] == "round closed" and r["round"] == "r1" for r in records)

    secrets_ = {"secret key": _read_key_file(Path(keypair.client))[1]["secret_key"],
                "contribution-tag key": client_key.derive(TAG_LABEL),
                "integrity-check key": client_key.derive(CHECK_LABEL)}
    for i, (header, chunks) in enumerate(sealed):
        secrets_[f"site-{i} update digest"] = header.digest
        secrets_[f"site-{i} tag"] = header.contribution.tag
        secrets_[f"site-{i} seeds digest"] = header.contribution.seeds_digest
        for c in chunks:
            secrets_[f"site-{i} chunk {c.index} digest"] = c.digest
            secrets_ |= {f"site-{i} chunk {c.index} c0 {j}": b for j, b in enumerate(c.c0s)}
            secrets_ |= {f"site-{i} chunk {c.index} seed {j}": b for j, b in enumerate(c.seeds)}
    assert len(decoded_runs(text)) >= 2  # the key id is logged: the scan does see hex
    assert not leaks(text, secrets_), leaks(text, secrets_)
    for form in (f"{DISTINCTIVE}", f"{np.float32(DISTINCTIVE)}", "87.654", "87.65"):
        assert form not in text


# -- configuration ----------------------------------------------------------------------------------------


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    file = write_toml(tmp_path / "agg.toml", 'key = "keys/server.key"\nlisten = "127.0.0.1:7000"\n'
                                             'state_dir = "/var/state"\nmin-cohort = 6\nlog-format = "json"\n')
    env = {"SECAGG_MIN_COHORT": "5", "SECAGG_LISTEN": "127.0.0.1:7001", "SECAGG_CONFIG": str(file)}
    given = {"min_cohort": 4}

    s = config.resolve(given, env)
    assert s.min_cohort == 4 and s.sources["min-cohort"] == "flag"
    assert s.listen == "127.0.0.1:7001" and s.sources["listen"] == "env"
    assert s.log_format == "json" and s.sources["log-format"] == "file"
    assert s.key == tmp_path / "keys/server.key"  # relative to the file's folder
    assert s.state_dir == Path("/var/state")
    assert (s.metrics_port, s.log_level, s.shutdown_grace, s.insecure) == (None, "info", 1.0, False)
    assert s.sources["log-level"] == "default" and s.config == file

    assert config.resolve({}, env).min_cohort == 5
    assert config.resolve({}, {"SECAGG_CONFIG": str(file)}).min_cohort == 6
    assert config.resolve({"config": str(file)}, {"SECAGG_CONFIG": "/nonexistent"}).min_cohort == 6  # flag wins
    no_file = config.resolve({"key": "k", "listen": "l:1", "state_dir": "d"}, {})
    assert no_file.min_cohort == 3 and no_file.log_format == "text"
    # Required options may come from any of the three.
    mixed = config.resolve({"state_dir": "d"}, {"SECAGG_LISTEN": "127.0.0.1:0", "SECAGG_CONFIG": str(
        write_toml(tmp_path / "key-only.toml", 'key = "/k/server.key"\n'))})
    assert (mixed.sources["state-dir"], mixed.sources["listen"], mixed.sources["key"]) == ("flag", "env", "file")


def test_configuration_errors_name_the_culprit(tmp_path):
    with pytest.raises(SecAggError, match=r"--listen is required: give it, set SECAGG_LISTEN, or put listen in"):
        config.resolve({"key": "k", "state_dir": "d"}, {})
    bad = write_toml(tmp_path / "bad.toml", 'key = "k"\nmetrics_prot = 9090\n')
    with pytest.raises(SecAggError, match=r"unknown key 'metrics_prot'; did you mean 'metrics-port'"):
        config.resolve({}, {"SECAGG_CONFIG": str(bad)})
    nested = write_toml(tmp_path / "nested.toml", '[server]\nlisten = "x"\n')
    with pytest.raises(SecAggError, match="unknown key 'server'"):
        config.resolve({"config": str(nested)}, {})
    config_in_file = write_toml(tmp_path / "self.toml", 'config = "other.toml"\n')
    with pytest.raises(SecAggError, match="unknown key 'config'"):
        config.resolve({"config": str(config_in_file)}, {})
    typed = write_toml(tmp_path / "typed.toml", 'min-cohort = "3"\n')
    with pytest.raises(SecAggError, match="min-cohort must be an integer"):
        config.resolve({"config": str(typed)}, {})
    with pytest.raises(SecAggError, match="SECAGG_METRICS_PORT must be an integer, got 'ninety'"):
        config.resolve({"key": "k", "listen": "l", "state_dir": "d"}, {"SECAGG_METRICS_PORT": "ninety"})
    with pytest.raises(SecAggError, match="SECAGG_INSECURE must be true or false"):
        config.resolve({"key": "k", "listen": "l", "state_dir": "d"}, {"SECAGG_INSECURE": "maybe"})
    with pytest.raises(SecAggError, match="SECAGG_LOG_FORMAT must be one of text, json"):
        config.resolve({"key": "k", "listen": "l", "state_dir": "d"}, {"SECAGG_LOG_FORMAT": "xml"})
    assert config.resolve({"key": "k", "listen": "l", "state_dir": "d"}, {"SECAGG_INSECURE": "yes"}).insecure
    with pytest.raises(SecAggError, match="config file .* does not exist"):
        config.resolve({"config": str(tmp_path / "missing.toml")}, {})


def test_unknown_config_key_from_the_command_line(cli, tmp_path):
    bad = write_toml(tmp_path / "bad.toml", 'listen = "127.0.0.1:0"\nstate-dirr = "state"\n')
    proc = cli("serve", "--config", str(bad), env=serve_env())
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"secagg: error: config file {bad}: unknown key 'state-dirr'; did you mean 'state-dir'? known keys: "
        + ", ".join(o.name for o in config.SERVE_OPTIONS if o.in_file)]
    proc = cli("serve", "--listen", "127.0.0.1:0", env=serve_env())
    assert proc.returncode == 1 and "--key is required: give it, set SECAGG_KEY" in proc.stderr


def test_serve_from_file_env_and_flags(serve_subprocess, keypair, npz_models, tmp_path):
    """The file names the key, address and state; the environment picks JSON logs and overrides the
    file's cohort; a flag overrides both."""
    file = write_toml(tmp_path / "agg.toml", f'key = "{keypair.server}"\nlisten = "127.0.0.1:0"\n'
                                             'state-dir = "state"\nmin-cohort = 6\n')
    srv = serve_subprocess("--config", str(file), "--min-cohort", "4",
                           env=serve_env(SECAGG_LOG_FORMAT="json", SECAGG_MIN_COHORT="5"))
    paths, _ = npz_models(1)
    status = secagg.create_round(srv.address, "r1", template=paths[0], clients=4)
    assert status.min_cohort == 4
    assert (tmp_path / "state" / "rounds" / "r1" / "round.json").is_file()  # relative to the file
    records = srv.records()
    settings = next(r for r in records if r["message"].startswith("settings from"))["message"]
    assert "key: file" in settings and "min-cohort: flag" in settings and "log-format: env" in settings


def test_mutual_tls_from_environment_variables(serve_subprocess, keypair, pki, tmp_path):
    server = pki.server
    srv = serve_subprocess(env=serve_env(
        SECAGG_KEY=str(keypair.server), SECAGG_LISTEN="127.0.0.1:0", SECAGG_STATE_DIR=str(tmp_path / "state"),
        SECAGG_TLS_CERT=str(server.cert), SECAGG_TLS_KEY=str(server.key), SECAGG_TLS_CA=str(pki.ca),
        SECAGG_HEALTH_LISTEN="127.0.0.1:0", SECAGG_LOG_FORMAT="json"))
    with AggregatorClient(srv.address, tls=pki.client("site0")) as c:
        assert c.server_info().key_id == secagg.load_server_key(keypair.server).key_id
    with pytest.raises(secagg.SecAggError):  # mutual TLS: no client certificate, no call
        with AggregatorClient(srv.address, tls=pki.client(None), timeout=10) as c:
            c.server_info()
    with pytest.raises(secagg.SecAggError):  # TLS at all
        with AggregatorClient(srv.address, timeout=10) as c:
            c.server_info()
    health_address = next(r["address"] for r in srv.records() if r["message"].startswith("health checks"))
    probe = run_probe("--server", health_address)
    assert (probe.returncode, probe.stdout.strip()) == (0, "SERVING")


# -- the README's configuration table is the parser's option list ---------------------------------------


def readme_configuration_rows() -> list[list[str]]:
    text = README.read_text()
    section = text.split("\n### Configuration\n", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `--")]
    return [[cell.strip().strip("`") for cell in row.strip("|").split("|")] for row in rows]


def test_readme_configuration_table_matches_the_parser():
    parser = secagg_cli._parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve_flags = [s for a in subparsers.choices["serve"]._actions for s in a.option_strings
                   if s.startswith("--") and s != "--help"]
    rows = readme_configuration_rows()
    assert [r[0] for r in rows] == [o.flag for o in config.SERVE_OPTIONS]
    assert sorted(serve_flags) == sorted(o.flag for o in config.SERVE_OPTIONS)
    for (flag, env, key, default, _meaning), option in zip(rows, config.SERVE_OPTIONS):
        assert env == option.env, flag
        assert key == (option.name if option.in_file else "—"), flag
        assert default == option.default_text, flag
    assert [f.name for f in dataclasses.fields(config.ServeSettings) if f.name != "sources"] == [
        o.dest for o in config.SERVE_OPTIONS]
