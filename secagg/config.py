"""The settings of ``secagg serve``: from flags, environment variables or a TOML file.

Every option ``--some-option`` is also ``SECAGG_SOME_OPTION`` in the environment and ``some-option``
(or ``some_option``) in the file given by ``--config``/``SECAGG_CONFIG``. Precedence: flag, then
environment, then file, then default. :data:`SERVE_OPTIONS` is the one list of options: the parser
is built from it, and README.md ("Operate" / "Configuration") documents it; a test keeps them in sync.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import tomllib
from collections.abc import Mapping
from pathlib import Path

from secagg.errors import SecAggError
from secagg.logs import FORMATS, LEVELS
from secagg.rounds import DEFAULT_MAX_PARAMS, DEFAULT_MIN_COHORT

ENV_PREFIX = "SECAGG_"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


@dataclasses.dataclass(frozen=True)
class Option:
    """One ``secagg serve`` option. ``kind``: str, path, int, float or bool."""

    name: str
    kind: str
    help: str
    default: object = None
    required: bool = False
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    group: str = ""
    in_file: bool = True  # False only for --config itself
    shown_default: str = ""  # when None means more than "none" or "off"

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def default_text(self) -> str:
        """The default as README.md's table and ``--help`` show it."""
        if self.required:
            return "required"
        if self.shown_default:
            return self.shown_default
        if self.default is None:
            return "off" if self.name.endswith(("-port", "-listen")) else "none"
        return str(self.default).lower() if self.kind == "bool" else str(self.default)


TLS, OPS = "TLS", "operations"
SERVE_OPTIONS: tuple[Option, ...] = (
    Option("config", "path", "a TOML file of these options (keys as the flags without '--'); flags and SECAGG_* "
           "variables override it", metavar="FILE", in_file=False),
    Option("key", "path", "the federation's server.key", required=True, metavar="SERVER_KEY"),
    Option("listen", "str", "address to bind (port 0 picks a free port)", required=True, metavar="HOST:PORT"),
    Option("state-dir", "path", "directory for rounds and accepted updates", required=True, metavar="DIR"),
    Option("tls-cert", "path", "the aggregator's certificate ('secagg certs issue --server')", metavar="CRT", group=TLS),
    Option("tls-key", "path", "the aggregator's private key", metavar="KEY", group=TLS),
    Option("tls-ca", "path", "mutual TLS: clients need a certificate from this CA, submit only as its name, and need "
           "--admin ones to create rounds", metavar="CA_CRT", group=TLS),
    Option("insecure", "bool", "allow a non-loopback --listen without mutual TLS", default=False, group=TLS),
    Option("min-cohort", "int", "no round may close with fewer than K contributions (with K contributors, K-1 "
           "colluding sites can read the remaining site's update off the sum)", default=DEFAULT_MIN_COHORT,
           metavar="K"),
    Option("max-params", "int", "largest model a round may be created for, in parameters (the running sum "
           "is allocated when the round is created: about 18 bytes per parameter)", default=DEFAULT_MAX_PARAMS,
           metavar="N"),
    Option("epsilon-budget", "float", "the federation's privacy budget: DP rounds that would exceed it are refused "
           "(kept in --state-dir)", metavar="EPS"),
    Option("delta", "float", "the federation's delta for --epsilon-budget (e.g. 1e-5)", metavar="D"),
    Option("allow-non-dp-rounds", "bool", "with --epsilon-budget, also create rounds without DP (refused otherwise: "
           "their sums carry no noise)", default=False),
    Option("max-uploads", "int", "uploads served at once; more are refused with a retry hint (the secagg client "
           "retries) instead of queueing: memory stays bounded", default=16, metavar="N", group=OPS),
    Option("max-waits", "int", "waiting calls (fetch, masking stages) served at once; more are refused likewise",
           default=64, metavar="N", group=OPS),
    Option("max-calls-per-client", "int", "uploads, and waiting calls, one client may have open at once (by its "
           "certificate's name; mutual TLS only)", default=4, metavar="N", group=OPS),
    Option("upload-idle-timeout", "float", "an upload that sends nothing this long is cancelled, freeing its slot",
           default=30.0, metavar="SECONDS", group=OPS),
    Option("ingest-workers", "int", "receive uploads in this many worker processes, each on a port of its own "
           "(announced to clients; same host and TLS), so that ingest uses more than one core (0: in the "
           "aggregator's own process)", default=0, metavar="N", group=OPS),
    Option("metrics-port", "int", "serve Prometheus metrics at http://METRICS_HOST:PORT/metrics (0 picks a free "
           "port; the address is logged)", metavar="PORT", group=OPS),
    Option("metrics-host", "str", "address the metrics port binds", metavar="HOST", group=OPS,
           shown_default="the host of --listen"),
    Option("health-listen", "str", "also serve gRPC health checks, and nothing else, in plaintext on this address "
           "(for probes that cannot present a client certificate)", metavar="HOST:PORT", group=OPS),
    Option("shutdown-grace", "float", "on SIGTERM, seconds in-flight calls get to finish (health says NOT_SERVING "
           "meanwhile)", default=1.0, metavar="SECONDS", group=OPS),
    Option("log-format", "str", "text for people, json for log collectors (one object per line)", default="text",
           choices=FORMATS, group=OPS),
    Option("log-level", "str", "the least severe level logged", default="info", choices=LEVELS, group=OPS),
)
_BY_NAME = {o.name: o for o in SERVE_OPTIONS}


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """The resolved settings of ``secagg serve``; ``sources`` says where each came from (flag, env, file, default)."""

    config: Path | None
    key: Path
    listen: str
    state_dir: Path
    tls_cert: Path | None
    tls_key: Path | None
    tls_ca: Path | None
    insecure: bool
    min_cohort: int
    max_params: int
    epsilon_budget: float | None
    delta: float | None
    allow_non_dp_rounds: bool
    max_uploads: int
    max_waits: int
    max_calls_per_client: int
    upload_idle_timeout: float
    ingest_workers: int
    metrics_port: int | None
    metrics_host: str | None
    health_listen: str | None
    shutdown_grace: float
    log_format: str
    log_level: str
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """Add every option of :data:`SERVE_OPTIONS`; values not given on the command line stay None."""
    descriptions = {
        TLS: "Without --tls-ca nobody's identity is checked: allowed on a loopback --listen, elsewhere only with "
             "--insecure.",
        OPS: "Health checks, metrics, logs, shutdown.",
    }
    groups: dict[str, argparse._ActionsContainer] = {"": parser}
    types = {"int": int, "float": float}
    for o in SERVE_OPTIONS:
        if o.group not in groups:
            groups[o.group] = parser.add_argument_group(o.group, descriptions.get(o.group))
        env = f"env {o.env}"
        default = "" if o.required else f"; default {o.default_text}"
        text = f"{o.help} ({env}{default})"
        if o.kind == "bool":
            groups[o.group].add_argument(o.flag, action="store_const", const=True, default=None, help=text)
        else:
            groups[o.group].add_argument(o.flag, type=types.get(o.kind), default=None, metavar=o.metavar,
                                         choices=o.choices or None, help=text)


def resolve(given: Mapping[str, object], environ: Mapping[str, str]) -> ServeSettings:
    """Settings from the command line (``given``: dest -> value, None if not given), ``environ`` and the file.

    Raises :class:`SecAggError` naming the option, variable or file key that is wrong or missing.
    """
    config_path = given.get("config") or environ.get(_BY_NAME["config"].env) or None
    from_file = _read_file(Path(config_path)) if config_path else {}
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for o in SERVE_OPTIONS:
        if given.get(o.dest) is not None:
            value, source = _check_choice(o, given[o.dest], o.flag), "flag"
        elif environ.get(o.env):
            value, source = _from_env(o, environ[o.env]), "env"
        elif o.name in from_file:
            value, source = from_file[o.name], "file"
        elif o.required:
            raise SecAggError(f"{o.flag} is required: give it, set {o.env}, or put {o.name} in the --config file")
        else:
            value, source = o.default, "default"
        if o.kind == "path" and value is not None:
            value = Path(value)
        values[o.dest] = value
        sources[o.name] = source
    port = values["metrics_port"]
    if port is not None and not 0 <= port <= 65535:
        raise SecAggError(f"--metrics-port must be between 0 and 65535, got {port}")
    if values["shutdown_grace"] < 0:
        raise SecAggError(f"--shutdown-grace must be 0 or more seconds, got {values['shutdown_grace']}")
    return ServeSettings(**values, sources=sources)


def _read_file(path: Path) -> dict[str, object]:
    """The file's options by name, type-checked; relative paths are relative to the file's folder."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise SecAggError(f"config file {path} does not exist (--config / {_BY_NAME['config'].env})") from None
    except OSError as exc:
        raise SecAggError(f"cannot read config file {path} ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SecAggError(f"config file {path} is not valid TOML: {exc}") from None
    known = [o.name for o in SERVE_OPTIONS if o.in_file]
    out: dict[str, object] = {}
    for key, value in data.items():
        name = key.replace("_", "-")
        option = _BY_NAME.get(name)
        if option is None or not option.in_file:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise SecAggError(f"config file {path}: unknown key {key!r}; {hint}known keys: {', '.join(known)}")
        if name in out:
            raise SecAggError(f"config file {path}: {key!r} is given twice (as {name} and {option.dest}); keep one")
        value = _from_file(option, value, f"config file {path}: {key}")
        if option.kind == "path":
            value = path.parent / value
        out[name] = value
    return out


def _from_file(o: Option, value: object, where: str) -> object:
    ok = {"str": isinstance(value, str), "path": isinstance(value, str), "bool": isinstance(value, bool),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool)}[o.kind]
    if not ok:
        wanted = {"str": "a string", "path": "a path (string)", "bool": "true or false", "int": "an integer",
                  "float": "a number"}[o.kind]
        raise SecAggError(f"{where} must be {wanted}, got {value!r}")
    return _check_choice(o, float(value) if o.kind == "float" else value, where)


def _from_env(o: Option, text: str) -> object:
    where = f"environment variable {o.env}"
    try:
        if o.kind == "int":
            return int(text)
        if o.kind == "float":
            return float(text)
    except ValueError:
        raise SecAggError(f"{where} must be {'an integer' if o.kind == 'int' else 'a number'}, got {text!r}") from None
    if o.kind == "bool":
        if text.strip().lower() in _TRUE | _FALSE:
            return text.strip().lower() in _TRUE
        raise SecAggError(f"{where} must be true or false (1/0, yes/no, on/off), got {text!r}")
    return _check_choice(o, text, where)


def _check_choice(o: Option, value: object, where: str) -> object:
    if o.choices and value not in o.choices:
        raise SecAggError(f"{where} must be one of {', '.join(o.choices)}, got {value!r}")
    return value
