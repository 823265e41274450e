#!/usr/bin/env python3
"""Build deploy/Dockerfile into a root filesystem without a container engine, and serve a round from it.

``debian:bookworm-slim`` is replaced by ``debootstrap --variant=minbase bookworm`` (slimmed as the
official image is, cached under --workdir); every stage's FROM, COPY, ENV and RUN is then executed
in a chroot exactly as written in the Dockerfile, so the file and this check cannot drift apart.
Instructions this interpreter does not know are refused rather than skipped.

The final stage's rootfs is then run the way deploy/k8s/ runs the image: the Dockerfile's
ENTRYPOINT + CMD, as its USER (non-root, no capabilities), with the root filesystem mounted
read-only, /var/lib/secagg writable, the TLS material and the federation key mounted read-only.
From outside the chroot, this repository's secagg (the client side) runs a real round over mutual
TLS: keygen, certificates, three sites submit .npz models, fetch, the average checked to 1e-6;
then the aggregator is killed with SIGKILL, restarted on the same state, and fetched from again.
Finally every service of deploy/docker-compose.yml runs its own command in the rootfs (folders
for volumes, loopback for the network), which ends with the demo's own check of the average.

Needs root, debootstrap, util-linux's unshare, and the network to Debian's mirrors and PyPI.
Run through deploy/verify_rootfs.sh (``make image-rootfs``); ``--help`` for options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE_IMAGES = {"debian:bookworm-slim": "bookworm"}
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What the official debian:*-slim images leave out (debuerreotype's slimify), so sizes compare.
SLIM_EXCLUDES = ["/usr/share/doc/*", "/usr/share/groff/*", "/usr/share/info/*", "/usr/share/linda/*",
                 "/usr/share/lintian/overrides/*", "/usr/share/locale/*", "/usr/share/man/*"]
SLIM_INCLUDES = ["/usr/share/doc/*/copyright"]
# The apt settings of the official debian images.
APT_CONF = {
    "docker-clean": 'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n'
                    'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };\n',
    "docker-no-languages": 'Acquire::Languages "none";\n',
    "docker-gzip-indexes": 'Acquire::GzipIndexes "true";\n',
    "docker-autoremove-suggests": 'Apt::AutoRemove::SuggestsImportant "false";\n',
}
FORBIDDEN_PACKAGES = ("tensorflow", "tensorflow-cpu", "torch", "keras", "jax")
# Every Dockerfile instruction build() executes or records; any other is refused.
SUPPORTED = ("FROM", "ENV", "RUN", "COPY", "USER", "WORKDIR", "VOLUME", "EXPOSE", "ENTRYPOINT", "CMD",
             "HEALTHCHECK", "LABEL", "STOPSIGNAL")


class BuildError(Exception):
    """The Dockerfile could not be interpreted or one of its steps failed."""


# -- the Dockerfile -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Instruction:
    keyword: str
    flags: dict[str, str]
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their leading ``--flag=value`` options; comments and continuations resolved."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # Docker drops comment lines, also inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        words = " ".join(p.strip() for p in pending if p.strip())
        pending = []
        keyword, _, rest = words.partition(" ")
        flags: dict[str, str] = {}
        rest = rest.strip()
        while rest.startswith("--"):
            token, _, rest = rest.partition(" ")
            name, _, value = token[2:].partition("=")
            if name in flags:
                raise BuildError(f"line {start}: --{name} given twice; this interpreter takes one")
            flags[name] = value
            rest = rest.strip()
        out.append(Instruction(keyword.upper(), flags, rest, start))
    if pending:
        raise BuildError("the Dockerfile ends inside a continued line")
    return out


def _json_list(ins: Instruction) -> list[str]:
    try:
        value = json.loads(ins.args)
    except json.JSONDecodeError:
        value = None
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise BuildError(f"line {ins.line}: {ins.keyword} must be in JSON (exec) form here")
    return value


def _parse_env(ins: Instruction) -> dict[str, str]:
    if "$" in ins.args:
        raise BuildError(f"line {ins.line}: variable substitution in ENV is not supported by this interpreter")
    tokens = shlex.split(ins.args)
    if tokens and "=" not in tokens[0]:  # legacy "ENV KEY value"
        return {tokens[0]: " ".join(tokens[1:])}
    env = {}
    for token in tokens:
        key, eq, value = token.partition("=")
        if not eq:
            raise BuildError(f"line {ins.line}: ENV token {token!r} is not KEY=VALUE")
        env[key] = value
    return env


class IgnoreRules:
    """A .dockerignore: the last matching pattern wins; a pattern matching a parent matches its children."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[re.Pattern[str], bool]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
            self.rules.append((re.compile(self._regex(pattern)), negate))

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "", 0
        while i < len(pattern):
            c = pattern[i]
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif c == "*":
                out, i = out + "[^/]*", i + 1
            elif c == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(c), i + 1
        return f"^{out}$"

    def excluded(self, rel: str) -> bool:
        parts = rel.split("/")
        candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        result = False
        for regex, negate in self.rules:
            if any(regex.match(c) for c in candidates):
                result = not negate
        return result


# -- chroot helpers ---------------------------------------------------------------------------------------


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def in_namespace(mounts: list[str], argv: list[str], **popen_kw) -> subprocess.Popen:
    """Run ``argv`` after ``mounts`` (shell lines) in a private mount namespace: nothing leaks to the host.

    The shell execs ``argv``, so the returned process's pid is the command's own.
    """
    script = "set -e\n" + "\n".join(mounts) + '\nexec "$@"\n'
    return subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv],
                            **popen_kw)


def build_mounts(root: Path) -> list[str]:
    """What `docker build` gives a RUN step: /proc, /dev, the host's resolv.conf."""
    r = shlex.quote(str(root))
    lines = [f"mount -t proc proc {r}/proc", f"mount --rbind /dev {r}/dev"]
    if Path("/etc/resolv.conf").exists():
        lines += [f"[ -e {r}/etc/resolv.conf ] || : > {r}/etc/resolv.conf",
                  f"mount --bind /etc/resolv.conf {r}/etc/resolv.conf"]
    return lines


def _quote(path: Path | str) -> str:
    return shlex.quote(str(path))


def chroot_env(env: dict[str, str]) -> list[str]:
    return ["/usr/bin/env", "-i", *[f"{k}={v}" for k, v in env.items()]]


def copy_tree(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    run(["cp", "-a", "--reflink=auto", str(src), str(dst)])


# -- the base image -------------------------------------------------------------------------------------


def base_rootfs(image: str, workdir: Path) -> Path:
    """debootstrap minbase of the image's suite, finished like the official image; cached."""
    if image not in BASE_IMAGES:
        raise BuildError(f"FROM {image}: this interpreter knows only {', '.join(BASE_IMAGES)}")
    suite = BASE_IMAGES[image]
    cached = workdir / f"debootstrap-{suite}-minbase"
    if (cached / ".secagg-base-complete").exists():
        print(f"base {image}: cached {cached}", flush=True)
    else:
        tmp = cached.with_name(cached.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        run(["debootstrap", "--variant=minbase", suite, str(tmp), DEBIAN_MIRROR])
        (tmp / ".secagg-base-complete").write_text(f"debootstrap --variant=minbase {suite} {DEBIAN_MIRROR}\n")
        tmp.rename(cached)
    _finish_like_official_image(cached, suite)
    return cached


def _finish_like_official_image(root: Path, suite: str) -> None:
    """What debuerreotype adds to a minbase for debian:SUITE-slim: apt sources with updates and
    security, the docker apt settings, and no docs, man pages or locales. Idempotent."""
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    (root / "etc/apt/sources.list.d/debian.sources").write_text(
        f"Types: deb\nURIs: {DEBIAN_MIRROR}\nSuites: {suite} {suite}-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        f"Types: deb\nURIs: {DEBIAN_MIRROR}-security\nSuites: {suite}-security\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    dpkg_cfg = "".join(f"path-exclude {p}\n" for p in SLIM_EXCLUDES) + "".join(
        f"path-include {p}\n" for p in SLIM_INCLUDES)
    (root / "etc/dpkg/dpkg.cfg.d/docker").write_text(dpkg_cfg)
    for name, text in APT_CONF.items():
        (root / "etc/apt/apt.conf.d" / name).write_text(text)
    for pattern in SLIM_EXCLUDES:
        for path in root.glob(pattern.lstrip("/")):
            keep = pattern == "/usr/share/doc/*" and path.is_dir() and not path.is_symlink()
            for victim in ([c for c in path.iterdir() if c.name != "copyright"] if keep else [path]):
                if victim.is_dir() and not victim.is_symlink():
                    shutil.rmtree(victim)
                else:
                    victim.unlink()
    for d in ("var/cache/apt", "var/cache/apt/archives", "var/lib/apt/lists"):  # debootstrap's downloads
        for child in (root / d).glob("*"):
            if child.is_file() and child.name != "lock":
                child.unlink()


# -- stages ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Stage:
    name: str
    root: Path
    env: dict[str, str]
    user: str = "0:0"
    workdir: str = "/"
    entrypoint: list[str] = dataclasses.field(default_factory=list)
    cmd: list[str] = dataclasses.field(default_factory=list)
    volumes: list[str] = dataclasses.field(default_factory=list)
    expose: list[str] = dataclasses.field(default_factory=list)
    healthcheck: list[str] | None = None

    def config(self) -> dict:
        return {"rootfs": str(self.root), "env": self.env, "user": self.user, "workdir": self.workdir,
                "entrypoint": self.entrypoint, "cmd": self.cmd, "volumes": self.volumes, "expose": self.expose,
                "healthcheck": self.healthcheck}


def build(dockerfile: Path, context: Path, workdir: Path, build_env: dict[str, str], host_ca: Path | None) -> Stage:
    """Every stage of ``dockerfile`` as a rootfs under ``workdir/stages``; returns the last one."""
    instructions = parse_dockerfile(dockerfile.read_text())
    ignore_file = dockerfile.with_name(dockerfile.name + ".dockerignore")
    if not ignore_file.exists():
        ignore_file = context / ".dockerignore"
    ignore = IgnoreRules(ignore_file.read_text() if ignore_file.exists() else "")
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for ins in instructions:
        if ins.keyword not in SUPPORTED:
            raise BuildError(f"line {ins.line}: {ins.keyword} is not supported by this interpreter; extend "
                             "deploy/rootfs.py or use the instructions it knows: " + ", ".join(SUPPORTED))
        print(f"\n=== line {ins.line}: {ins.keyword} {' '.join(f'--{k}={v}' for k, v in ins.flags.items())} "
              f"{ins.args[:160]}", flush=True)
        if ins.keyword == "FROM":
            words = ins.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"stage{len(stages)}"
            if len(words) not in (1, 3) or ins.flags:
                raise BuildError(f"line {ins.line}: FROM IMAGE [AS NAME] only")
            root = workdir / "stages" / name
            if words[0] in stages:
                parent = stages[words[0]]
                copy_tree(parent.root, root)
                stage = dataclasses.replace(parent, name=name, root=root, env=dict(parent.env),
                                            volumes=list(parent.volumes), expose=list(parent.expose))
            else:
                copy_tree(base_rootfs(words[0], workdir), root)
                stage = Stage(name, root, {"PATH": DEFAULT_PATH})
            stages[name] = stage
            continue
        if stage is None:
            raise BuildError(f"line {ins.line}: {ins.keyword} before FROM")
        if ins.keyword == "ENV":
            stage.env.update(_parse_env(ins))
        elif ins.keyword == "RUN":
            _run_step(ins, stage, stages, build_env, host_ca)
        elif ins.keyword == "COPY":
            _copy_step(ins, stage, stages, context, ignore)
        elif ins.keyword == "USER":
            stage.user = ins.args.strip()
        elif ins.keyword == "WORKDIR":
            stage.workdir = ins.args.strip()
            (stage.root / stage.workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "VOLUME":
            stage.volumes += _json_list(ins) if ins.args.startswith("[") else ins.args.split()
        elif ins.keyword == "EXPOSE":
            stage.expose += ins.args.split()
        elif ins.keyword == "ENTRYPOINT":
            stage.entrypoint = _json_list(ins)
            stage.cmd = []  # as Docker does: a new ENTRYPOINT resets an inherited CMD
        elif ins.keyword == "CMD":
            stage.cmd = _json_list(ins)
        elif ins.keyword == "HEALTHCHECK":
            if ins.args.strip().upper() == "NONE":
                stage.healthcheck = None
            else:
                kind, _, rest = ins.args.partition(" ")
                if kind.upper() != "CMD":
                    raise BuildError(f"line {ins.line}: HEALTHCHECK [OPTIONS] CMD [...] or NONE")
                stage.healthcheck = _json_list(Instruction("HEALTHCHECK", {}, rest.strip(), ins.line))
        # LABEL and STOPSIGNAL change nothing in the filesystem or in how it is run here.
    if stage is None:
        raise BuildError("no FROM in the Dockerfile")
    return stage


def _user_spec(stage: Stage) -> list[str]:
    return [] if stage.user in ("0", "0:0", "root") else [f"--userspec={stage.user}"]


def _run_step(ins: Instruction, stage: Stage, stages: dict[str, Stage], build_env: dict[str, str],
              host_ca: Path | None) -> None:
    if ins.args.startswith("["):
        raise BuildError(f"line {ins.line}: RUN in exec form is not supported here; use the shell form")
    mounts = build_mounts(stage.root)
    made: list[Path] = []
    for name, value in ins.flags.items():
        if name != "mount":
            raise BuildError(f"line {ins.line}: RUN --{name} is not supported by this interpreter")
        opts = dict(kv.partition("=")[::2] for kv in value.split(","))
        if opts.get("type") != "bind" or set(opts) - {"type", "from", "source", "target", "rw", "readwrite"}:
            raise BuildError(f"line {ins.line}: only RUN --mount=type=bind,from=STAGE,source=...,target=... here")
        if opts.get("from") not in stages:
            raise BuildError(f"line {ins.line}: --mount from={opts.get('from')!r} is not an earlier stage")
        source = stages[opts["from"]].root / opts.get("source", "/").lstrip("/")
        target = stage.root / opts["target"].lstrip("/")
        if not target.exists():
            target.mkdir(parents=True)
            made.append(target)  # Docker leaves no trace of a mount point it had to create
        ro = "" if ("rw" in opts or "readwrite" in opts) else f" && mount -o remount,bind,ro {shlex.quote(str(target))}"
        mounts.append(f"mount --bind {shlex.quote(str(source))} {shlex.quote(str(target))}{ro}")
    # Build-time only, like Docker's proxy build arguments: the host's CA bundle (for pip behind a
    # TLS-intercepting egress proxy) is mounted on a path that is removed after the step.
    env = {"HOME": "/root", **stage.env, **build_env}
    if host_ca is not None:
        ca_dir = stage.root / "run/secagg-build-ca"
        ca_dir.mkdir(parents=True)
        made.append(ca_dir)
        mounts.append(f"mount --bind {shlex.quote(str(host_ca.parent))} {shlex.quote(str(ca_dir))}")
        env["PIP_CERT"] = f"/run/secagg-build-ca/{host_ca.name}"
    argv = ["chroot", *_user_spec(stage), str(stage.root), *chroot_env(env), "/bin/sh", "-c",
            f"cd {shlex.quote(stage.workdir)} && {ins.args}"]
    try:
        if in_namespace(mounts, argv).wait() != 0:
            raise BuildError(f"line {ins.line}: RUN failed: {ins.args}")
    finally:
        for path in reversed(made):
            path.rmdir()


def _copy_step(ins: Instruction, stage: Stage, stages: dict[str, Stage], context: Path, ignore: IgnoreRules) -> None:
    if set(ins.flags) - {"from", "chown", "chmod"}:
        raise BuildError(f"line {ins.line}: COPY supports --from, --chown and --chmod here")
    words = _json_list(ins) if ins.args.startswith("[") else ins.args.split()
    *sources, dest = words
    dest_path = stage.root / dest.lstrip("/")
    into_dir = dest.endswith("/") or len(sources) > 1 or dest_path.is_dir()
    if into_dir:
        dest_path.mkdir(parents=True, exist_ok=True)
    from_root = stages[ins.flags["from"]].root if "from" in ins.flags else None
    if "from" in ins.flags and ins.flags["from"] not in stages:
        raise BuildError(f"line {ins.line}: COPY --from={ins.flags['from']} is not an earlier stage")
    copied: list[Path] = []
    for src in sources:
        if any(c in src for c in "*?["):
            raise BuildError(f"line {ins.line}: wildcards in COPY are not supported by this interpreter")
        if from_root is not None:
            src_path = from_root / src.lstrip("/")
        else:
            src_path = context / src
            rel = os.path.normpath(src)
            if rel.startswith("..") or ignore.excluded(rel):
                raise BuildError(f"line {ins.line}: {src} is outside the build context or excluded by .dockerignore")
        if not src_path.exists():
            raise BuildError(f"line {ins.line}: COPY source {src} does not exist")
        target = dest_path / src_path.name if into_dir and src_path.is_file() else dest_path
        if src_path.is_dir():
            for path in sorted(src_path.rglob("*")):
                rel = path.relative_to(src_path)
                if from_root is None and ignore.excluded(os.path.normpath(os.path.join(src, str(rel)))):
                    continue
                out = target / rel
                if path.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                else:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, out, follow_symlinks=False)
                copied.append(out)
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src_path, target)
        copied.append(target)
    for path in copied:
        if "chown" not in ins.flags:
            os.lchown(path, 0, 0)  # Docker's default owner of copied files
        if "chmod" in ins.flags and not path.is_symlink():
            path.chmod(int(ins.flags["chmod"], 8))
    if "chown" in ins.flags:
        run(["chroot", str(stage.root), "chown", "-hR", ins.flags["chown"],
             *[f"/{p.relative_to(stage.root)}" for p in copied]], stdout=subprocess.DEVNULL)


# -- inspecting the image ---------------------------------------------------------------------------------


def in_image(image: Stage, command: list[str], user: str | None = None) -> subprocess.CompletedProcess:
    """``command`` in the image as ``user`` (default: the image's USER), with the image's ENV."""
    spec = [f"--userspec={user or image.user}"] if (user or image.user) not in ("0", "0:0", "root") else []
    argv = ["chroot", *spec, str(image.root), *chroot_env({"HOME": "/tmp", **image.env}), *command]
    proc = in_namespace([f"mount -t proc proc {shlex.quote(str(image.root))}/proc"], argv,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def inspect(image: Stage) -> dict:
    du = subprocess.run(["du", "-sb", "--one-file-system", str(image.root)], capture_output=True, text=True,
                        check=True)
    venv = subprocess.run(["du", "-sb", str(image.root / "opt/secagg")], capture_output=True, text=True, check=True)
    debs = in_image(image, ["dpkg-query", "-W", "-f", "${Package} ${Version}\\n"]).stdout.split("\n")
    py = in_image(image, ["python3", "-c", "import importlib.metadata as m, json; print(json.dumps(sorted("
                                          "f\"{d.metadata['Name']}=={d.version}\" for d in m.distributions())))"])
    if py.returncode != 0:
        raise BuildError(f"cannot list the image's Python packages: {py.stderr.strip()}")
    dists = json.loads(py.stdout)
    absent = {}
    for module in ("tensorflow", "torch"):
        probe = in_image(image, ["python3", "-c", f"import {module}"])
        absent[module] = {"import_exit_code": probe.returncode, "error": probe.stderr.strip().splitlines()[-1:]}
    bad = [d for d in dists if d.split("==")[0].lower() in FORBIDDEN_PACKAGES]
    if bad or any(a["import_exit_code"] == 0 for a in absent.values()):
        raise BuildError(f"the aggregator image must not contain TensorFlow or torch: {bad or absent}")
    python = in_image(image, ["python3", "--version"]).stdout.strip()
    return {"rootfs_bytes": int(du.stdout.split()[0]), "venv_bytes": int(venv.stdout.split()[0]),
            "python": python, "debian_packages": len([d for d in debs if d.strip()]), "python_packages": dists,
            "imports": absent}


# -- serving a round ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_option(argv: list[str], option: str, value: str) -> list[str]:
    """``argv`` with ``option`` set to ``value``: replaced where present, else appended (flags beat the config)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == option:
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out + [option, value]


class Aggregator:
    """The image's ENTRYPOINT + CMD in a private mount namespace, as deploy/k8s runs it."""

    def __init__(self, image: Stage, secrets: dict[str, Path], argv: list[str], log: Path) -> None:
        self.image, self.secrets, self.argv, self.log = image, secrets, argv, log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        root = self.image.root
        mnt = root.parent / (root.name + ".mnt")
        mnt.mkdir(exist_ok=True)
        q = _quote
        lines = [
            # readOnlyRootFilesystem: the whole image read-only ...
            f"mount --bind {q(root)} {q(mnt)}", f"mount -o remount,bind,ro {q(mnt)}",
            f"mount -t proc proc {q(mnt)}/proc", f"mount --rbind /dev {q(mnt)}/dev",
            # ... but an emptyDir on /tmp and the state volume (here: the image's own /var/lib/secagg)
            f"mount -t tmpfs -o mode=1777,size=64m tmpfs {q(mnt)}/tmp",
            f"mount --bind {q(root)}/var/lib/secagg {q(mnt)}/var/lib/secagg",
        ]
        for target, source in self.secrets.items():  # Secret volumes: read-only
            lines += [f"mount --bind {q(source)} {q(mnt)}{target}", f"mount -o remount,bind,ro {q(mnt)}{target}"]
        argv = ["chroot", f"--userspec={self.image.user}", str(mnt),
                *chroot_env({"HOME": "/var/lib/secagg", **self.image.env}), *self.argv]
        print("+ " + " ".join(shlex.quote(a) for a in argv), flush=True)
        self._log_f = open(self.log, "ab")
        self._log_start = self.log.stat().st_size
        self.proc = in_namespace(lines, argv, stdout=self._log_f, stderr=subprocess.STDOUT,
                                 cwd="/", start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[self._log_start:].decode(errors="replace")
            if "serving on" in text:
                return
            if self.proc.poll() is not None:
                raise BuildError(f"the aggregator exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.3)
        raise BuildError(f"the aggregator did not say 'serving on' within {timeout:.0f} s; see {self.log}")

    def process(self) -> dict:
        """Who the serving process is: uid, gid, capabilities, memory."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        fields = {k: v.strip() for k, v in (line.split(":", 1) for line in status.splitlines() if ":" in line)}
        cmdline = Path(f"/proc/{self.proc.pid}/cmdline").read_bytes().split(b"\0")
        return {"pid": self.proc.pid, "uid": fields["Uid"].split(), "gid": fields["Gid"].split(),
                "cap_eff": fields["CapEff"], "cap_prm": fields["CapPrm"], "vm_rss": fields["VmRSS"],
                "vm_hwm": fields["VmHWM"], "cmdline": [c.decode() for c in cmdline if c]}

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        self._log_f.close()
        return code


def host_run(*argv: str) -> subprocess.CompletedProcess:
    """A command of this repository's venv (the client side, outside the chroot)."""
    return subprocess.run(argv, capture_output=True, text=True)


def secagg_cli(*args: str) -> dict:
    """This repository's ``secagg`` command; its JSON output. Fails the check on an error."""
    proc = host_run(str(Path(sys.executable).with_name("secagg")), *args)
    if proc.returncode != 0:
        raise BuildError(f"secagg {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


def metrics(port: int) -> dict[str, float]:
    """The secagg_* samples of the aggregator's /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("secagg_"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def verify(image: Stage, workdir: Path) -> dict:
    import numpy as np

    run_dir = workdir / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    report: dict = {}

    # What the federation's operator does, outside: keys, a CA, the certificates.
    keys, pki = run_dir / "keys", run_dir / "pki"
    secagg_cli("keygen", "--out", str(keys))
    secagg_cli("certs", "init", "--dir", str(pki))
    secagg_cli("certs", "issue", "--dir", str(pki), "--name", "server", "--server", "--host", "127.0.0.1",
               "--host", "localhost")
    sites = ["site1", "site2", "site3"]
    for name in sites:
        secagg_cli("certs", "issue", "--dir", str(pki), "--name", name)
    secagg_cli("certs", "issue", "--dir", str(pki), "--name", "ops", "--admin")

    # The two Secrets, as Kubernetes mounts them with fsGroup 10001: root-owned, group-readable.
    gid = int(image.user.split(":")[1]) if ":" in image.user else 0
    tls_dir, fed_dir = run_dir / "secret-tls", run_dir / "secret-federation"
    for d, files in ((tls_dir, {"server.crt": pki / "server.crt", "server.key": pki / "server.key",
                                "ca.crt": pki / "ca.crt"}), (fed_dir, {"server.key": keys / "server.key"})):
        d.mkdir()
        for name, src in files.items():
            shutil.copy(src, d / name)
            os.chown(d / name, 0, gid)
            (d / name).chmod(0o440)
        d.chmod(0o755)
    secrets = {"/etc/secagg/tls": tls_dir, "/etc/secagg/federation": fed_dir}

    # The image's own command and config file; only the addresses move to loopback ports (this runs
    # in the host's network namespace). Key, state dir and TLS files come from the image's config.
    port, metrics_port, health_port = free_port(), free_port(), free_port()
    argv = image.entrypoint + image.cmd
    argv = set_option(argv, "--listen", f"127.0.0.1:{port}")
    argv = set_option(argv, "--metrics-port", str(metrics_port))
    argv = set_option(argv, "--health-listen", f"127.0.0.1:{health_port}")
    report["command"] = argv
    address = f"127.0.0.1:{port}"
    server = Aggregator(image, secrets, argv, run_dir / "serve.log")
    server.start()
    settings = [line for line in (run_dir / "serve.log").read_text().splitlines() if "settings from" in line]
    report["settings"] = settings[-1].split("settings from ", 1)[-1] if settings else "(not logged)"
    report["process"] = server.process()
    if report["process"]["uid"][0] == "0" or report["process"]["cap_eff"].strip("0"):
        raise BuildError(f"the aggregator runs as root or with capabilities: {report['process']}")

    # The image's HEALTHCHECK, inside the image, as its user, pointed at this run's health port.
    if image.healthcheck:
        probe = set_option(image.healthcheck, "--server", f"127.0.0.1:{health_port}")
        done = in_image(image, probe)
        report["healthcheck"] = {"command": probe, "exit_code": done.returncode,
                                 "output": (done.stdout + done.stderr).strip()}
        if done.returncode != 0:
            raise BuildError(f"the image's HEALTHCHECK failed: {report['healthcheck']}")
    # The mutual-TLS port answers health checks to a client certificate, and the plaintext health
    # port answers health checks only.
    tls_probe = host_run(sys.executable, "-m", "secagg.healthcheck", "--server", address, "--tls-ca",
                         str(pki / "ca.crt"), "--tls-cert", str(pki / "site1.crt"), "--tls-key", str(pki / "site1.key"))
    report["health_over_mtls"] = (tls_probe.stdout + tls_probe.stderr).strip()
    leak = host_run(str(Path(sys.executable).with_name("secagg")), "round", "status", "--server",
                    f"127.0.0.1:{health_port}", "--round", "r1")
    report["aggregator_api_on_health_port"] = {"exit_code": leak.returncode, "stderr": leak.stderr.strip()}
    if tls_probe.returncode != 0 or leak.returncode == 0:
        raise BuildError(f"health checks misbehave: {report['health_over_mtls']}, {report['aggregator_api_on_health_port']}")

    # A round: three sites with their own random models and sample counts, over mutual TLS.
    def tls(name: str) -> list[str]:
        return ["--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / f"{name}.crt"), "--tls-key", str(pki / f"{name}.key")]

    rng = np.random.default_rng(20240617)
    layout = {"lstm/kernel": (8, 128), "lstm/recurrent_kernel": (32, 128), "lstm/bias": (128,),
              "dense/kernel": (32, 1), "dense/bias": (1,)}
    models, paths, weights = [], [], [250.0, 75.0, 1000.0]
    for name in sites:
        tensors = {k: rng.standard_normal(shape) * 0.5 for k, shape in layout.items()}
        path = run_dir / f"{name}.npz"
        np.savez(path, **tensors)
        models.append(tensors)
        paths.append(path)
    secagg_cli("round", "create", "--server", address, "--round", "r1", "--clients", "3", "--template",
               str(paths[0]), "--enroll", ",".join(sites), *tls("ops"))
    for name, path, weight in zip(sites, paths, weights):
        r = secagg_cli("submit", "--server", address, "--round", "r1", "--key", str(keys / "client.key"),
                       "--client-id", name, "--model", str(path), "--weight", str(weight), "--quiet", *tls(name))
        report.setdefault("submissions", []).append({k: r[k] for k in ("client_id", "num_params", "wire_bytes")})
    status = secagg_cli("round", "status", "--server", address, "--round", "r1", *tls("site1"))
    report["status"] = {k: status[k] for k in ("state", "submitted", "expected", "clients", "num_params")}
    w = np.asarray(weights)
    expected = {k: np.tensordot(w, np.stack([m[k] for m in models]), axes=1) / w.sum() for k in layout}

    def fetch_error(out: Path, who: str) -> float:
        secagg_cli("fetch", "--server", address, "--round", "r1", "--key", str(keys / "client.key"), "--template",
                   str(paths[0]), "--out", str(out), "--wait", "60", "--quiet", *tls(who))
        with np.load(out) as got:
            return max(float(np.max(np.abs(got[k] - expected[k]))) for k in layout)

    report["max_error"] = fetch_error(run_dir / "global.npz", "site2")
    report["metrics"] = {k: v for k, v in metrics(metrics_port).items()
                         if k.split("{")[0] in ("secagg_submissions_accepted_total", "secagg_rounds_closed_total",
                                                "secagg_fetches_total", "secagg_open_rounds")}
    report["process_after_round"] = {k: v for k, v in server.process().items() if k.startswith("vm_")}
    report["state_files"] = sorted(str(p.relative_to(image.root / "var/lib/secagg"))
                                   for p in (image.root / "var/lib/secagg").rglob("*") if p.is_file())

    # Durability: SIGKILL, restart on the same state dir, the closed round is still there.
    report["sigkill_exit"] = server.stop(signal.SIGKILL)
    server.start()
    report["restarted_status"] = secagg_cli("round", "status", "--server", address, "--round", "r1",
                                            *tls("site3"))["state"]
    report["max_error_after_restart"] = fetch_error(run_dir / "global2.npz", "site3")
    report["sigterm_exit"] = server.stop(signal.SIGTERM)
    report["serve_log_tail"] = (run_dir / "serve.log").read_text().splitlines()[-4:]
    if status["state"] != "closed" or report["restarted_status"] != "closed":
        raise BuildError(f"the round did not close or did not survive the restart: {report}")
    if report["max_error"] > 1e-6 or report["max_error_after_restart"] > 1e-6:
        raise BuildError(f"the average is off: {report['max_error']:.3g} / {report['max_error_after_restart']:.3g}")
    if report["metrics"].get("secagg_submissions_accepted_total") != 3.0:
        raise BuildError(f"the metrics do not count the 3 accepted updates: {report['metrics']}")
    return report


def compose_demo(image: Stage, workdir: Path, compose_file: Path) -> dict:
    """deploy/docker-compose.yml's services, each in the rootfs as compose would run it: its user,
    environment, entrypoint and command, its volumes (here: folders) with their :ro, read_only.
    Stand-ins for what only an engine gives: loopback for the network, /etc/hosts naming the
    aggregator, the ports of this run instead of 50051/50052."""
    import yaml

    compose = yaml.safe_load(compose_file.read_text())
    services = compose["services"]
    run_dir = workdir / "compose"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    port, health = free_port(), free_port()
    hosts = run_dir / "hosts"
    hosts.write_text("127.0.0.1 localhost aggregator\n")
    volumes = {name: run_dir / "volumes" / name for name in compose["volumes"]}
    for path in volumes.values():
        path.mkdir(parents=True)
    # A new named volume mounted on a directory of the image starts with its owner and mode.
    for svc in services.values():
        for mount in svc.get("volumes", []):
            source, target = mount.split(":")[:2]
            in_image_dir = image.root / target.lstrip("/")
            if in_image_dir.is_dir():
                st = in_image_dir.stat()
                os.chown(volumes[source], st.st_uid, st.st_gid)
                volumes[source].chmod(st.st_mode & 0o7777)
    # Mount points the engine would create in the container's own layer; removed afterwards.
    made: list[Path] = []
    if not (image.root / "etc/hosts").exists():
        (image.root / "etc/hosts").touch()
        made.append(image.root / "etc/hosts")
    for svc in services.values():
        for mount in svc.get("volumes", []):
            target = image.root / mount.split(":")[1].lstrip("/")
            if not target.exists():
                target.mkdir(parents=True)
                made.append(target)

    def start(name: str, argv: list[str] | None = None) -> subprocess.Popen:
        svc = services[name]
        mnt = run_dir / f"root-{name}"
        mnt.mkdir()
        q = _quote
        lines = [f"mount --bind {q(image.root)} {q(mnt)}"]
        if svc.get("read_only"):
            lines.append(f"mount -o remount,bind,ro {q(mnt)}")
        lines += [f"mount -t proc proc {q(mnt)}/proc", f"mount --rbind /dev {q(mnt)}/dev",
                  f"mount -t tmpfs tmpfs {q(mnt)}/tmp", f"mount --bind {q(hosts)} {q(mnt)}/etc/hosts"]
        for mount in svc.get("volumes", []):
            source, target, *mode = mount.split(":")
            lines.append(f"mount --bind {q(volumes[source])} {q(mnt)}{target}")
            if mode == ["ro"]:
                lines.append(f"mount -o remount,bind,ro {q(mnt)}{target}")
        env = {"HOME": "/", **image.env, **{k: str(v) for k, v in (svc.get("environment") or {}).items()}}
        if argv is None:
            script = svc["command"][0].replace("$$", "$").replace("aggregator:50051", f"aggregator:{port}")
            argv = svc.get("entrypoint", image.entrypoint) + [script]
        cmd = ["chroot", f"--userspec={svc.get('user', image.user)}", str(mnt), *chroot_env(env), *argv]
        log = open(run_dir / f"{name}.log", "wb")
        return in_namespace(lines, cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def finish(name: str, proc: subprocess.Popen) -> None:
        code = proc.wait(timeout=600)
        if code != 0:
            raise BuildError(f"compose service {name} exited {code}: {(run_dir / f'{name}.log').read_text()[-2000:]}")

    report: dict = {}
    aggregator = None
    try:
        for name in ("certs", "keygen"):
            finish(name, start(name))
        argv = image.entrypoint + image.cmd
        for option, value in (("--listen", f"127.0.0.1:{port}"), ("--health-listen", f"127.0.0.1:{health}"),
                              ("--metrics-port", "0")):
            argv = set_option(argv, option, value)
        aggregator = start("aggregator", argv)
        probe = set_option(services["aggregator"]["healthcheck"]["test"][1:], "--server", f"127.0.0.1:{health}")
        for _ in range(120):  # depends_on: service_healthy
            done = in_image(image, probe)
            if done.returncode == 0:
                break
            time.sleep(1)
        else:
            raise BuildError(f"the compose healthcheck never passed: {done.stdout}{done.stderr}")
        finish("admin", start("admin"))
        sites = {name: start(name) for name in services if name.startswith("site")}
        for name, proc in sites.items():
            finish(name, proc)
        finish("check", start("check"))
        report["check"] = (run_dir / "check.log").read_text().strip()
    finally:
        if aggregator is not None:
            aggregator.send_signal(signal.SIGTERM)
            report["aggregator_exit"] = aggregator.wait(timeout=60)
        for path in reversed(made):
            path.rmdir() if path.is_dir() else path.unlink()
    report["services"] = sorted(services)
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dockerfile", type=Path, default=REPO / "deploy/Dockerfile")
    p.add_argument("--context", type=Path, default=REPO)
    p.add_argument("--workdir", type=Path, default=REPO / "deploy/.rootfs",
                   help="cache of the debootstrap base, the stages' rootfs and the run (gitignored)")
    p.add_argument("--build-only", action="store_true", help="build the rootfs and inspect it; serve nothing")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("rootfs.py: needs root (debootstrap, chroot, mounts)", file=sys.stderr)
        return 1
    args.workdir.mkdir(parents=True, exist_ok=True)
    # Passed to RUN steps as Docker passes its predefined proxy build arguments.
    build_env = {k: v for k, v in os.environ.items() if k.upper() in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")}
    host_ca = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")
    started = time.monotonic()
    try:
        image = build(args.dockerfile, args.context, args.workdir, build_env, host_ca if host_ca.is_file() else None)
        report = {"build_seconds": round(time.monotonic() - started, 1), "image": image.config(),
                  "inspect": inspect(image)}
        if not args.build_only:
            report["round"] = verify(image, args.workdir)
            report["compose"] = compose_demo(image, args.workdir, args.dockerfile.with_name("docker-compose.yml"))
    except BuildError as exc:
        print(f"\nrootfs.py: FAILED: {exc}", file=sys.stderr)
        return 1
    (args.workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + json.dumps(report, indent=2))
    i = report["inspect"]
    print(f"\nOK: rootfs {i['rootfs_bytes'] / 2**20:.0f} MiB (venv {i['venv_bytes'] / 2**20:.0f} MiB), "
          f"{i['debian_packages']} Debian packages, {len(i['python_packages'])} Python distributions, {i['python']}; "
          "tensorflow and torch not importable")
    if "round" in report:
        r = report["round"]
        print(f"OK: served as uid {r['process']['uid'][0]} (CapEff {r['process']['cap_eff']}) on a read-only root, "
              f"settings {r['settings']}; HEALTHCHECK: {r.get('healthcheck', {}).get('output')}; "
              f"round closed, max error {r['max_error']:.3g}, after SIGKILL + restart "
              f"{r['max_error_after_restart']:.3g}; RSS {r['process_after_round']['vm_rss']}")
    if "compose" in report:
        print(f"OK: deploy/docker-compose.yml's services in the rootfs: {report['compose']['check']}")
    print(f"report: {args.workdir / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
