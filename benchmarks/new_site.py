"""New-site benchmark: the global ``auto`` model at sensors no site trained on, the way a new site uses it.

The sites and the 5 held-out sensors are the merge-quality benchmark's (``merge_common``: its
sensor split, its cached site models, its DATA files): every site scales its own series (log1p,
standardized with its own training statistics) and trains its own LSTM(32). They are merged once
with ``auto`` through a real loopback aggregator. Each held-out sensor then acts as a new site
with ``secagg.predict.forecast`` (what ``secagg predict`` runs):

* its history is the 182 days before the test period (``forecast.VAL_ROWS``); it fits its own
  scaler on it (log1p + standard, the kind the federation used; ``secagg scaler --local``);
* it forecasts the test period (``forecast.TEST_ROWS``, 1 h ahead from 24 h) with the global
  model, with its readout adapted (``--adapt``) on its whole history or on the last 4 weeks of
  it only, and with another site's scaler (the mistake to avoid): used to scale the inputs and
  de-scale the forecasts, or only to de-scale forecasts made in its own normalized space;
* references: persistence (the last observed hour), the same hour last week, and the best single
  site model (the one training site's model with the lowest mean MAE over the held-out sensors,
  chosen on the test itself: an optimistic reference), each site model with the sensor's own scaler.

MAE in people/hour on the test period, per sensor and the mean over the 5.

    python benchmarks/new_site.py [--sites 13] [--epochs 4] [--max-train 3000] [--seed 0]
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

import merge_common as mc  # noqa: E402
from merge_common import forecast  # noqa: E402

SHORT_HISTORY = 4 * 168  # rows (hours) of the short-history adaptation

ROWS = (("auto", "global auto model, own scaler"),
        ("auto_adapt", "auto + --adapt on its 182-day history"),
        ("auto_adapt_short", "auto + --adapt on its last 4 weeks"),
        ("auto_other_scaler", "auto, another site's scaler to scale and de-scale (median over sites)"),
        ("auto_other_descale", "auto, own scaler in, another site's to de-scale (median over sites)"),
        ("best_site", "best single site model, own scaler"),
        ("persistence", "persistence (last hour)"),
        ("last_week", "same hour last week"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sites", type=int, default=13, help="training sites of the benchmark split to use (default 13)")
    p.add_argument("--epochs", type=int, default=4, help="training epochs per site (default 4)")
    p.add_argument("--max-train", type=int, default=3000, help="training windows per site (default 3000)")
    p.add_argument("--seed", type=int, default=0, help="site initialization seed (default 0)")
    p.add_argument("--retrain", action="store_true", help="retrain cached site models")
    p.add_argument("--out-dir", type=Path, default=mc.RESULTS, help="where results go")
    return p.parse_args(argv)


def own_scaler_for(sensor: mc.Sensor):
    """A training site's own scaler (``forecast.SiteScaler``: log1p, its training mean/std) as a secagg.Scaler."""
    from secagg import Scaler

    return Scaler("standard", True, mean=[sensor.data.scaler.mean], std=[sensor.data.scaler.std])


def test_mae(result, test_rows: tuple[int, int], offset: int) -> float:
    """MAE of ``result`` (a secagg.predict.Forecast on rows shifted by ``offset``) on the test rows."""
    rows = result.row + offset
    on_test = (rows >= test_rows[0]) & (rows < test_rows[1])
    if on_test.sum() != test_rows[1] - test_rows[0]:
        raise RuntimeError(f"{on_test.sum()} forecasts on the {test_rows[1] - test_rows[0]} test rows")
    return float(np.mean(np.abs(result.forecast[on_test] - result.truth[on_test])))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from secagg import Scaler
    from secagg.merge.simulate import simulate
    from secagg.predict import forecast as predict

    laps: dict[str, float] = {}
    t = time.perf_counter()
    cfg = dataclasses.replace(mc.BenchConfig(), epochs=args.epochs, max_train=args.max_train, seeds=(args.seed,),
                              torch=False)
    train, held = mc.load_sensors(cfg)  # the benchmark's split: the same 5 held-out sensors whatever --sites
    train = train[: args.sites]
    print(f"sites: {[s.name for s in train]}\nheld out (new sites): {[s.name for s in held]}", flush=True)
    cache = mc.Cache(cfg, train, retrain=args.retrain)
    models = cache.keras_sites(args.seed)
    data = cache.data_files()
    laps["site models"] = time.perf_counter() - t

    t = time.perf_counter()
    out = cache.seed_dir(args.seed) / "new_site" / "auto.keras"
    out.parent.mkdir(parents=True, exist_ok=True)
    merged = simulate("auto", [(str(m), str(d)) for m, d in zip(models, data)], out, seed=args.seed)
    laps["auto merge"] = time.perf_counter() - t
    print(f"auto chose {merged.chosen.get('chosen') if merged.chosen else None} ({laps['auto merge']:.0f} s)",
          flush=True)

    t = time.perf_counter()
    counts = forecast.load_counts()
    (h0, h1), (t0, t1) = forecast.VAL_ROWS, forecast.TEST_ROWS
    window = cfg.window
    mae: dict[str, dict[str, float]] = {key: {} for key, _ in ROWS}
    site_mae: dict[str, dict[str, float]] = {}
    adapt_info: dict[str, Any] = {}
    for s in held:
        raw = forecast.sensor_series(counts, s.name)
        own = Scaler.fit(raw[h0:h1], "standard", log1p=True)  # its own history's statistics
        start = h0 - window  # the first window's target is the first history row
        values = raw[start:t1]
        result = predict(out, values, own, adapt=True, adapt_fit=(h1 - h0 + 0.5) / (t1 - h0))
        assert result.adaptation.first_scored_row + start == t0, "adaptation must be scored on the test only"
        mae["auto"][s.name] = test_mae(dataclasses.replace(result, forecast=result.forecast_global), (t0, t1), start)
        mae["auto_adapt"][s.name] = test_mae(result, (t0, t1), start)
        short_start = h1 - SHORT_HISTORY - window
        short = predict(out, raw[short_start:t1], own, adapt=True,
                        adapt_fit=(SHORT_HISTORY + 0.5) / (SHORT_HISTORY + t1 - t0))
        assert short.adaptation.first_scored_row + short_start == t0
        mae["auto_adapt_short"][s.name] = test_mae(short, (t0, t1), short_start)
        adapt_info[s.name] = {"ridge": result.adaptation.ridge, "ridge_short": short.adaptation.ridge}
        others = [test_mae(predict(out, values, own_scaler_for(o)), (t0, t1), start) for o in train]
        mae["auto_other_scaler"][s.name] = float(np.median(others))
        z = own.transform(result.forecast_global)  # the global model's forecasts in its own normalized space
        descaled = [test_mae(dataclasses.replace(result, forecast=own_scaler_for(o).inverse(z)), (t0, t1), start)
                    for o in train]
        mae["auto_other_descale"][s.name] = float(np.median(descaled))
        site_mae[s.name] = {o.name: test_mae(predict(m, values, own), (t0, t1), start) for o, m in zip(train, models)}
        truth = raw[t0:t1]
        mae["persistence"][s.name] = float(np.mean(np.abs(raw[t0 - cfg.horizon : t1 - cfg.horizon] - truth)))
        mae["last_week"][s.name] = float(np.mean(np.abs(raw[t0 - 168 : t1 - 168] - truth)))
        print(f"  {s.name}: " + ", ".join(f"{k} {v[s.name]:.1f}" for k, v in mae.items() if s.name in v), flush=True)
    best = min((o.name for o in train), key=lambda n: np.mean([site_mae[h.name][n] for h in held]))
    mae["best_site"] = {h.name: site_mae[h.name][best] for h in held}
    laps["new sites"] = time.perf_counter() - t

    names = [s.name for s in held]
    table = ["| | " + " | ".join(names) + " | mean |", "|---" * (len(names) + 2) + "|"]
    for key, label in ROWS:
        cells = [f"{mae[key][n]:.1f}" for n in names]
        table.append(f"| {label} | " + " | ".join(cells) + f" | {np.mean([mae[key][n] for n in names]):.1f} |")
    total = time.perf_counter() - _T_START
    report = {
        "meta": {"argv": sys.argv[1:], "sites": [s.name for s in train], "heldout": names, "best_site": best,
                 "auto_chosen": merged.chosen, "history_rows": forecast.VAL_ROWS, "test_rows": forecast.TEST_ROWS,
                 "short_history_rows": SHORT_HISTORY, "config": cfg.to_json(), "cache": str(cache.dir),
                 "seconds": {**laps, "total": total}},
        "mae": {key: {**mae[key], "mean": float(np.mean([mae[key][n] for n in names]))} for key, _ in ROWS},
        "labels": dict(ROWS),
        "site_models_mae": site_mae,
        "adapt": adapt_info,
        "table_md": "\n".join(table),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / "new_site.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nMAE people/hour on the test period, {len(train)} sites, new sites = the held-out sensors "
          f"(best single site: {best})\n")
    print(report["table_md"])
    print(f"\ntotal {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in laps.items())}); written: {path}")
    return report


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
