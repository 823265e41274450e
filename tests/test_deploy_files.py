"""The deployment files agree with each other and with the aggregator they deploy.

No container engine or cluster needed: the Dockerfile is read instruction by instruction, the image's
config file is resolved by ``secagg serve``'s own settings code, and the compose file and Kubernetes
manifests are parsed as YAML and checked for what the aggregator relies on. ``make image-test``
(deploy/image_test.py) builds and runs the images with a real engine; it is not part of this suite.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from secagg import config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
STATE_DIR = "/var/lib/secagg"
LOCAL_BASE = "localhost/secagg-base:bookworm"


@dataclasses.dataclass
class Instruction:
    keyword: str
    flags: list[str]
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        flags = []
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            flags.append(flag)
            rest = rest.strip()
        out.append(Instruction(keyword.upper(), flags, " ".join(rest.split())))
        pending = ""
    return out


def ignored(rules: str, path: str) -> bool:
    """Whether a .dockerignore excludes ``path``: the last matching rule wins, ``!`` re-includes, a
    rule matching a directory covers what is under it."""
    excluded = False
    for rule in (r.strip() for r in rules.splitlines()):
        if not rule or rule.startswith("#"):
            continue
        negate, pattern = rule.startswith("!"), rule.lstrip("!").strip("/")
        regex = ""
        while pattern:
            for glob, part in (("**/", "(?:.*/)?"), ("**", ".*"), ("*", "[^/]*"), ("?", "[^/]")):
                if pattern.startswith(glob):
                    break
            else:
                glob, part = pattern[0], re.escape(pattern[0])
            regex, pattern = regex + part, pattern[len(glob):]
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile((DEPLOY / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def stages(dockerfile) -> dict[str, list[Instruction]]:
    """The Dockerfile's stages by name (AS ...), in order; the instructions before the first FROM under ''."""
    out: dict[str, list[Instruction]] = {"": []}
    for ins in dockerfile:
        if ins.keyword == "FROM":
            words = ins.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"stage{len(out)}"
            out[name] = []
        out[list(out)[-1]].append(ins)
    return out


@pytest.fixture(scope="module")
def settings() -> config.ServeSettings:
    """The image's defaults for ``secagg serve``, resolved as the image resolves them."""
    return config.resolve({}, {"SECAGG_CONFIG": str(DEPLOY / "aggregator.toml")})


@pytest.fixture(scope="module")
def statefulset() -> dict:
    return yaml.safe_load((DEPLOY / "k8s/statefulset.yaml").read_text())


def _final(stages: dict[str, list[Instruction]], keyword: str) -> list[Instruction]:
    return [ins for ins in list(stages.values())[-1] if ins.keyword == keyword]


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def _runs(stage: list[Instruction]) -> str:
    return " ".join(ins.args for ins in stage if ins.keyword == "RUN")


# -- Dockerfile ----------------------------------------------------------------------------------------


def test_dockerfile_pulls_debian_slim_with_a_local_fallback_base(stages):
    (arg,) = stages[""]
    assert arg.keyword == "ARG" and arg.args == "BASE=docker.io/library/debian:bookworm-slim"
    first = list(stages.values())[1][0]
    assert first.args == "${BASE} AS python"
    assert all(s[0].args.split()[0] in ("python", "build", "${BASE}") for s in list(stages.values())[1:])
    # The fallback base has one name in the script that makes it and the one that builds with it.
    assert f"TAG=${{1:-{LOCAL_BASE}}}" in (DEPLOY / "base-image.sh").read_text()
    assert f"base={LOCAL_BASE}" in (DEPLOY / "build-image.sh").read_text()


def test_the_aggregator_is_the_default_target_and_the_site_image_a_named_one(stages):
    names = list(stages)
    assert names[-1] == "aggregator", names  # `docker build` without --target builds the last stage
    assert "site" in names and names.index("site") < names.index("aggregator")
    assert "secagg[client]" in _runs(stages["site"]) and "secagg[client]" not in _runs(stages["aggregator"])


def test_dockerfile_installs_the_base_dependencies_only(stages, dockerfile):
    runs = _runs(stages["aggregator"]) + " " + _runs(stages["build"])
    assert not re.search(r"pip (install|wheel)[^&]*\[", runs), "no extras ([client], [keras], ...) in the aggregator"
    every_run = " ".join(ins.args for ins in dockerfile if ins.keyword == "RUN")
    for name in ("tensorflow", "torch", "keras"):
        assert not re.search(rf"(pip|apt-get)[^&]*\b{name}\b", every_run), f"{name} is installed somewhere"
    for stage in ("aggregator", "site"):  # the runtimes install the built wheels only
        assert "--no-index" in _runs(stages[stage]) and "python3-venv" in _runs(stages["python"])


def test_a_host_ca_for_pip_reaches_the_wheel_builds_only(stages, dockerfile):
    for stage in ("build", "site-wheels"):
        (pip,) = [ins for ins in stages[stage] if "pip wheel" in ins.args]
        assert "--mount=type=secret,id=pip_cert" in pip.flags and "PIP_CERT=/run/secrets/pip_cert" in pip.args
    # Never in an image's configuration or a runtime layer: no ENV or ARG of it, no secret mount elsewhere.
    for ins in dockerfile:
        assert "PIP_CERT" not in ins.args or ins.keyword == "RUN", ins
    assert not any("type=secret" in flag for ins in stages["aggregator"] + stages["site"] for flag in ins.flags)
    assert "--secret \"id=pip_cert,src=$PIP_CERT\"" in (DEPLOY / "build-image.sh").read_text()


def test_dockerfile_runs_as_non_root_with_state_on_a_volume(stages, settings):
    for stage in ("aggregator", "site"):
        user = [ins for ins in stages[stage] if ins.keyword == "USER"][-1].args
        uid, _, gid = user.partition(":")
        assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0, (stage, user)
    assert any(STATE_DIR in ins.args for ins in _final(stages, "VOLUME"))
    assert str(settings.state_dir) == STATE_DIR
    exposed = {int(p) for ins in _final(stages, "EXPOSE") for p in ins.args.split()}
    assert {_port(settings.listen), settings.metrics_port, _port(settings.health_listen)} <= exposed


def test_dockerfile_healthcheck_probes_the_health_port(stages, settings):
    (check,) = _final(stages, "HEALTHCHECK")
    assert check.args.startswith("CMD [")  # exec form: no shell needed in the probe
    argv = json.loads(check.args.removeprefix("CMD "))
    assert argv[:3] == ["python", "-m", "secagg.healthcheck"]
    assert _port(argv[argv.index("--server") + 1]) == _port(settings.health_listen)
    # podman keeps a HEALTHCHECK only in Docker's image format
    assert "--format docker" in (DEPLOY / "build-image.sh").read_text()


def test_image_config_is_valid_for_secagg_serve(stages, settings):
    copies = " ".join(ins.args for ins in _final(stages, "COPY"))
    envs = " ".join(ins.args for ins in _final(stages, "ENV"))
    assert "deploy/aggregator.toml /etc/secagg/aggregator.toml" in copies
    assert "SECAGG_CONFIG=/etc/secagg/aggregator.toml" in envs
    # mutual TLS on every interface, with the mounted files; never baked-in keys
    assert settings.listen.startswith("0.0.0.0:") and not settings.insecure
    assert str(settings.key) == "/etc/secagg/federation/server.key"
    assert {str(settings.tls_cert), str(settings.tls_key), str(settings.tls_ca)} == {
        "/etc/secagg/tls/server.crt", "/etc/secagg/tls/server.key", "/etc/secagg/tls/ca.crt"}
    assert "--tls-ca" not in tomllib.loads((DEPLOY / "aggregator.toml").read_text())  # keys are names, no dashes


def test_build_context_keeps_secrets_and_the_venv_out(dockerfile):
    rules = (DEPLOY / "Dockerfile.dockerignore").read_text()
    copied = [ins.args.split()[:-1] for ins in dockerfile if ins.keyword == "COPY"]
    for path in ("pyproject.toml", "README.md", "secagg/cli.py", *(p for srcs in copied for p in srcs)):
        assert not ignored(rules, path), path
    for path in (".venv/bin/python", "keys/client.key", "pki/ca.key", "tests/test_cli.py", "secagg/__pycache__/x.pyc",
                 "secagg/transport/__pycache__/x.pyc", "deploy/containers.conf", ".git/config"):
        assert ignored(rules, path), path


def test_podman_reads_the_projects_containers_conf():
    conf = tomllib.loads((DEPLOY / "containers.conf").read_text())
    assert conf["engine"]["runtime"] == "runc"
    limits = dict(u.split("=", 1) for u in conf["containers"]["default_ulimits"])
    assert set(limits) == {"nofile", "nproc"} and all(":" in v for v in limits.values())
    assert "PODMAN_CONF ?= $(CURDIR)/deploy/containers.conf" in (DEPLOY.parent / "Makefile").read_text()
    assert "export CONTAINERS_CONF=" in (DEPLOY / "build-image.sh").read_text()


# -- Kubernetes ---------------------------------------------------------------------------------------


def test_statefulset_is_one_non_root_replica_with_a_read_only_root(statefulset, stages):
    spec = statefulset["spec"]
    assert statefulset["kind"] == "StatefulSet" and spec["replicas"] == 1
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    uid, _, gid = _final(stages, "USER")[-1].args.partition(":")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (int(uid), int(gid))
    assert pod["securityContext"]["fsGroup"] == int(gid)  # makes the 0440 Secret files readable
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["memory"]


def test_statefulset_probes_use_grpc_on_the_plaintext_health_port(statefulset, settings):
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    health = _port(env.get("SECAGG_HEALTH_LISTEN", settings.health_listen))
    assert env.get("SECAGG_HEALTH_LISTEN", settings.health_listen).startswith("0.0.0.0:")  # kubelet dials the pod IP
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # The kubelet's grpc probe presents no client certificate: under mutual TLS it can only use
        # the health-only port, never the gRPC port itself.
        assert container[probe]["grpc"]["port"] == health != _port(settings.listen), probe
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": _port(settings.listen), "metrics": settings.metrics_port, "health": health}


def test_statefulset_mounts_state_and_secrets_where_the_config_expects_them(statefulset, settings):
    spec = statefulset["spec"]
    container = spec["template"]["spec"]["containers"][0]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    claims = {c["metadata"]["name"] for c in spec["volumeClaimTemplates"]}
    assert mounts[str(settings.state_dir)]["name"] in claims
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    for path in (settings.key, settings.tls_cert, settings.tls_key, settings.tls_ca):
        mount = mounts[str(path.parent)]
        assert mount["readOnly"] is True, path
        items = {i["path"] for i in volumes[mount["name"]]["secret"]["items"]}
        assert path.name in items, path
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # the one other writable place


def test_services_do_not_expose_the_health_port(settings):
    services = [d for d in yaml.safe_load_all((DEPLOY / "k8s/service.yaml").read_text()) if d]
    ports = {p["port"] for s in services for p in s["spec"]["ports"]}
    assert _port(settings.listen) in ports and _port(settings.health_listen) not in ports
    kustomization = yaml.safe_load((DEPLOY / "k8s/kustomization.yaml").read_text())
    assert all((DEPLOY / "k8s" / r).exists() for r in kustomization["resources"])


def test_example_secrets_hold_no_real_key_material():
    for doc in yaml.safe_load_all((DEPLOY / "k8s/secrets.example.yaml").read_text()):
        for value in {**doc.get("stringData", {}), **doc.get("data", {})}.values():
            assert "BEGIN" not in value and len(value) < 100


# -- compose ------------------------------------------------------------------------------------------


def test_compose_runs_the_aggregator_like_production():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services, volumes = compose["services"], compose["volumes"]
    agg = services["aggregator"]
    assert (DEPLOY.parent / agg["build"]["context"].replace("..", ".") / agg["build"]["dockerfile"]).exists()
    assert agg["read_only"] is True and agg["cap_drop"] == ["ALL"] and "user" not in agg
    mounts = {m.split(":")[1]: m for m in agg["volumes"]}
    assert mounts[STATE_DIR].split(":")[0] in volumes
    assert mounts["/etc/secagg/tls"].endswith(":ro") and mounts["/etc/secagg/federation"].endswith(":ro")
    assert "--insecure" not in (DEPLOY / "docker-compose.yml").read_text()
    for name, service in services.items():
        for mount in service.get("volumes", []):
            assert mount.split(":")[0] in volumes, (name, mount)


def test_compose_demo_is_one_round_of_three_sites():
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    sites = [name for name in services if name.startswith("site")]
    assert len(sites) == 3
    for name in sites:
        env = services[name]["environment"]
        assert env["SITE"] == name and env["SECAGG_TLS_CERT"] == f"/tls/{name}.crt"
        assert services[name]["depends_on"]["admin"]["condition"] == "service_completed_successfully"
    assert "--enroll site1,site2,site3" in services["admin"]["command"][0]
    assert set(services["check"]["depends_on"]) == set(sites)


def test_compose_runs_the_sites_on_the_site_image_and_publishes_on_loopback_only():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "name" not in compose  # docker-compose 1.29, which runs this file under podman, rejects it
    agg = services["aggregator"]
    assert agg["image"].startswith("secagg-aggregator:") and "target" not in agg["build"]
    for name, service in services.items():
        if name != "aggregator":
            assert service["image"].startswith("secagg-site:") and service["build"]["target"] == "site", name
    for port in agg["ports"]:
        host, _, rest = port.partition(":")
        assert host == "127.0.0.1" and re.fullmatch(r"\$\{SECAGG_DEMO_\w+:-\d+\}:\d+", rest), port
