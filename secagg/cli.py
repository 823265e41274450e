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

from secagg.errors import SecAggError

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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="secagg", description="Encrypted aggregation of model weights (CKKS over gRPC).",
                                epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    k = sub.add_parser("keygen", help="create a federation key pair", epilog=EPILOG,
                       description="Write KEYDIR/client.key (secret, mode 0600, for clients only) and "
                                   "KEYDIR/server.key (for the aggregator: cannot decrypt).")
    k.add_argument("--out", required=True, metavar="KEYDIR", help="directory for the two key files")

    s = sub.add_parser("serve", help="run the aggregator", epilog=EPILOG,
                       description="Run the aggregator. It holds no secret key and only adds ciphertexts. State is "
                                   "durable: after a crash, restart on the same --state-dir and nothing accepted is lost.")
    s.add_argument("--key", required=True, help="the federation's server.key")
    s.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to bind (port 0 picks a free port)")
    s.add_argument("--state-dir", required=True, metavar="DIR", help="directory for rounds and accepted updates")

    r = sub.add_parser("round", help="create a round or show its status", epilog=EPILOG)
    rsub = r.add_subparsers(dest="round_command", required=True, metavar="ACTION")
    rc = rsub.add_parser("create", help="create a round for a model architecture", epilog=EPILOG,
                         description="Create a round. Only the template's tensor names, shapes and dtypes are sent.")
    _server_round(rc)
    rc.add_argument("--clients", required=True, type=int, metavar="N", help="number of expected clients")
    rc.add_argument("--min-clients", type=int, metavar="K",
                    help="quorum: the round closes at the deadline if at least K submitted (default: N)")
    rc.add_argument("--deadline", type=float, metavar="SECONDS", help="seconds from now until the round closes or fails")
    rc.add_argument("--template", required=True, metavar="MODEL", help="a model of the round's architecture")
    rc.add_argument("--max-weight", type=float, metavar="W",
                    help="largest --weight a client may use (default 1e5); closer to the real weights is more precise")
    rc.add_argument("--value-bound", type=float, metavar="B",
                    help="largest |parameter| a client may submit (default 100); keeps the encrypted sum from overflowing")
    rs = rsub.add_parser("status", help="print a round's status as JSON", epilog=EPILOG)
    _server_round(rs)

    sm = sub.add_parser("submit", help="encrypt a model and submit it to a round", epilog=EPILOG,
                        description="Encrypt MODEL under the federation key and submit it. The weight travels encrypted.")
    _server_round(sm)
    sm.add_argument("--key", required=True, help="the federation's client.key")
    sm.add_argument("--client-id", required=True, metavar="NAME", help="this site's name (once per round)")
    sm.add_argument("--model", required=True, help="model file: .keras, .h5, .pt, .pth or .npz")
    sm.add_argument("--weight", type=float, default=1.0, metavar="W",
                    help="this site's weight, e.g. its number of training samples (default 1)")
    sm.add_argument("--quiet", action="store_true", help="no progress output")

    f = sub.add_parser("fetch", help="fetch and decrypt a round's weighted average as a model file", epilog=EPILOG)
    _server_round(f)
    f.add_argument("--key", required=True, help="the federation's client.key")
    f.add_argument("--template", required=True, metavar="MODEL", help="a model of the round's architecture")
    f.add_argument("--out", required=True, help="where to write the global model (same format as the template)")
    f.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait up to this long for the round to close")
    f.add_argument("--quiet", action="store_true", help="no progress output")

    sim = sub.add_parser("simulate", help="merge several sites' models through a real loopback aggregator",
                         epilog=EPILOG, description="Run a merge method on every site's model and data, with real "
                         "encryption and a real aggregator on 127.0.0.1. Methods: mean, align, regmean, readout, "
                         "linear, init, auto, or a '+'-joined pipeline such as align+regmean+readout.")
    sim.add_argument("--method", required=True, help="merge method (auto is the recommended choice)")
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

    mg = sub.add_parser("merge", help="take part in a merge as one site of a real federation", epilog=EPILOG,
                        description="Run a merge method as this site: every site runs this command with its own "
                        "model and data; each step is an encrypted round <round>.<k>.<step> on the aggregator.")
    _server_round(mg)
    mg.add_argument("--key", required=True, help="the federation's client.key")
    mg.add_argument("--client-id", required=True, metavar="NAME", help="this site's name")
    mg.add_argument("--model", required=True, help="this site's model (.keras, .h5, .pt, .pth)")
    mg.add_argument("--data", required=True, help="this site's DATA.npz (x, y in the model's normalized space)")
    mg.add_argument("--method", required=True, help="merge method, the same at every site")
    mg.add_argument("--clients", required=True, type=int, metavar="N", help="number of sites taking part")
    mg.add_argument("--finetune-rounds", type=int, default=0, metavar="K", help="encrypted FedAvg rounds afterwards")
    mg.add_argument("--finetune-epochs", type=int, default=1, metavar="E", help="local epochs per fine-tune round")
    mg.add_argument("--init-epochs", type=int, default=INIT_EPOCHS, metavar="E",
                     help=f"method init: local epochs after the common start (default {INIT_EPOCHS})")
    mg.add_argument("--init-warmup", type=int, default=INIT_WARMUP_ROUNDS, metavar="R",
                     help=f"method init: FedAvg rounds of one epoch before local training (default {INIT_WARMUP_ROUNDS})")
    mg.add_argument("--wait", type=float, default=3600.0, metavar="SECONDS", help="how long to wait for each step")
    mg.add_argument("--max-weight", type=float, default=1e5, metavar="W",
                    help="the same at every site: at least the largest site's training rows (default 1e5)")
    mg.add_argument("--out", required=True, metavar="GLOBAL_MODEL", help="where to write the global model")

    sc = sub.add_parser("scaler", help="compute a scaler shared by all sites from encrypted sums", epilog=EPILOG,
                        description="Every site runs this with its own raw data; all get the same per-feature mean "
                        "and standard deviation (of log1p(values) with --log1p), and no site reveals its statistics.")
    _server_round(sc)
    sc.add_argument("--key", required=True, help="the federation's client.key")
    sc.add_argument("--client-id", required=True, metavar="NAME", help="this site's name")
    sc.add_argument("--data", required=True, help="npz with array 'values' (rows, features) of raw values")
    sc.add_argument("--clients", required=True, type=int, metavar="N", help="number of sites taking part")
    sc.add_argument("--log1p", action="store_true", help="scale log1p(values) (counts)")
    sc.add_argument("--value-bound", type=float, default=1e3, metavar="B",
                    help="bound on |f(value)|^2, the same at every site (default 1e3)")
    sc.add_argument("--wait", type=float, default=3600.0, metavar="SECONDS", help="how long to wait for the others")
    sc.add_argument("--max-weight", type=float, default=1e5, metavar="W",
                    help="the same at every site: at least the largest site's row count (default 1e5)")
    sc.add_argument("--out", required=True, metavar="SCALER_JSON", help="where to write the shared scaler")

    dg = sub.add_parser("diagnose", help="say why a merged model gives nonsense on a site's data", epilog=EPILOG)
    dg.add_argument("--model", required=True, help="the merged (global) model")
    dg.add_argument("--data", required=True, help="the site's DATA.npz (x, y normalized; optional y_raw)")
    dg.add_argument("--scaler", help="JSON scaler used to de-normalize (mean, std, log1p); needs y_raw in DATA")
    return p


def _check_rounds(args: argparse.Namespace) -> None:
    """Counts of rounds and epochs of simulate/merge, before any work starts."""
    if args.finetune_rounds < 0 or args.finetune_epochs < 1:
        raise SecAggError("--finetune-rounds must be >= 0 and --finetune-epochs >= 1")
    if args.init_epochs < 1 or args.init_warmup < 0:
        raise SecAggError("--init-epochs must be >= 1 and --init-warmup >= 0")


def _server_round(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the aggregator's address")
    p.add_argument("--round", required=True, metavar="ID", help="round id (letters, digits, '.', '_', '-')")


def _run(args: argparse.Namespace) -> int:
    import secagg  # deferred so that --help is fast

    if args.command == "keygen":
        paths = secagg.keygen(args.out)
        key = secagg.load_server_key(paths.server)
        print(json.dumps({"client_key": str(paths.client), "server_key": str(paths.server), "key_id": key.key_id}))
    elif args.command == "serve":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        server = secagg.serve(args.key, args.listen, args.state_dir)
        print(f"secagg: serving on {server.address}", file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, lambda *_: server.stop())
        try:
            server.wait()
        except KeyboardInterrupt:
            server.stop()
    elif args.command == "round" and args.round_command == "create":
        status = secagg.create_round(args.server, args.round, args.template, args.clients, args.min_clients,
                                     args.deadline, args.max_weight, args.value_bound)
        print(json.dumps(status.to_json_dict()))
    elif args.command == "round":
        s = secagg.round_status(args.server, args.round)
        print(json.dumps(s.to_json_dict()))
    elif args.command == "submit":
        r = secagg.submit(args.server, args.round, args.key, args.client_id, args.model, args.weight,
                          progress=_Progress(args.quiet))
        print(json.dumps({"round": r.round_id, "client_id": r.client_id, "submitted": r.submitted,
                          "already_accepted": r.already_accepted, "num_params": r.num_params,
                          "wire_bytes": r.wire_bytes, "bytes_per_param": round(r.wire_bytes / r.num_params, 3)}))
    elif args.command == "simulate":
        from secagg.merge.simulate import simulate

        _check_rounds(args)
        result = simulate(args.method, [tuple(s) for s in args.site], args.out, args.finetune_rounds,
                          args.finetune_epochs, args.seed, init_epochs=args.init_epochs, init_warmup=args.init_warmup)
        print(json.dumps({"method": args.method, "out": str(result.out), "chosen": result.chosen,
                          "steps": [{"name": s.name, "seconds": round(s.seconds, 3), "wire_bytes": s.wire_bytes}
                                    for s in result.steps]}))
    elif args.command == "merge":
        from secagg.merge.remote import run_site
        from secagg.merge.simulate import load_site, write_result

        _check_rounds(args)
        site = load_site(args.client_id, args.model, args.data)
        model, info = run_site(args.server, args.round, secagg.load_client_key(args.key), args.client_id, site,
                               args.method, args.clients, args.finetune_rounds,
                               args.finetune_epochs, args.wait, args.max_weight, args.init_epochs, args.init_warmup)
        _, _, written = write_result(args.method, model, site, args.model, args.out)
        print(json.dumps({"method": args.method, "out": str(written), "chosen": info}))
    elif args.command == "scaler":
        import numpy as np

        from secagg.merge.remote import run_protocol
        from secagg.merge.scaling import shared_scaler

        with np.load(args.data, allow_pickle=False) as d:
            if "values" not in d:
                raise SecAggError(f"{args.data}: needs an array 'values' (rows, features) of raw values")
            values = d["values"]
        scaler = run_protocol(args.server, args.round, secagg.load_client_key(args.key), args.client_id,
                              shared_scaler(values, args.log1p, args.value_bound), args.clients, wait=args.wait,
                              max_weight=args.max_weight)
        scaler.save(args.out)
        print(json.dumps({"out": args.out, "mean": scaler.mean.tolist(), "std": scaler.std.tolist(), "site_rows": scaler.site_rows}))
    elif args.command == "diagnose":
        from secagg.merge.diagnose import diagnose

        print(json.dumps(diagnose(args.model, args.data, args.scaler).to_json_dict()))
    elif args.command == "fetch":
        out = secagg.fetch(args.server, args.round, args.key, args.template, args.out, args.wait,
                           progress=_Progress(args.quiet))
        print(json.dumps({"round": args.round, "out": str(out)}))
    return 0


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
