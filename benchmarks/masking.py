"""Masked rounds (secagg.masking) side by side with unmasked rounds, in one run, through the aggregator's core.

Run from the repository root (``make bench-masking``)::

    .venv/bin/python benchmarks/masking.py                    # 1M parameters, 10 and 100 clients
    .venv/bin/python benchmarks/masking.py --quick            # 100k parameters, 5 and 12 clients

Each client's update is encrypted once (real TenSEAL, the federation's key) and the same ciphertexts
go into an unmasked and a masked round of the real ``secagg.rounds.Aggregator`` (stage machine,
relay, unmasking, state files; no gRPC, which both kinds of round share). Every site is a real
``MaskingSite`` with its own certificate from a throwaway CA. It measures per client: masking time
(median), bytes it posts and receives in the masking stages; for the aggregator: unmasking time
with 0 dropouts and with 1 and 2 sites dropped after sharing (the difference per dropped site);
the wall time of the round from first message to the closed sum (without encryption, which both
kinds share), played with every site in this one process one after the other, split into the time
inside the aggregator and each site's own stage work (which real sites do in parallel); and the
error of the decrypted average in both rounds. Prints a table, writes JSON
(default ``benchmarks/results/masking.json``). Nothing is asserted about time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import secagg  # noqa: E402
from secagg import certs  # noqa: E402
from secagg.masking.settings import MaskSettings  # noqa: E402
from secagg.masking.site import MaskingSite  # noqa: E402
from secagg.masking.statements import Advertisement, SurvivorsSignature  # noqa: E402
from secagg.packing import ModelSpec  # noqa: E402
from secagg.rounds import Aggregator, RoundConfig  # noqa: E402
from secagg.updates import encrypt_update, open_aggregate, seal_ciphertexts  # noqa: E402

DEFAULT_OUT = HERE / "results" / "masking.json"
GOALS = {"upload_B_per_param": 8.1, "mask_s_per_M_at_k8": 0.5}
DEGREE = 8  # the goal's neighbour count (for cohorts of 9 or fewer every other site is a neighbour)


class Federation:
    def __init__(self, root: Path, n: int) -> None:
        paths = secagg.keygen(root / "keys")
        self.client_key = secagg.load_client_key(paths.client)
        self.server_key = secagg.load_server_key(paths.server)
        ca = certs.init_ca(root / "ca")
        self.ca_pem = ca.cert.read_bytes()
        self.names = [f"site{i:03d}" for i in range(n)]
        self.certs = {name: certs.issue(root / "ca", name) for name in self.names}
        self.tls = {name: secagg.ClientTLS(ca.cert, self.certs[name].cert, self.certs[name].key) for name in self.names}
        self.root = root


def make_round(fed: Federation, agg: Aggregator, round_id: str, spec: ModelSpec, masking: MaskSettings | None,
               n: int):
    cfg = RoundConfig(round_id, spec, n, max(3, n - 2) if masking else n, None, max_weight=1.0, masking=masking and
                      masking.to_dict())
    return agg.create_round(cfg)


def run_unmasked(fed, agg, spec, cts, round_id):
    status = make_round(fed, agg, round_id, spec, None, len(cts))
    t0 = time.perf_counter()
    inside = 0.0
    for name, c in zip(fed.names, cts):
        sealed = seal_ciphertexts(fed.client_key, status, name, c, fed.tls[name])
        t = time.perf_counter()
        agg.submit(sealed.header, iter(sealed.chunks))
        inside += time.perf_counter() - t
    return time.perf_counter() - t0, inside, status


def run_masked(fed, agg, spec, cts, round_id, degree, dropped: int = 0):
    """Every stage in order with the first ``len(cts)`` sites; the last ``dropped`` of them leave after
    sharing. Returns timings and byte counts."""
    n = len(cts)
    names = fed.names[:n]
    settings = MaskSettings(degree=degree if n - 1 > degree else 0, stage_seconds=3600)
    status = make_round(fed, agg, round_id, spec, settings, n)
    q = fed.server_key.parameters.data_prime
    sites = {name: MaskingSite(status.terms(), name, settings, q, fed.ca_pem, fed.certs[name].cert.read_bytes(),
                               fed.certs[name].key.read_bytes(), min_clients=status.min_clients)
             for name in names}
    sent = dict.fromkeys(names, 0)
    got = dict.fromkeys(names, 0)
    agg_time = [0.0]  # seconds inside the aggregator's calls (the rest is the sites' own work)

    def timed(call, *a):
        t = time.perf_counter()
        out = call(*a)
        agg_time[0] += time.perf_counter() - t
        return out

    def post(name, stage, payload):
        sent[name] += len(json.dumps(payload))
        timed(agg.mask_stage, round_id, name, stage, payload)

    def view(name, stage):
        ready, v, _ = timed(agg.mask_stage, round_id, name, stage)
        assert ready, (stage, name)
        got[name] += len(json.dumps(v))
        return v

    unmask_seconds = []
    real_unmask = agg._unmask

    def timed_unmask(rnd):
        t = time.perf_counter()
        real_unmask(rnd)
        unmask_seconds.append(time.perf_counter() - t)

    agg._unmask = timed_unmask
    t0 = time.perf_counter()
    for name in names:
        post(name, "advertise", sites[name].advertise().to_dict())
    for name in names:
        sites[name].join([Advertisement.from_dict(a) for a in view(name, "advertise")["adverts"]])
        post(name, "share", {"boxes": {k: v.hex() for k, v in sites[name].shares().items()}})
    staying = names[:n - dropped]
    mask_times = []
    for name, c in zip(staying, cts):
        sites[name].receive({k: bytes.fromhex(v) for k, v in view(name, "share")["boxes"].items()})
        tm = time.perf_counter()
        masked = [(sites[name].mask(i, c0), seed) for i, (c0, seed) in enumerate(c)]
        mask_times.append(time.perf_counter() - tm)
        sealed = seal_ciphertexts(fed.client_key, status, name, masked, fed.tls[name])
        timed(agg.submit, sealed.header, iter(sealed.chunks))
    if dropped:  # the dropped sites' stage ends at its timeout: move the clock past it
        agg.clock = lambda: time.time() + 7200
        timed(agg.tick)
    survivors = view(staying[0], "submit")["survivors"]
    got[staying[0]] -= len(json.dumps({"survivors": survivors}))  # counted again below for every site
    for name in staying:
        view(name, "submit")
        post(name, "confirm", sites[name].sign_survivors(survivors).to_dict())
    for name in staying:
        sigs = [SurvivorsSignature.from_dict(s) for s in view(name, "confirm")["signatures"]]
        post(name, "unmask", sites[name].reveal(survivors, sigs))
    wall = time.perf_counter() - t0
    agg.clock = time.time
    agg._unmask = real_unmask
    return {"wall": wall, "aggregator": agg_time[0], "sites": (wall - agg_time[0]) / n, "mask": mask_times, "unmask": unmask_seconds[0] if unmask_seconds else float("nan"),
            "sent": statistics.median(sent[s] for s in staying), "received": statistics.median(got[s] for s in staying),
            "neighbours": len(sites[fed.names[0]].neighbours), "threshold": settings.threshold_for(n),
            "status": status, "survivors": survivors}


def error(fed, agg, round_id, status, spec, thetas):
    agg_ = agg.aggregate(round_id)
    flat_pairs = [(c0, s) for c in agg_.chunks() for c0, s in zip(c.c0s, c.seeds)]
    avg = open_aggregate(fed.client_key, agg.status(round_id), spec, list(agg_.records), flat_pairs, min_cohort=3)
    want = np.mean(thetas, axis=0)
    return float(np.max(np.abs(avg.vector - want)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=1e6)
    ap.add_argument("--clients", default="10,100")
    ap.add_argument("--quick", action="store_true", help="100k parameters, 5 and 12 clients")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    if args.quick:
        args.params, args.clients = 1e5, "5,12"
    n_params = int(args.params)
    results = {"machine": platform.platform(), "params": n_params, "degree_goal": DEGREE, "goals": GOALS, "runs": []}
    spec = ModelSpec.of({"w": np.zeros(n_params, dtype=np.float32)})
    rng = np.random.default_rng(1)
    for n in (int(x) for x in args.clients.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            fed = Federation(Path(tmp), n)
            thetas = [rng.normal(0, 0.05, n_params) for _ in range(n)]
            # The check slots' signs depend on the round id: every round below is "r", each on its own
            # aggregator, so that the same ciphertexts serve all of them.
            def fresh(tag):
                return Aggregator(fed.server_key, Path(tmp) / tag, ca_pem=fed.ca_pem)

            probe = make_round(fed, fresh("probe"), "r", spec, None, n)
            t = time.perf_counter()
            cts = [encrypt_update(fed.client_key, probe, th, 1.0) for th in thetas]
            encrypt = (time.perf_counter() - t) / n
            agg = fresh("plain")
            plain_wall, plain_agg, plain_status = run_unmasked(fed, agg, spec, cts, "r")
            plain_err = error(fed, agg, "r", plain_status, spec, thetas)
            agg = fresh("masked")
            m = run_masked(fed, agg, spec, cts, "r", DEGREE)
            masked_err = error(fed, agg, "r", m["status"], spec, thetas)
            # Unmasking cost of dropped sites: the same n - 2 survivors with and without 2 sites that shared
            # their keys and then dropped (medians of 3 rounds each).
            d = 2
            with_drops = statistics.median(run_masked(fed, fresh(f"drop{i}"), spec, cts, "r", DEGREE, dropped=d)["unmask"]
                                           for i in range(3))
            without = statistics.median(run_masked(fed, fresh(f"nodrop{i}"), spec, cts[:n - d], "r", DEGREE)["unmask"]
                                        for i in range(3))
            wire = seal_ciphertexts(fed.client_key, plain_status, fed.names[0], cts[0], fed.tls[fed.names[0]]).wire_bytes
            per_m = 1e6 / n_params
            row = {
                "clients": n, "neighbours": m["neighbours"], "threshold": m["threshold"],
                "encrypt_s": encrypt,
                "mask_s_median": statistics.median(m["mask"]), "mask_s_per_M": statistics.median(m["mask"]) * per_m,
                "unmask_s_no_dropout": m["unmask"],
                "unmask_s_survivors_only": without, "unmask_s_with_2_dropped": with_drops,
                "unmask_s_per_dropped": (with_drops - without) / d,
                "stage_bytes_sent": m["sent"], "stage_bytes_received": m["received"],
                "upload_B_per_param": (wire + m["sent"]) / n_params, "upload_B_per_param_unmasked": wire / n_params,
                "round_wall_s_masked": m["wall"], "round_wall_s_unmasked": plain_wall,
                "aggregator_s_masked": m["aggregator"], "aggregator_s_unmasked": plain_agg,
                "site_stage_s_masked": m["sites"],
                "error_masked": masked_err, "error_unmasked": plain_err,
            }
            results["runs"].append(row)
            print(f"{n:4d} clients, {m['neighbours']} neighbours, t={m['threshold']}: "
                  f"mask {row['mask_s_median']:.3f} s/client ({row['mask_s_per_M']:.3f} s per 1M), "
                  f"unmask {row['unmask_s_no_dropout']:.2f} s + {row['unmask_s_per_dropped']:.3f} s per dropped site, "
                  f"stage bytes {row['stage_bytes_sent']:.0f} sent / {row['stage_bytes_received']:.0f} received, "
                  f"upload {row['upload_B_per_param']:.4f} B/param (unmasked {row['upload_B_per_param_unmasked']:.4f}), "
                  f"round {row['round_wall_s_masked']:.2f} s masked vs {row['round_wall_s_unmasked']:.2f} s unmasked "
                  f"(aggregator {row['aggregator_s_masked']:.2f} vs {row['aggregator_s_unmasked']:.2f} s, each site's "
                  f"stage work {row['site_stage_s_masked']:.2f} s), "
                  f"error {masked_err:.2g} vs {plain_err:.2g}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
