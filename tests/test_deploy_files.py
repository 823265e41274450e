"""The deployment files agree with each other and with the aggregator they deploy.

No container engine or cluster needed: the Dockerfile is read with the same parser that
deploy/rootfs.py uses to execute it (``make image-rootfs`` builds and serves it for real), the
image's config file is resolved by ``secagg serve``'s own settings code, and the compose file and
Kubernetes manifests are parsed as YAML and checked for what the aggregator relies on.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from secagg import config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
STATE_DIR = "/var/lib/secagg"


def _load_rootfs():
    spec = importlib.util.spec_from_file_location("deploy_rootfs", DEPLOY / "rootfs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


rootfs = _load_rootfs()


@pytest.fixture(scope="module")
def stages() -> list[list]:
    """The Dockerfile's instructions, one list per stage."""
    out: list[list] = []
    for ins in rootfs.parse_dockerfile((DEPLOY / "Dockerfile").read_text()):
        if ins.keyword == "FROM":
            out.append([])
        out[-1].append(ins)
    return out


@pytest.fixture(scope="module")
def settings() -> config.ServeSettings:
    """The image's defaults for ``secagg serve``, resolved as the image resolves them."""
    return config.resolve({}, {"SECAGG_CONFIG": str(DEPLOY / "aggregator.toml")})


@pytest.fixture(scope="module")
def statefulset() -> dict:
    return yaml.safe_load((DEPLOY / "k8s/statefulset.yaml").read_text())


def _final(stages: list[list], keyword: str) -> list:
    return [ins for ins in stages[-1] if ins.keyword == keyword]


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


# -- Dockerfile ----------------------------------------------------------------------------------------


def test_dockerfile_uses_only_what_the_rootfs_check_can_execute(stages):
    keywords = {ins.keyword for stage in stages for ins in stage}
    assert keywords <= set(rootfs.SUPPORTED), keywords - set(rootfs.SUPPORTED)
    bases = [stage[0].args.split()[0] for stage in stages]
    assert bases[0] in rootfs.BASE_IMAGES and len(stages) >= 2, bases  # multi-stage, from Debian's slim image


def test_dockerfile_installs_the_base_dependencies_only(stages):
    text = (DEPLOY / "Dockerfile").read_text()
    runs = " ".join(ins.args for stage in stages for ins in stage if ins.keyword == "RUN")
    assert not re.search(r"pip (install|wheel)[^&]*\[", runs), "no extras ([keras], [torch], ...) in the image"
    for name in ("tensorflow", "torch", "keras"):
        assert not re.search(rf"(pip|apt-get)[^&]*\b{name}\b", runs), f"{name} is installed somewhere"
    assert "python3-venv" in text and "--no-index" in runs  # the runtime installs the built wheels only


def test_dockerfile_runs_as_non_root_with_state_on_a_volume(stages, settings):
    user = _final(stages, "USER")[-1].args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0, user
    assert any(STATE_DIR in ins.args for ins in _final(stages, "VOLUME"))
    assert str(settings.state_dir) == STATE_DIR
    exposed = {int(p) for ins in _final(stages, "EXPOSE") for p in ins.args.split()}
    assert {_port(settings.listen), settings.metrics_port, _port(settings.health_listen)} <= exposed


def test_dockerfile_healthcheck_probes_the_health_port(stages, settings):
    (check,) = _final(stages, "HEALTHCHECK")
    argv = rootfs._json_list(rootfs.Instruction("HEALTHCHECK", {}, check.args.partition(" ")[2], check.line))
    assert argv[:3] == ["python", "-m", "secagg.healthcheck"]
    assert _port(argv[argv.index("--server") + 1]) == _port(settings.health_listen)


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


def test_build_context_keeps_secrets_and_the_venv_out():
    ignore = rootfs.IgnoreRules((DEPLOY / "Dockerfile.dockerignore").read_text())
    for path in ("pyproject.toml", "README.md", "secagg/cli.py", "deploy/aggregator.toml"):
        assert not ignore.excluded(path), path
    for path in (".venv/bin/python", "keys/client.key", "pki/ca.key", "tests/test_cli.py", "secagg/__pycache__/x.pyc",
                 "deploy/.rootfs/run/keys/client.key"):
        assert ignore.excluded(path), path


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
