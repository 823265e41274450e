"""The ``secagg`` command: a thin layer over the Python API in ``secagg.api``.

Every command exits 0 on success; on failure it prints one line, ``secagg: error: ...``, to stderr
and exits 1 (2 for bad usage, as argparse does).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from typing import TYPE_CHECKING

from secagg.config import add_serve_options
from secagg.errors import SecAggError
from secagg.transport.admission import Limits
from secagg.transport.allocator import tune_malloc

if TYPE_CHECKING:
    from secagg.config import ServeSettings
    from secagg.site_policy import SitePolicy
    from secagg.transport.server import Server
    from secagg.transport.tls import ClientTLS, ServerTLS

# The defaults of secagg.merge.methods (INIT_EPOCHS, INIT_WARMUP_ROUNDS), repeated here so that the
# CLI starts without importing the merge code; tests/merge/test_simulate.py checks they agree.
INIT_EPOCHS = 10
INIT_WARMUP_ROUNDS = 1

EPILOG = "Docs: README.md. Errors name the problem and the fix; exit code 1 on any error."


class _Progress:
    """Progress on stderr for long work, at most a few lines per second.

    Only when stderr is a terminal: when it is captured (scripts, CI), stderr carries nothing but
    the one-line error of a failed command.
    """

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet or not sys.stderr.isatty()
        self._last = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if self.quiet or (done != total and now - self._last < 0.5):
            return
        self._last = now
        print(f"  {stage}: {done}/{total} ({100 * done // max(total, 1)}%)", file=sys.stderr, flush=True)


METHODS_HELP = """methods (or a '+'-joined pipeline: a base, then regmean or fisher, then repair, then readout or hybrid):
  auto      builds mean, align, align+regmean, align+repair, each as is, with a readout refit and with a
            hybrid head, plus the linear model, and keeps the one with the lowest pooled validation
            error (recommended; --same-architecture keeps to the sites' architecture)
  mean      the sample-weighted average of the weights (what averaging get_weights() gives)
  align     hidden units permuted to match before averaging (activation matching)
  regmean   linear maps merged from encrypted Gram matrices (RegMean)
  fisher    weights averaged with their diagonal Fisher information
  repair    per-unit affine correction of the averaged units' statistics (REPAIR)
  readout   the output layer refit in closed form from encrypted sums (ridge)
  hybrid    the network plus a linear skip from its input window, fitted with the output layer in one
            closed-form ridge regression (written as a Keras functional model / a PyTorch state dict)
  linear    a pooled ridge regression on the input windows (a model of its own)
  init      a common start from a shared seed, a warm-up round, local training, then the average
examples: auto, align+hybrid, align+readout, align+regmean+readout, init, linear"""


class _StepProgress:
    """Progress of simulate/merge on stderr: a status line on a terminal, one line per step otherwise."""

    def __init__(self, quiet: bool, total: int | None = None) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.total = total
        self.count = 0
        self.start = time.monotonic()
        self.last = ""

    def __call__(self, step: str, detail: str = "") -> None:
        if self.quiet:
            return
        if step != "wait":
            self.count += 1
        elapsed = time.monotonic() - self.start
        where = f"{self.count}/{max(self.total, self.count)}" if self.total else f"{self.count}"
        text = f"[{where}] {step}: {detail}" if detail else f"[{where}] {step}"
        if self.tty:
            bar = ""
            if self.total:
                done = min(self.count - 1, self.total) * 20 // self.total
                bar = "#" * done + "-" * (20 - done) + " "
            line = f"\r\x1b[2K{bar}{text} ({elapsed:.0f} s)"
            print(line[:200], end="", file=sys.stderr, flush=True)
        else:
            print(f"secagg: {text} ({elapsed:.1f} s)", file=sys.stderr, flush=True)

    def done(self, text: str) -> None:
        if self.quiet:
            return
        elapsed = time.monotonic() - self.start
        if self.tty:
            print(f"\r\x1b[2K{text} ({elapsed:.0f} s)", file=sys.stderr, flush=True)
        else:
            print(f"secagg: {text} ({elapsed:.1f} s)", file=sys.stderr, flush=True)


def _print_scores(info: dict, quiet: bool) -> None:
    """auto's candidates as a small table on stderr, best first, beside the sites' own models."""
    scores = info.get("scores") if isinstance(info, dict) else None
    if quiet or not scores:
        return
    lines = [f"auto: {scores['metric']}; lower is better"]
    for name, value in scores["candidates"].items():
        mark = "  <- chosen" if name == info.get("chosen") else ""
        label = name + (" (plain average)" if name == "mean" else "")
        lines.append(f"  {label:<34} {value:.4f}{mark}")
    lines.append(f"  {'each site its own model':<34} {scores['sites_own_models']:.4f}  (on its own data; not a "
                 "global model)")
    for name, why in {**scores.get("dropped", {}), **scores.get("skipped", {})}.items():
        lines.append(f"  {name:<34} not scored: {why}")
    if info.get("architecture"):
        lines.append(f"auto chose {info['chosen']}: {info['architecture']}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="secagg", description="Encrypted aggregation of model weights (CKKS over gRPC).",
                                epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    k = sub.add_parser("keygen", help="create a federation key pair", epilog=EPILOG,
                       description="Write KEYDIR/client.key (secret, mode 0600, for clients only) and "
                                   "KEYDIR/server.key (for the aggregator: cannot decrypt).")
    k.add_argument("--out", required=True, metavar="KEYDIR", help="directory for the two key files")

    ct = sub.add_parser("certs", help="create a development CA and TLS certificates", epilog=EPILOG,
                        description="A local CA for mutual TLS. A client certificate's name is the only client id "
                                    "it may submit as; --admin certificates may create rounds. Keys are written "
                                    "with mode 0600; existing files are never overwritten.")
    ctsub = ct.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    ci = ctsub.add_parser("init", help="create the CA (ca.crt for everyone, ca.key to guard)", epilog=EPILOG)
    ci.add_argument("--dir", required=True, metavar="DIR", help="directory for ca.crt and ca.key")
    cs = ctsub.add_parser("issue", help="issue NAME.crt and NAME.key from the CA in --dir", epilog=EPILOG)
    cs.add_argument("--dir", required=True, metavar="DIR", help="directory of the CA (from 'secagg certs init')")
    cs.add_argument("--name", required=True, metavar="NAME", help="a client id (or a file name for --server)")
    cs.add_argument("--admin", action="store_true", help="the certificate may create rounds")
    cs.add_argument("--server", action="store_true", help="the aggregator's certificate")
    cs.add_argument("--host", action="append", default=[], metavar="HOST",
                    help="with --server: a DNS name or IP clients dial (repeatable; default localhost and 127.0.0.1)")

    s = sub.add_parser("serve", help="run the aggregator", epilog=EPILOG,
                       description="Run the aggregator. It holds no secret key and only adds ciphertexts. State is "
                                   "durable: after a crash, restart on the same --state-dir and nothing accepted is "
                                   "lost. Every option may also come from its SECAGG_* variable or a --config file "
                                   "(flag > variable > file > default); --key, --listen and --state-dir are required "
                                   "from one of them.")
    add_serve_options(s)

    r = sub.add_parser("round", help="create, show, list or cancel rounds", epilog=EPILOG)
    rsub = r.add_subparsers(dest="round_command", required=True, metavar="ACTION")
    rc = rsub.add_parser("create", help="create a round for a model architecture", epilog=EPILOG,
                         description="Create a round. Only the template's tensor names, shapes, dtypes and layer "
                                     "types are sent. Models match it by structure: tensors in the same order with "
                                     "the same shapes, dtypes and layer types; names may differ.")
    _server_round(rc)
    rc.add_argument("--clients", required=True, type=int, metavar="N", help="number of expected clients")
    rc.add_argument("--min-clients", type=int, metavar="K",
                    help="quorum: the round closes at the deadline if at least K submitted (default: N)")
    rc.add_argument("--deadline", type=float, metavar="SECONDS", help="seconds from now until the round closes or fails")
    rc.add_argument("--template", required=True, metavar="MODEL", help="a model of the round's architecture")
    rc.add_argument("--max-weight", type=float, metavar="W",
                    help="largest --weight a client may use (default 1e5); released averages are precise to about "
                         "release_precision * W_max / W, so keep it close to the real weights (1 for unweighted)")
    rc.add_argument("--value-bound", type=float, metavar="B",
                    help="largest |parameter| a client may submit (default 100); keeps the encrypted sum from overflowing")
    rc.add_argument("--enroll", metavar="A,B,...", help="comma-separated client ids allowed to submit (default: any)")
    mk = rc.add_argument_group(
        "masking", "Pairwise masking under the encryption: no coalition of the aggregator with fewer than the threshold "
                   "of sites can read one site's update, and sites may drop out. Needs mutual TLS and a certificate "
                   "per site; each 'secagg submit' stays online through the round's four stages.")
    mk.add_argument("--masking", action="store_true", help="mask the round (see docs/privacy-audit.md, who learns what)")
    mk.add_argument("--mask-threshold", type=int, default=0, metavar="T",
                    help="shares needed to unmask a site (default and minimum: a majority of its neighbours and itself)")
    mk.add_argument("--mask-degree", type=int, default=0, metavar="K",
                    help="neighbours per site, even (default: every other site up to 9 sites, else ~2 log2 N, at least 8)")
    mk.add_argument("--stage-timeout", type=float, default=300.0, metavar="SECONDS",
                    help="how long each stage waits for missing sites before going on without them (default 300)")
    _dp_options(rc, "client-level differential privacy of the round (every site clips and noises its update)")
    rc.add_argument("--target-epsilon", type=float, metavar="EPS",
                    help="instead of --noise-multiplier: the smallest noise that gives this round epsilon <= EPS")
    rc.add_argument("--min-honest", type=int, metavar="K",
                    help="distributed DP: contributions assumed honest; each site adds 1/K of the noise variance "
                         "(default: --min-clients)")
    rs = rsub.add_parser("status", help="print a round's status as JSON", epilog=EPILOG)
    _server_round(rs)
    rx = rsub.add_parser("cancel", help="cancel a round that can never complete", epilog=EPILOG,
                         description="Fail a collecting round with the reason 'cancelled: TEXT': its accepted updates "
                                     "are deleted and waiting fetches end with that reason. Under mutual TLS this "
                                     "needs an admin certificate. Prints the round's status as JSON.")
    _server_round(rx)
    rx.add_argument("--reason", default="", metavar="TEXT", help="why, in one line (shown to every site)")
    rl = rsub.add_parser("list", help="print every round of the aggregator as JSON", epilog=EPILOG,
                         description="Print {\"rounds\": [...]}: every round's id, state, submitted, expected, "
                                     "created_unix and reason, oldest first.")
    _server_round(rl, round_id=False)
    for admin in (rc, rs, rx, rl):
        admin.add_argument("--retry-for", type=float, default=60.0, metavar="SECONDS",
                           help="keep trying to reach the aggregator this long, e.g. while it starts (default 60)")

    sm = sub.add_parser("submit", help="encrypt a model and submit it to a round", epilog=EPILOG,
                        description="Encrypt MODEL under the federation key and submit it. The weight travels encrypted.")
    _server_round(sm)
    sm.add_argument("--key", required=True, help="the federation's client.key")
    sm.add_argument("--client-id", required=True, metavar="NAME", help="this site's name (once per round)")
    sm.add_argument("--model", required=True, help="model file: .keras, .h5, .pt, .pth or .npz")
    sm.add_argument("--weight", type=float, default=1.0, metavar="W",
                    help="this site's weight, e.g. its number of training samples (default 1)")
    sm.add_argument("--quiet", action="store_true", help="no progress output")
    sm.add_argument("--min-cohort", type=int, default=3, metavar="K",
                    help="masked rounds: reveal unmasking shares only for sums of at least K sites (default 3)")
    sm.add_argument("--retry-for", type=float, default=60.0, metavar="SECONDS",
                    help="keep trying to reach the aggregator this long, at start and if it restarts (default 60)")
    sm.add_argument("--dp-reference", metavar="MODEL",
                    help="DP rounds: clip the update relative to this model every site knows (e.g. the last global "
                         "model); default: clip the whole weight vector")
    _dp_options(sm, "this site's own local DP, for a round without DP settings (the round's settings otherwise "
                    "apply automatically)")
    _site_policy_options(sm)

    f = sub.add_parser("fetch", help="fetch and decrypt a round's weighted average as a model file", epilog=EPILOG)
    _server_round(f)
    f.add_argument("--key", required=True, help="the federation's client.key")
    f.add_argument("--template", required=True, metavar="MODEL", help="a model of the round's architecture")
    f.add_argument("--out", required=True, help="where to write the global model (same format as the template)")
    f.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait up to this long for the round to close")
    f.add_argument("--quiet", action="store_true", help="no progress output")
    f.add_argument("--retry-for", type=float, default=60.0, metavar="SECONDS",
                   help="keep trying to reach the aggregator this long at start (default 60)")
    f.add_argument("--min-cohort", type=int, default=3, metavar="K",
                   help="this site's own minimum: refuse a sum of fewer than K contributions, whatever the aggregator "
                        "says (default 3)")

    sim = sub.add_parser("simulate", help="merge several sites' models through a real loopback aggregator",
                         epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Run a merge method on every site's model and data, with real encryption and a "
                         "real aggregator on 127.0.0.1.\n\n" + METHODS_HELP)
    sim.add_argument("--method", required=True, help="merge method (auto is the recommended choice; list above)")
    sim.add_argument("--finetune-rounds", type=int, default=0, metavar="K", help="encrypted FedAvg rounds afterwards")
    sim.add_argument("--finetune-epochs", type=int, default=1, metavar="E", help="local epochs per fine-tune round")
    sim.add_argument("--init-epochs", type=int, default=INIT_EPOCHS, metavar="E",
                     help=f"method init: local epochs after the common start (default {INIT_EPOCHS})")
    sim.add_argument("--init-warmup", type=int, default=INIT_WARMUP_ROUNDS, metavar="R",
                     help=f"method init: FedAvg rounds of one epoch before local training (default {INIT_WARMUP_ROUNDS})")
    sim.add_argument("--out", required=True, metavar="GLOBAL_MODEL", help="where to write the global model")
    sim.add_argument("--site", nargs=2, action="append", required=True, metavar=("MODEL", "DATA"),
                     help="a site's model file and its DATA.npz (x: samples, timesteps, features; y: targets)")
    sim.add_argument("--seed", type=int, default=0, help="seed for local training and initialization")
    sim.add_argument("--masking", action="store_true",
                     help="run every exchange as a masked round, each site in its own thread with its own certificate "
                          "(needs 3 or more sites; in one process it shows the cost, it protects nobody)")
    sim.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    sim.add_argument("--same-architecture", action="store_true",
                     help="auto: choose only among models of the sites' own architecture (no hybrid, no linear model)")
    _torch_options(sim)
    _dp_options(sim, "client-level DP on every exchange of model weights (methods mean, align, init and "
                     "fine-tune rounds) and row-level DP on the statistics of readout, hybrid and linear (each "
                     "training window is the unit: docs/privacy-audit.md); with statistics, --target-epsilon "
                     "is the row-level epsilon over every release")
    sim.add_argument("--target-epsilon", type=float, metavar="EPS",
                     help="instead of --noise-multiplier: the smallest noise that keeps the whole run at epsilon <= EPS")
    sim.add_argument("--stats-clip", type=float, metavar="B",
                     help="DP on statistics: the bound on one training row's ||r||^2 (default 2 x the row's width)")
    sim.add_argument("--min-honest", type=int, metavar="K",
                     help="distributed DP: contributions assumed honest (default: the number of sites)")

    mg = sub.add_parser("merge", help="take part in a merge as one site of a real federation", epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Run a merge method as this site: every site runs this command with its own "
                        "model and data; each step is an encrypted round <round>.<k>.<step> on the aggregator.\n\n"
                        + METHODS_HELP)
    _server_round(mg)
    mg.add_argument("--key", required=True, help="the federation's client.key")
    mg.add_argument("--client-id", required=True, metavar="NAME", help="this site's name")
    mg.add_argument("--model", required=True, help="this site's model (.keras, .h5, .pt, .pth)")
    mg.add_argument("--data", required=True, help="this site's DATA.npz (x, y in the model's normalized space)")
    mg.add_argument("--method", required=True, help="merge method, the same at every site (list above)")
    mg.add_argument("--clients", required=True, type=int, metavar="N", help="number of sites taking part")
    mg.add_argument("--finetune-rounds", type=int, default=0, metavar="K", help="encrypted FedAvg rounds afterwards")
    mg.add_argument("--finetune-epochs", type=int, default=1, metavar="E", help="local epochs per fine-tune round")
    mg.add_argument("--init-epochs", type=int, default=INIT_EPOCHS, metavar="E",
                     help=f"method init: local epochs after the common start (default {INIT_EPOCHS})")
    mg.add_argument("--init-warmup", type=int, default=INIT_WARMUP_ROUNDS, metavar="R",
                     help=f"method init: FedAvg rounds of one epoch before local training (default {INIT_WARMUP_ROUNDS})")
    mg.add_argument("--wait", type=float, default=3600.0, metavar="SECONDS",
                    help="how long to wait for the other sites at each step (default 3600)")
    mg.add_argument("--max-weight", type=float, default=1e5, metavar="W",
                    help="the same at every site: at least the largest site's training rows (default 1e5)")
    mg.add_argument("--out", required=True, metavar="GLOBAL_MODEL", help="where to write the global model")
    mg.add_argument("--min-cohort", type=int, default=3, metavar="K",
                    help="this site's own minimum: refuse any average of fewer than K sites (default 3)")
    mg.add_argument("--masking", action="store_true",
                    help="mask every exchange's round (needs mutual TLS; every site passes it): no coalition of the "
                         "aggregator with fewer than a majority of the sites reads this site's contributions")
    mg.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    mg.add_argument("--same-architecture", action="store_true",
                     help="auto: choose only among models of the sites' own architecture (no hybrid, no linear model)")
    _torch_options(mg)
    _site_policy_options(mg)

    sc = sub.add_parser("scaler", help="fit a scaler: one shared by all sites from encrypted sums, or this site's "
                        "own (--local)", epilog=EPILOG,
                        description="Shared (default): every site runs this with its own raw data and all get the "
                        "same per-feature mean and standard deviation (of log1p(values) with --log1p); no site reveals "
                        "its statistics. Only standard scaling can be shared: a maximum cannot be computed from an "
                        "encrypted sum without revealing each site's extremes. --local: fit this site's own scaler "
                        "(standard or minmax) on its own history, no aggregator; a new site does this before "
                        "`secagg predict`. The output is a scaler JSON file (README, 'Shared scaling').")
    _server_round(sc, required=False)
    sc.add_argument("--local", action="store_true",
                    help="fit this site's own scaler on its own data; no aggregator, no --server/--round/--key")
    sc.add_argument("--kind", choices=("standard", "minmax"), default="standard",
                    help="standard: (f(v) - mean) / std; minmax: (f(v) - min) / (max - min) into --feature-range, "
                    "with --local only (default standard)")
    sc.add_argument("--feature-range", nargs=2, type=float, metavar=("LO", "HI"),
                    help="the range minmax maps [min, max] to (default 0 1)")
    sc.add_argument("--key", help="the federation's client.key (shared)")
    sc.add_argument("--client-id", metavar="NAME", help="this site's name (shared)")
    sc.add_argument("--data", required=True, help="npz with array 'values' (rows, features) of raw values")
    sc.add_argument("--clients", type=int, metavar="N", help="number of sites taking part (shared)")
    sc.add_argument("--log1p", action="store_true", help="scale log1p(values) (counts)")
    sc.add_argument("--value-bound", type=float, default=1e3, metavar="B",
                    help="bound on |f(value)|^2, the same at every site (default 1e3)")
    sc.add_argument("--wait", type=float, default=3600.0, metavar="SECONDS", help="how long to wait for the others")
    sc.add_argument("--max-weight", type=float, default=1e5, metavar="W",
                    help="the same at every site: at least the largest site's row count (default 1e5)")
    sc.add_argument("--out", required=True, metavar="SCALER_JSON", help="where to write the scaler")

    dg = sub.add_parser("diagnose", help="say why a merged model gives nonsense on a site's data", epilog=EPILOG)
    dg.add_argument("--model", required=True, help="the merged (global) model")
    dg.add_argument("--data", required=True, help="the site's DATA.npz (x, y normalized; optional y_raw)")
    dg.add_argument("--scaler", help="scaler JSON used to de-normalize (secagg scaler's format, or mean/std/log1p); "
                    "needs y_raw in DATA")
    dg.add_argument("--column", type=int, default=0, metavar="I",
                    help="the scaler's feature that is the target, if it has several (default 0)")
    _torch_options(dg)

    pr = sub.add_parser("predict", help="forecast with a (global) model on a site's raw history, e.g. a new site",
                        epilog=EPILOG,
                        description="Scales RAW.npz's 'values' (rows, features, raw values in time order) with "
                        "--scaler, cuts windows of the model's input length, runs the model in its framework, "
                        "de-scales the forecasts and writes them with the row each is for. Prints a JSON summary "
                        "with MAE/RMSE against persistence where the history holds the truth.")
    pr.add_argument("--model", required=True, help="the (global) model: .keras/.h5, or .pt/.pth with --torch-model")
    pr.add_argument("--data", required=True, metavar="RAW_NPZ",
                    help="npz with array 'values' (rows, features) of raw values, one row per time step")
    pr.add_argument("--scaler", required=True, metavar="SCALER_JSON",
                    help="this site's own scaler (secagg scaler --local), or the federation's shared one")
    pr.add_argument("--out", required=True, metavar="FORECAST_NPZ",
                    help="where to write row, forecast, truth, persistence (and forecast_global with --adapt)")
    pr.add_argument("--column", type=int, default=0, metavar="I", help="the feature to forecast (default 0)")
    pr.add_argument("--horizon", type=int, default=1, metavar="H",
                    help="rows ahead of a window's last row the model forecasts (default 1)")
    pr.add_argument("--window", type=int, metavar="ROWS",
                    help="input length; needed for PyTorch models (a Keras file records it)")
    _torch_options(pr)
    pr.add_argument("--adapt", action="store_true",
                    help="refit the readout (last Dense/Linear layer) on this site's own history first")
    pr.add_argument("--adapt-fit", type=float, default=0.5, metavar="FRACTION",
                    help="fit --adapt on this first fraction of the history, score on the rest (default 0.5)")
    pr.add_argument("--adapted-out", metavar="MODEL", help="with --adapt: write the adapted model here")
    return p


def _check_rounds(args: argparse.Namespace) -> None:
    """Counts of rounds and epochs of simulate/merge, before any work starts."""
    if args.finetune_rounds < 0 or args.finetune_epochs < 1:
        raise SecAggError("--finetune-rounds must be >= 0 and --finetune-epochs >= 1")
    if args.init_epochs < 1 or args.init_warmup < 0:
        raise SecAggError("--init-epochs must be >= 1 and --init-warmup >= 0")


def _dp_options(p: argparse.ArgumentParser, title: str) -> None:
    g = p.add_argument_group("differential privacy", title)
    g.add_argument("--clip-norm", type=float, metavar="C", help="L2 bound of one site's contribution")
    g.add_argument("--noise-multiplier", type=float, metavar="Z", help="Gaussian noise std of the sum, in units of C")
    g.add_argument("--delta", type=float, default=None, metavar="D", help="delta of (epsilon, delta) (default 1e-5)")
    g.add_argument("--dp-mode", choices=("local", "distributed"), default=None,
                   help="local: every site adds the full noise; distributed: the sum carries it (default distributed "
                        "for rounds, local for a site's own DP)")


def _dp_config(args: argparse.Namespace, min_clients: int | None, default_mode: str, rounds: int = 1):
    """A DPConfig from the DP options, or None if none was given."""
    target = getattr(args, "target_epsilon", None)
    given = [args.clip_norm, args.noise_multiplier, target, args.delta, args.dp_mode, getattr(args, "min_honest", None)]
    if all(v is None for v in given):
        return None
    from secagg.privacy.accountant import noise_multiplier_for
    from secagg.privacy.mechanism import DPConfig

    if args.clip_norm is None:
        raise SecAggError("differential privacy needs --clip-norm C (the L2 bound of one site's contribution)")
    if (args.noise_multiplier is None) == (target is None):
        raise SecAggError("give exactly one of --noise-multiplier and --target-epsilon" if target is not None
                          else "differential privacy needs --noise-multiplier Z (or --target-epsilon on round create)")
    delta = 1e-5 if args.delta is None else args.delta
    z = args.noise_multiplier if target is None else noise_multiplier_for(target, delta, rounds)
    k = getattr(args, "min_honest", None) or min_clients or 1
    return DPConfig(args.clip_norm, z, delta, args.dp_mode or default_mode, k).validate()


def _site_policy_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("site privacy policy", "This site's own limits, checked against every round's DP "
                             "settings before anything is encrypted: the aggregator is not trusted to choose them.")
    g.add_argument("--require-dp", action="store_true",
                   help="refuse rounds without DP settings (this site's update would carry no noise)")
    g.add_argument("--max-epsilon", type=float, metavar="EPS",
                   help="refuse a round whose own epsilon, computed here from its settings, is above EPS")
    g.add_argument("--min-noise-multiplier", type=float, metavar="Z", help="refuse a round with less noise than Z")
    g.add_argument("--site-budget", type=float, metavar="EPS",
                   help="this site's total epsilon over the federation's rounds, kept in its own ledger; a round "
                        "that would go over it is refused")
    g.add_argument("--site-ledger", metavar="PATH",
                   help="this site's privacy ledger (default with --site-budget: site-ledger.json next to --key)")
    g.add_argument("--allow-row-dp", action="store_true",
                   help="accept rounds with row-level DP (merge statistics: one training window is the unit); "
                        "refused by default when this site asks for DP")


def _site_policy(args: argparse.Namespace) -> SitePolicy | None:
    """This site's privacy policy from --require-dp, --max-epsilon, ... --site-ledger; None if none was given."""
    limits = (args.max_epsilon, args.min_noise_multiplier, args.site_budget, args.site_ledger)
    if not args.require_dp and all(v is None for v in limits):
        return None
    from secagg.site_policy import SitePolicy

    return SitePolicy.for_key(args.key, require_dp=args.require_dp, max_epsilon=args.max_epsilon,
                              min_noise_multiplier=args.min_noise_multiplier, budget=args.site_budget,
                              ledger=args.site_ledger, allow_row_dp=args.allow_row_dp)


def _masking(args):
    """The round's masking settings from ``round create``'s options; None for an unmasked round."""
    if not args.masking:
        if args.mask_threshold or args.mask_degree or args.stage_timeout != 300.0:
            raise SecAggError("--mask-threshold, --mask-degree and --stage-timeout are settings of a masked round: add "
                              "--masking")
        return None
    from secagg.masking.settings import MaskSettings

    return MaskSettings(args.mask_threshold, args.mask_degree, args.stage_timeout)


def _server_round(p: argparse.ArgumentParser, round_id: bool = True, required: bool = True) -> None:
    p.add_argument("--server", required=required, metavar="HOST:PORT", help="the aggregator's address")
    if round_id:
        p.add_argument("--round", required=required, metavar="ID", help="round id (letters, digits, '.', '_', '-')")
    t = p.add_argument_group("TLS", "Default: the SECAGG_TLS_CA, SECAGG_TLS_CERT and SECAGG_TLS_KEY variables, "
                                    "else no TLS.")
    t.add_argument("--tls-ca", metavar="CA_CRT", help="the CA that issued the aggregator's certificate")
    t.add_argument("--tls-cert", metavar="CRT", help="this client's certificate (its name is the client id)")
    t.add_argument("--tls-key", metavar="KEY", help="this client's private key")


def _torch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--torch-model", metavar="MODULE:CLASS",
                   help="for a PyTorch state dict: its nn.Module, package.module:Class or path/file.py:Class")
    p.add_argument("--torch-kwargs", metavar="JSON", help="constructor arguments of --torch-model, a JSON object")


def _client_tls(args: argparse.Namespace) -> ClientTLS | None:
    """TLS settings from --tls-ca/--tls-cert/--tls-key; None (the SECAGG_TLS_* variables apply) without them."""
    if args.tls_ca is None and args.tls_cert is None and args.tls_key is None:
        return None
    if args.tls_ca is None:
        raise SecAggError("--tls-cert and --tls-key need --tls-ca, the CA that issued the aggregator's certificate")
    from secagg.transport.tls import ClientTLS

    return ClientTLS(args.tls_ca, args.tls_cert, args.tls_key)


def _server_tls(args: ServeSettings) -> ServerTLS | None:
    """The aggregator's TLS settings from --tls-cert/--tls-key/--tls-ca; None without them."""
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_ca is not None:
            raise SecAggError("--tls-ca needs --tls-cert and --tls-key, the aggregator's own certificate and key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise SecAggError("--tls-cert and --tls-key go together: give both")
    from secagg.transport.tls import ServerTLS

    return ServerTLS(args.tls_cert, args.tls_key, args.tls_ca)


def _serve(args: argparse.Namespace) -> None:
    """``secagg serve``: settings from flags, SECAGG_* variables and --config, then serve until SIGTERM or ^C."""
    import os

    import secagg
    from secagg import config, logs

    settings = config.resolve(vars(args), os.environ)
    logs.configure(settings.log_format, settings.log_level)
    tune_malloc()
    server = secagg.serve(settings.key, settings.listen, settings.state_dir, min_cohort=settings.min_cohort,
                          max_params=settings.max_params,
                          epsilon_budget=settings.epsilon_budget, delta=settings.delta, tls=_server_tls(settings),
                          insecure=settings.insecure, metrics_port=settings.metrics_port,
                          metrics_host=settings.metrics_host, health_listen=settings.health_listen,
                          allow_non_dp_rounds=settings.allow_non_dp_rounds,
                          limits=Limits(settings.max_uploads, settings.max_waits, settings.max_calls_per_client,
                                        settings.upload_idle_timeout), ingest_workers=settings.ingest_workers)
    log = logging.getLogger("secagg.cli")  # only once serving: a failed start prints its one error line alone
    log.info("settings from %s", ", ".join(f"{name}: {source}" for name, source in settings.sources.items()
                                            if source != "default"))
    _announce(server, settings.log_format, log)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(settings.shutdown_grace))
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop(settings.shutdown_grace)


def _announce(server: Server, log_format: str, log: logging.Logger) -> None:
    """The line scripts wait for: ``secagg: serving on ADDRESS`` (in JSON logs, an object with ``address``)."""
    if log_format == "json":  # every line of stderr stays one JSON object
        log.info("secagg: serving on %s", server.address, extra={"address": server.address})
    else:
        print(f"secagg: serving on {server.address}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    import secagg  # deferred so that --help is fast

    if args.command == "keygen":
        paths = secagg.keygen(args.out)
        key = secagg.load_server_key(paths.server)
        print(json.dumps({"client_key": str(paths.client), "server_key": str(paths.server), "key_id": key.key_id}))
    elif args.command == "certs":
        from secagg import certs

        if args.certs_command == "init":
            written = certs.init_ca(args.dir)
        else:
            written = certs.issue(args.dir, args.name, admin=args.admin, server=args.server, hosts=args.host)
        print(json.dumps({"cert": str(written.cert), "key": str(written.key)}))
    elif args.command == "serve":
        _serve(args)
    elif args.command == "round" and args.round_command == "create":
        dp = _dp_config(args, args.min_clients or args.clients, "distributed")
        enroll = [c.strip() for c in args.enroll.split(",") if c.strip()] if args.enroll else []
        status = secagg.create_round(args.server, args.round, args.template, args.clients, args.min_clients,
                                     args.deadline, args.max_weight, args.value_bound, dp=dp, enroll=enroll,
                                     masking=_masking(args), tls=_client_tls(args), retry_for=args.retry_for)
        print(json.dumps(status.to_json_dict()))
    elif args.command == "round" and args.round_command == "cancel":
        s = secagg.cancel_round(args.server, args.round, args.reason, tls=_client_tls(args), retry_for=args.retry_for)
        print(json.dumps(s.to_json_dict()))
    elif args.command == "round" and args.round_command == "list":
        rounds = secagg.list_rounds(args.server, tls=_client_tls(args), retry_for=args.retry_for)
        print(json.dumps({"rounds": [r.to_json_dict() for r in rounds]}))
    elif args.command == "round":
        s = secagg.round_status(args.server, args.round, tls=_client_tls(args), retry_for=args.retry_for)
        print(json.dumps(s.to_json_dict()))
    elif args.command == "submit":
        r = secagg.submit(args.server, args.round, args.key, args.client_id, args.model, args.weight,
                          progress=_Progress(args.quiet), retry_for=args.retry_for, dp_reference=args.dp_reference,
                          local_dp=_dp_config(args, None, "local"), policy=_site_policy(args), tls=_client_tls(args),
                          min_cohort=args.min_cohort)
        if r.precision > 1e-6 and not args.quiet:
            print(f"secagg: note: with --weight {args.weight:g} this round releases averages precise to about "
                  f"{r.precision:.2g} (its --max-weight is far above the weights); create rounds with --max-weight "
                  "close to the real weights for more", file=sys.stderr)
        print(json.dumps({"round": r.round_id, "client_id": r.client_id, "submitted": r.submitted,
                          "already_accepted": r.already_accepted, "num_params": r.num_params,
                          "wire_bytes": r.wire_bytes, "bytes_per_param": round(r.wire_bytes / r.num_params, 3),
                          "dp": r.dp.to_dict() if r.dp else None, "masked": r.masked,
                          "mask_seconds": round(r.mask_seconds, 3)}))
    elif args.command == "simulate":
        from secagg.merge.simulate import simulate

        _check_rounds(args)
        dp = None
        if any(getattr(args, k) is not None for k in ("clip_norm", "noise_multiplier", "target_epsilon", "dp_mode")):
            from secagg.merge.simulate import dp_exchanges

            releases = dp_exchanges(args.method, args.finetune_rounds, args.init_warmup)
            dp = _dp_config(args, len(args.site), "distributed", rounds=releases)
        progress = _StepProgress(args.quiet)
        result = simulate(args.method, [tuple(s) for s in args.site], args.out, args.finetune_rounds,
                          args.finetune_epochs, args.seed, init_epochs=args.init_epochs, init_warmup=args.init_warmup,
                          dp=dp, torch_module=args.torch_model, torch_kwargs=args.torch_kwargs, progress=progress,
                          masking=args.masking, same_architecture=args.same_architecture,
                          stats_clip=args.stats_clip)
        progress.done(f"wrote {result.out}")
        _print_scores(result.chosen, args.quiet)
        print(json.dumps({"method": args.method, "out": str(result.out), "chosen": result.chosen,
                          "steps": [{"name": s.name, "seconds": round(s.seconds, 3), "wire_bytes": s.wire_bytes}
                                    for s in result.steps],
                          "dp": dp.to_dict() if dp else None, "epsilon": result.epsilon,
                          "row_epsilon": result.row_epsilon}))
    elif args.command == "merge":
        from secagg.merge.remote import run_site
        from secagg.merge.simulate import load_site, write_result

        from secagg.merge.methods import check_method

        _check_rounds(args)
        check_method(args.method, args.finetune_rounds)
        policy = _site_policy(args)
        progress = _StepProgress(args.quiet)
        progress("load", f"{args.model}, checked against its framework on {args.data}")
        site = load_site(args.client_id, args.model, args.data, torch_module=args.torch_model,
                         torch_kwargs=args.torch_kwargs, report=progress)
        model, info = run_site(args.server, args.round, secagg.load_client_key(args.key), args.client_id, site,
                               args.method, args.clients, args.finetune_rounds,
                               args.finetune_epochs, args.wait, args.max_weight, args.init_epochs, args.init_warmup,
                               tls=_client_tls(args), progress=progress, policy=policy, min_cohort=args.min_cohort,
                               masking=args.masking, same_architecture=args.same_architecture)
        _, _, written = write_result(args.method, model, site, args.model, args.out)
        progress.done(f"wrote {written}")
        _print_scores(info, args.quiet)
        print(json.dumps({"method": args.method, "out": str(written), "chosen": info}))
    elif args.command == "scaler":
        _scaler(args)
    elif args.command == "diagnose":
        from secagg.merge.diagnose import diagnose

        print(json.dumps(diagnose(args.model, args.data, args.scaler, column=args.column,
                                  torch_module=args.torch_model, torch_kwargs=args.torch_kwargs).to_json_dict()))
    elif args.command == "predict":
        from secagg.predict import forecast

        result = forecast(args.model, args.data, args.scaler, column=args.column, horizon=args.horizon,
                          window=args.window, torch_module=args.torch_model, torch_kwargs=args.torch_kwargs,
                          adapt=args.adapt, adapt_fit=args.adapt_fit, adapted_out=args.adapted_out)
        result.save(args.out)
        print(json.dumps({"out": args.out, "model": args.model, **result.summary()}))
    elif args.command == "fetch":
        out = secagg.fetch(args.server, args.round, args.key, args.template, args.out, args.wait,
                           progress=_Progress(args.quiet), retry_for=args.retry_for, min_cohort=args.min_cohort,
                           tls=_client_tls(args))
        print(json.dumps({"round": args.round, "out": str(out)}))
    return 0


def _scaler(args: argparse.Namespace) -> None:
    """``secagg scaler``: this site's own scaler (--local) or one shared by all sites (a scaling round)."""
    import secagg
    from secagg.scaler import Scaler, load_values

    shared_options = {"--server": args.server, "--round": args.round, "--key": args.key,
                      "--client-id": args.client_id, "--clients": args.clients}
    if args.feature_range is not None and args.kind != "minmax":
        raise SecAggError("--feature-range applies to --kind minmax only; drop it or add --kind minmax")
    if args.local:
        given = [k for k, v in shared_options.items() if v is not None]
        if given:
            raise SecAggError(f"--local fits this site's own scaler without an aggregator; drop {', '.join(given)}")
        scaler = Scaler.fit(load_values(args.data), args.kind, args.log1p, tuple(args.feature_range or (0.0, 1.0)))
    else:
        from secagg.merge.remote import run_protocol
        from secagg.merge.scaling import SHARED_MINMAX_REFUSED, shared_scaler

        if args.kind == "minmax":
            raise SecAggError(SHARED_MINMAX_REFUSED)
        missing = [k for k, v in shared_options.items() if v is None]
        if missing:
            raise SecAggError(f"a shared scaler needs {', '.join(missing)}; or fit this site's own with --local")
        scaler = run_protocol(args.server, args.round, secagg.load_client_key(args.key), args.client_id,
                              shared_scaler(load_values(args.data), args.log1p, args.value_bound), args.clients,
                              wait=args.wait, max_weight=args.max_weight, tls=_client_tls(args))
    scaler.save(args.out)
    print(json.dumps({"out": args.out, "shared": not args.local, "site_rows": scaler.rows, **scaler.to_json_dict()}))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except SecAggError as exc:
        print(f"secagg: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"secagg: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("secagg: error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
