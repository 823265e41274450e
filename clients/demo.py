"""End-to-end secagg demo: independent sites, one encrypted aggregation round, honest evaluation.

1. Pick training sensors and held-out sensors (deterministic, among the clean ones).
2. Each training site trains its own LSTM from its own random initialization and saves a .keras.
3. One encrypted round through a real aggregator on 127.0.0.1 (ephemeral port): keygen, serve,
   create round, encrypt+submit per site (weight = training sample count), fetch+decrypt the
   weighted average into a .keras file.
4. Compare with the plaintext float64 weighted average (max abs difference).
5. NRMSE table on the held-out sensors (each in its own normalized space): the encrypted weight
   average, the plaintext weight average, the output ensemble of the local models, a single local
   model transferred, persistence and same-hour-yesterday; and the local models on their own
   sensors as the reference.

Averaging the weights of independently initialized and trained networks is expected to give a
poor model (hidden units are not aligned across sites); the demo reports that as it is.

    python clients/demo.py [--quick] [--report demo-report.json]
"""

from __future__ import annotations

import time

_T_PROCESS = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

import forecast  # noqa: E402

#: Report rows, in table order: key -> label.
ROWS: dict[str, str] = {
    "local_own": "local model, own sensor (reference)",
    "encrypted_average": "encrypted weight average (user's recipe)",
    "encrypted_auto": "encrypted auto merge (secagg)",
    "plaintext_average": "plaintext weight average",
    "output_ensemble": "output ensemble (mean of local preds)",
    "local_transferred": "single local model (mean over models)",
    "persistence": "persistence (last value)",
    "same_hour_yesterday": "same hour yesterday",
}


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo run."""

    n_train: int = 8
    n_heldout: int = 4
    epochs: int = 5
    max_train: int | None = None
    max_test: int | None = None
    window: int = forecast.WINDOW
    horizon: int = forecast.HORIZON
    seed: int = 0


# Three training sensors: the aggregator releases no sum of fewer than 3 contributions.
QUICK = DemoConfig(n_train=3, n_heldout=1, epochs=1, max_train=512, max_test=256)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny run for tests (3+1 sensors, 1 epoch)")
    p.add_argument("--report", type=Path, default=Path("demo-report.json"), help="JSON report path")
    p.add_argument("--n-train", type=int, help="training sensors (default 8)")
    p.add_argument("--n-heldout", type=int, help="held-out sensors (default 4)")
    p.add_argument("--epochs", type=int, help="epochs per site (default 5)")
    p.add_argument("--window", type=int, help="input hours (default 24)")
    p.add_argument("--horizon", type=int, help="hours ahead (default 1)")
    p.add_argument("--seed", type=int, help="sensor choice and base of per-site seeds (default 0)")
    p.add_argument("--workdir", type=Path, help="keep keys/models here instead of a temp dir")
    p.add_argument("--plot", type=Path, default=Path("demo-forecast.png"), help="forecast plot (PNG) path")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> DemoConfig:
    """The quick or full config, with any explicit overrides applied."""
    base = QUICK if args.quick else DemoConfig()
    over = {k: getattr(args, k) for k in ("n_train", "n_heldout", "epochs", "window", "horizon",
                                         "seed") if getattr(args, k) is not None}
    return DemoConfig(**{**base.__dict__, **over})


class Stopwatch:
    """Named wall-clock stage timings in seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> float:
        """Record the time since the previous lap under ``name``."""
        now = time.perf_counter()
        elapsed = now - self._t
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
        self._t = now
        return elapsed

    def restart(self) -> None:
        """Start the next lap now (time since the previous lap is not recorded)."""
        self._t = time.perf_counter()


# ── stages ──────────────────────────────────────────────────────────────────────────────────


def prepare(cfg: DemoConfig, counts: Any, sensors: list[str], offset: int) -> list[forecast.SiteData]:
    """Scaled, windowed data of each sensor."""
    return [
        forecast.prepare_site(counts, s, window=cfg.window, horizon=cfg.horizon,
                              max_train=cfg.max_train, max_test=cfg.max_test,
                              seed=cfg.seed + offset + i)
        for i, s in enumerate(sensors)
    ]


def site_seed(cfg: DemoConfig, i: int) -> int:
    """Each site's own initialization seed (distinct per site)."""
    return 1000 * cfg.seed + 101 * (i + 1)


def train_sites(cfg: DemoConfig, sites: list[forecast.SiteData], out_dir: Path
                ) -> list[dict[str, Any]]:
    """Train and save each site's model; returns per-site records (model, path, n, seconds)."""
    records = []
    for i, data in enumerate(sites):
        t0 = time.perf_counter()
        model, n = forecast.train_site(data, seed=site_seed(cfg, i), epochs=cfg.epochs)
        path = out_dir / f"site-{i}.keras"
        model.save(path)
        secs = time.perf_counter() - t0
        print(f"  trained site-{i} {data.sensor!r}: {n} windows, {secs:.1f}s", flush=True)
        records.append({"sensor": data.sensor, "client_id": f"site-{i}", "model": model,
                        "path": path, "n_samples": n, "seed": site_seed(cfg, i),
                        "train_seconds": secs})
    return records


def encrypted_round(records: list[dict[str, Any]], work: Path, watch: Stopwatch
                    ) -> tuple[Path, list[dict[str, Any]]]:
    """Run one encrypted aggregation round on a local aggregator; returns (model, receipts)."""
    import secagg

    watch.restart()
    paths = secagg.keygen(work / "keys")
    watch.lap("keygen")
    server = secagg.serve(paths.server, "127.0.0.1:0", work / "state")
    try:
        watch.lap("serve_start")
        round_id = "demo-round-1"
        template = records[0]["path"]
        secagg.create_round(server.address, round_id, template=template, clients=len(records))
        watch.lap("round_create")
        receipts = []
        for rec in records:
            t0 = time.perf_counter()
            r = secagg.submit(server.address, round_id, key=paths.client,
                              client_id=rec["client_id"], model=rec["path"],
                              weight=float(rec["n_samples"]))
            receipts.append({"client_id": rec["client_id"], "wire_bytes": int(r.wire_bytes),
                             "num_params": int(r.num_params),
                             "bytes_per_param": r.wire_bytes / max(r.num_params, 1),
                             "encrypt_seconds": float(r.encrypt_seconds),
                             "send_seconds": float(r.send_seconds),
                             "wall_seconds": time.perf_counter() - t0})
        watch.lap("encrypt_submit_total")
        wait_closed(secagg, server.address, round_id, timeout=120.0)
        watch.lap("aggregate_close")
        out = secagg.fetch(server.address, round_id, key=paths.client, template=template,
                           out=work / "global.keras", wait=60)
        watch.lap("fetch_decrypt")
    finally:
        server.stop()
    return Path(out), receipts


def auto_merge(records: list[dict[str, Any]], train_data: list[forecast.SiteData], work: Path
               ) -> tuple[Path, dict[str, Any]]:
    """The recommended merge: ``secagg simulate --method auto`` through a real loopback aggregator."""
    from secagg.merge.simulate import simulate

    sites = []
    for rec, data in zip(records, train_data):
        npz = forecast.save_site_data(data, work / "data" / f"{rec['client_id']}.npz")
        sites.append((rec["path"], npz))
    result = simulate("auto", sites, out=work / "auto.keras")
    info = {"chosen": result.chosen.get("chosen"), "scores": result.chosen.get("scores"),
            "encrypted_steps": len(result.steps), "wire_bytes": sum(s.wire_bytes for s in result.steps),
            "seconds": sum(s.seconds for s in result.steps)}
    return Path(result.out), info


def descaling(heldout: list[forecast.SiteData], train_data: list[forecast.SiteData], model: Any
              ) -> dict[str, float]:
    """Mean absolute error in people/hour on the held-out sensors: own scaler vs another site's.

    A model that is right in normalized space, de-normalized with another site's statistics,
    gives "trend right, values wrong"; each site must use its own scaler (or a shared one).
    """
    own, wrong = [], []
    for d in heldout:
        x, y = d.test_xy()
        z = forecast.predict(model, x)
        truth = d.scaler.inverse(y)
        other = max(train_data, key=lambda t: abs(t.scaler.mean - d.scaler.mean)).scaler
        own.append(float(np.mean(np.abs(d.scaler.inverse(z) - truth))))
        wrong.append(float(np.mean(np.abs(other.inverse(z) - truth))))
    return {"own_scaler_mae": float(np.mean(own)), "other_site_scaler_mae": float(np.mean(wrong))}


def plot_forecasts(path: Path, d: forecast.SiteData, models: dict[str, Any], other: forecast.SiteScaler,
                   hours: int = 96) -> Path:
    """Truth vs plain average vs auto vs ensemble on a held-out sensor, and the wrong-scaler picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = d.test_xy()
    x, y = x[:hours], y[:hours]
    truth = d.scaler.inverse(y)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    top.plot(truth, color="black", lw=2, label="truth")
    for label, model in models.items():
        pred = model(x) if callable(model) and not hasattr(model, "predict") else forecast.predict(model, x)
        top.plot(d.scaler.inverse(pred), lw=1.3, label=label)
    top.set_ylabel("pedestrians / hour")
    top.set_title(f"held-out sensor {d.sensor!r}: next-hour forecasts (never trained on this sensor)")
    top.legend(loc="upper right", fontsize=8)
    auto = models["encrypted auto merge"]
    z = forecast.predict(auto, x)
    bottom.plot(truth, color="black", lw=2, label="truth")
    bottom.plot(d.scaler.inverse(z), lw=1.3, label="auto, de-scaled with this sensor's own scaler")
    bottom.plot(other.inverse(z), lw=1.3, ls="--", label="auto, de-scaled with another site's scaler")
    bottom.set_ylabel("pedestrians / hour")
    bottom.set_xlabel("hour of the test period")
    bottom.set_title("the same forecast, wrong scaler: trend right, values wrong")
    bottom.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def wait_closed(secagg: Any, address: str, round_id: str, timeout: float) -> None:
    """Poll the round status until it is closed; raise if it failed or timed out."""
    deadline = time.monotonic() + timeout
    while True:
        status = secagg.round_status(address, round_id)
        if status.state == "closed":
            return
        if status.state == "failed":
            raise RuntimeError(f"round {round_id!r} failed: {status}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"round {round_id!r} not closed after {timeout}s: {status}")
        time.sleep(0.05)


def plaintext_average(paths: list[Path], weights: list[float]) -> dict[str, np.ndarray]:
    """Float64 weighted average of the models' weights, by name (via ``secagg.read_model``)."""
    import secagg

    models = [secagg.read_model(p) for p in paths]
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    return {name: sum(wi * np.asarray(m[name], dtype=np.float64) for wi, m in zip(w, models))
            for name in models[0]}


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Largest absolute elementwise difference of two same-named weight sets."""
    if set(a) != set(b):
        raise ValueError(f"weight names differ: {sorted(a)} vs {sorted(b)}")
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - b[k]))) for k in a)


def keras_average(models: list[Any], weights: list[float], seed: int, window: int) -> Any:
    """A Keras model holding the float64 weighted average of the models' weights (as float32)."""
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    per_model = [[np.asarray(v, np.float64) for v in m.get_weights()] for m in models]
    avg = [sum(wi * ws[j] for wi, ws in zip(w, per_model)) for j in range(len(per_model[0]))]
    model = forecast.build_lstm(seed, window=window)
    model.set_weights([a.astype(np.float32) for a in avg])
    return model


def evaluate(records: list[dict[str, Any]], train_data: list[forecast.SiteData],
             heldout: list[forecast.SiteData], enc_model: Any, plain_model: Any, auto_model: Any
             ) -> dict[str, dict[str, dict[str, float]]]:
    """NRMSE per row key, per group ("heldout"/"train"), per sensor.

    Each local model predicts each sensor's test windows once; the ensemble, the transferred
    single models and the own-sensor reference are all computed from those predictions.
    """
    locals_ = [r["model"] for r in records]
    res: dict[str, dict[str, dict[str, float]]] = {k: {"heldout": {}, "train": {}} for k in ROWS}
    for group, sites in (("heldout", heldout), ("train", train_data)):
        for i, d in enumerate(sites):
            x, y = d.test_xy()
            preds = [forecast.predict(m, x) for m in locals_]
            row = {
                "encrypted_average": forecast.rmse(forecast.predict(enc_model, x), y),
                "encrypted_auto": forecast.rmse(forecast.predict(auto_model, x), y),
                "plaintext_average": forecast.rmse(forecast.predict(plain_model, x), y),
                "output_ensemble": forecast.rmse(np.mean(preds, axis=0), y),
                "persistence": forecast.persistence_nrmse(d),
                "same_hour_yesterday": forecast.same_hour_yesterday_nrmse(d),
            }
            if group == "heldout":
                row["local_transferred"] = float(np.mean([forecast.rmse(p, y) for p in preds]))
            else:
                row["local_own"] = forecast.rmse(preds[i], y)
            for key, value in row.items():
                res[key][group][d.sensor] = value
    return res


# ── report ──────────────────────────────────────────────────────────────────────────────────


def _mean(values: dict[str, float]) -> float | None:
    return float(np.mean(list(values.values()))) if values else None


def _fmt(v: float | None, width: int) -> str:
    return f"{'—':>{width}}" if v is None else f"{v:>{width}.3f}"


def format_table(res: dict[str, dict[str, dict[str, float]]], heldout: list[str]) -> str:
    """Readable NRMSE table: held-out sensors, their mean, and the training sensors' mean."""
    w = 11
    short = [s[:w] for s in heldout]
    head = f"{'method':<40}" + "".join(f"{s:>{w + 1}}" for s in short)
    head += f"{'held-out':>{w + 1}}{'train':>{w + 1}}"
    sub = f"{'':<40}" + " " * ((w + 1) * len(short)) + f"{'mean':>{w + 1}}{'mean':>{w + 1}}"
    lines = [head, sub, "-" * len(head)]
    for key, label in ROWS.items():
        row = res[key]
        cells = "".join(" " + _fmt(row["heldout"].get(s), w) for s in heldout)
        lines.append(f"{label:<40}{cells} {_fmt(_mean(row['heldout']), w)}"
                     f" {_fmt(_mean(row['train']), w)}")
    return "\n".join(lines)


def run(cfg: DemoConfig, report_path: Path, workdir: Path | None, plot_path: Path = Path("demo-forecast.png")
        ) -> dict[str, Any]:
    """The whole demo; returns the report (also written to ``report_path``)."""
    watch = Stopwatch()
    import keras  # noqa: F401  (TF start-up, timed on its own)
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # one traced forward pass per model is intended

    watch.lap("tf_import")
    counts = forecast.load_counts()
    clean = forecast.clean_sensors(counts)
    train_names, heldout_names = forecast.pick_sensors(clean, cfg.n_train, cfg.n_heldout, cfg.seed)
    train_data = prepare(cfg, counts, train_names, 0)
    heldout_data = prepare(cfg, counts, heldout_names, 1000)
    watch.lap("data")
    print(f"training sensors: {train_names}\nheld-out sensors: {heldout_names}", flush=True)

    with tempfile.TemporaryDirectory(prefix="secagg-demo-") as tmp:
        work = workdir or Path(tmp)
        (work / "models").mkdir(parents=True, exist_ok=True)
        records = train_sites(cfg, train_data, work / "models")
        watch.lap("train_total")
        print("encrypted aggregation round ...", flush=True)
        global_path, receipts = encrypted_round(records, work, watch)
        paths = [r["path"] for r in records]
        weights = [float(r["n_samples"]) for r in records]
        import keras
        import secagg

        diff = max_abs_diff(secagg.read_model(global_path), plaintext_average(paths, weights))

        enc_model = keras.models.load_model(global_path, compile=False)
        plain_model = keras_average([r["model"] for r in records], weights, 0, cfg.window)
        watch.lap("plaintext_compare")
        print("encrypted auto merge (secure model selection) ...", flush=True)
        auto_path, auto_info = auto_merge(records, train_data, work)
        auto_model = keras.models.load_model(auto_path, compile=False)
        watch.lap("auto_merge")
        res = evaluate(records, train_data, heldout_data, enc_model, plain_model, auto_model)
        scaling = descaling(heldout_data, train_data, auto_model)
        d0 = heldout_data[0]
        other = max(train_data, key=lambda t: abs(t.scaler.mean - d0.scaler.mean)).scaler
        locals_ = [r["model"] for r in records]
        plot_forecasts(plot_path, d0, {
            "plain weight average (user's recipe)": enc_model,
            "encrypted auto merge": auto_model,
            "output ensemble (not private)": lambda x: np.mean([forecast.predict(m, x) for m in locals_], axis=0),
        }, other)
        watch.lap("evaluate")

    total = time.perf_counter() - _T_PROCESS
    report = {
        "config": cfg.__dict__,
        "train_rows": list(forecast.TRAIN_ROWS), "test_rows": list(forecast.TEST_ROWS),
        "train_sensors": train_names, "heldout_sensors": heldout_names,
        "sites": [{k: r[k] for k in ("client_id", "sensor", "seed", "n_samples",
                                     "train_seconds")} for r in records],
        "receipts": receipts,
        "wire_bytes_per_param": float(np.mean([r["bytes_per_param"] for r in receipts])),
        "max_abs_diff": diff,
        "auto": auto_info,
        "descaling_mae_people_per_hour": scaling,
        "plot": str(plot_path),
        "nrmse": {k: {"label": ROWS[k], **res[k], "heldout_mean": _mean(res[k]["heldout"]),
                      "train_mean": _mean(res[k]["train"])} for k in ROWS},
        "seconds": {**watch.seconds, "total": total},
    }
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2))
    print_report(report, res, heldout_names)
    print(f"report written to {report_path}")
    return report


def print_report(report: dict[str, Any], res: dict[str, Any], heldout: list[str]) -> None:
    """Print the NRMSE table, the encryption check, wire size and stage timings."""
    print()
    a, b = report["test_rows"]
    print(f"NRMSE (RMSE in each sensor's own normalized space), test rows [{a}, {b}), "
          f"horizon {report['config']['horizon']}h, window {report['config']['window']}h")
    print(format_table(res, heldout))
    print()
    print(f"max |encrypted average - plaintext float64 average| = {report['max_abs_diff']:.3e}")
    a = report["auto"]
    print(f"auto chose {a['chosen']!r} by pooled validation error over {a['encrypted_steps']} encrypted rounds "
          f"({a['wire_bytes'] / 1e6:.1f} MB on the wire, {a['seconds']:.1f}s)")
    sc = report["descaling_mae_people_per_hour"]
    print(f"auto on held-out sensors, MAE in people/hour: own scaler {sc['own_scaler_mae']:.1f}, "
          f"another site's scaler {sc['other_site_scaler_mae']:.1f} (trend right, values wrong)")
    print(f"plot: {report['plot']}")
    r = report["receipts"]
    print(f"wire: {r[0]['num_params']} params, {np.mean([x['wire_bytes'] for x in r]):.0f} "
          f"bytes/site, {report['wire_bytes_per_param']:.1f} bytes/param")
    s = report["seconds"]
    enc = [x["encrypt_seconds"] for x in r]
    sub = [x["wall_seconds"] for x in r]
    print("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in s.items()))
    print(f"per site: encrypt {np.mean(enc):.3f}s mean, encrypt+submit {np.mean(sub):.3f}s mean "
          f"({min(sub):.3f}-{max(sub):.3f})")


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    run(config_from(args), args.report, args.workdir, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
