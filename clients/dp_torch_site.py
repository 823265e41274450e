"""A record-level differentially private PyTorch site: DP-SGD (opacus) on a pedestrian-count LSTM.

Train with a fixed noise multiplier, save, and print epsilon::

    python clients/dp_torch_site.py --sensor "45 Queen Street" --out dp-site.pt \\
        --noise-multiplier 1.0 --max-grad-norm 1.0 --epochs 5

Or let opacus pick the noise for a privacy budget, and submit to a running aggregator::

    python clients/dp_torch_site.py --sensor "45 Queen Street" --out dp-site.pt \\
        --target-epsilon 3 --server 127.0.0.1:50051 --round r1 --key keys/client.key \\
        --client-id dp-site

Training uses opacus: the LSTM is an ``opacus.layers.DPLSTM`` (opacus cannot compute per-sample
gradients of ``nn.LSTM``), and ``PrivacyEngine`` clips every window's gradient to
``--max-grad-norm``, adds Gaussian noise and samples batches by Poisson sampling (each window is
in a batch with probability about ``batch_size / samples``).  Epsilon comes from opacus's
accountant (``--accountant rdp``, the default, or ``prv``) for the given ``--delta``.  The
guarantee is per training WINDOW (record level: 24 input hours and their target), not per sensor;
one hourly count appears in up to 25 windows, so protecting it needs group privacy over them.

The saved file follows the project's PyTorch convention exactly (what clients/torch_site.py
writes): DPLSTM's per-layer ``ih``/``hh`` Linear modules are copied into an
``nn.LSTM(batch_first=True)`` (same i, f, g, o gate order), keys ``lstm.weight_ih_l0``,
``lstm.weight_hh_l0``, ``lstm.bias_ih_l0``, ``lstm.bias_hh_l0``, ``head.weight``,
``head.bias`` in that order, so a round created from an ordinary torch site accepts it.  The
program checks that the converted model predicts what the DPLSTM model predicts before saving.

Not covered by epsilon: the printed nRMSEs (computed on the raw windows) and the number of
training windows (``samples=N``, the aggregation weight).  ``--seed`` fixes the initialization,
the batch sampling and the noise, for reproducible demos and tests; without it the noise is
drawn from a fresh, unprinted seed.  The noise comes from PyTorch's ordinary generator, not a
cryptographically secure one (opacus warns about this): fine for a demo; a production site would
use opacus's ``secure_mode``.  The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import secrets
import sys
import time
import warnings
from typing import Any

import numpy as np

import forecast

ACCOUNTANTS = ("rdp", "prv")
#: Largest prediction difference tolerated between the DPLSTM model and its nn.LSTM conversion.
CONVERSION_TOLERANCE = 1e-5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = forecast.site_parser(__doc__, "where to save the state dict (.pt)",
                             seed_help="seed of initialization, sampling and noise (default: random)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="expected batch size; sampling rate = 1/ceil(samples/batch) (default 256)")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 1e-2)")
    p.add_argument("--max-val", type=int, default=None, help="subsample validation windows")
    p.add_argument("--threads", type=int, default=1,
                   help="PyTorch threads (default 1: faster for this small LSTM)")
    d = p.add_argument_group("differential privacy")
    d.add_argument("--noise-multiplier", type=float, default=1.0,
                   help="noise std / max grad norm (default 1.0; ignored with --target-epsilon)")
    d.add_argument("--target-epsilon", type=float, default=None,
                   help="choose the noise multiplier that reaches this epsilon after --epochs")
    d.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="per-window gradient clipping norm (default 1.0)")
    d.add_argument("--delta", type=float, default=1e-5, help="delta of (epsilon, delta)-DP "
                   "(default 1e-5; keep it well below 1/samples)")
    d.add_argument("--accountant", choices=ACCOUNTANTS, default="rdp",
                   help="opacus privacy accountant (default rdp)")
    forecast.add_submit_options(p)
    args = p.parse_args(argv)
    forecast.check_submit_options(p, args)
    for name in ("epochs", "batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("noise_multiplier", "max_grad_norm", "lr"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.target_epsilon is not None and not args.target_epsilon > 0:
        p.error("--target-epsilon must be positive")
    if not 0 < args.delta < 1:
        p.error("--delta must be between 0 and 1")
    # The noise is reproducible only when the user fixes the seed; otherwise it comes from a fresh
    # secret, so the printed seed never reveals it.
    if args.seed is None:
        args.seed = secrets.randbelow(2**31)
        args.noise_seed = secrets.randbits(63)
    else:
        args.noise_seed = derived_seed(args.seed, "noise")
    return args


def derived_seed(seed: int, purpose: str) -> int:
    """An independent seed for one random stream (``purpose``) of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, *purpose.encode()]).generate_state(1)[0])


# ── the DP model and its conversion to the project's convention ─────────────────────────────


@functools.cache
def _dp_forecaster_class() -> type:
    """The ``nn.Module`` class of :func:`dp_from_torch` (defined once torch and opacus load)."""
    import torch
    from opacus.layers import DPLSTM

    class DPLSTMForecaster(torch.nn.Module):
        """:func:`forecast.build_torch_lstm` with a ``DPLSTM`` (per-sample gradients) inside."""

        def __init__(self, features: int, units: int) -> None:
            super().__init__()
            self.lstm = DPLSTM(features, units, batch_first=True)
            self.head = torch.nn.Linear(units, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.lstm(x)
            return self.head(out[:, -1, :])

    return DPLSTMForecaster


def _check_convention(lstm: Any) -> None:
    if (lstm.num_layers != 1 or not lstm.batch_first or lstm.bidirectional or not lstm.bias
            or getattr(lstm, "proj_size", 0)):
        raise ValueError("expected a one-layer, unidirectional, batch-first LSTM with biases")


def dp_from_torch(model: Any) -> Any:
    """A DPLSTM forecaster holding the weights of a :func:`forecast.build_torch_lstm` model."""
    import torch

    _check_convention(model.lstm)
    dp = _dp_forecaster_class()(model.lstm.input_size, model.lstm.hidden_size)
    with torch.no_grad():
        for plain, private in _paired(model, dp):
            private.copy_(plain)
    return dp


def torch_from_dp(dp: Any) -> Any:
    """The :func:`forecast.build_torch_lstm` model (``nn.LSTM`` + ``Linear``) of a DP forecaster.

    DPLSTM keeps layer 0 as ``l0.ih`` (input -> 4*units) and ``l0.hh`` (state -> 4*units) Linear
    modules, gates in nn.LSTM's i, f, g, o order; they are nn.LSTM's ``weight_ih_l0``/
    ``bias_ih_l0`` and ``weight_hh_l0``/``bias_hh_l0``.  Copied explicitly (not via DPLSTM's
    renamed state dict, whose key order differs from nn.LSTM's and would change the round's spec).
    """
    import torch

    _check_convention(dp.lstm)
    model = forecast.build_torch_lstm(0, units=dp.lstm.hidden_size, features=dp.lstm.input_size)
    with torch.no_grad():
        for plain, private in _paired(model, dp):
            plain.copy_(private)
    return model.eval()


def _paired(model: Any, dp: Any) -> tuple:
    """(nn.LSTM forecaster tensor, DP forecaster tensor) pairs, in the convention's order."""
    cell = dp.lstm.l0
    return ((model.lstm.weight_ih_l0, cell.ih.weight), (model.lstm.weight_hh_l0, cell.hh.weight),
            (model.lstm.bias_ih_l0, cell.ih.bias), (model.lstm.bias_hh_l0, cell.hh.bias),
            (model.head.weight, dp.head.weight), (model.head.bias, dp.head.bias))


def build_dp_lstm(seed: int, units: int = 32, features: int = 1) -> Any:
    """A DPLSTM forecaster initialized exactly as ``forecast.build_torch_lstm(seed)``."""
    return dp_from_torch(forecast.build_torch_lstm(seed, units=units, features=features))


def conversion_error(dp: Any, model: Any, x: np.ndarray) -> float:
    """Largest absolute prediction difference between the two models on windows ``x``."""
    return float(np.max(np.abs(forecast.predict_torch(dp, x) - forecast.predict_torch(model, x))))


# ── DP-SGD training ─────────────────────────────────────────────────────────────────────────


@dataclasses.dataclass(frozen=True)
class PrivacyReport:
    """What DP-SGD spent: epsilon for ``delta`` after ``steps`` noisy steps at ``sample_rate``."""

    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    epsilon: float


def train_dp(
    model: Any, x: np.ndarray, y: np.ndarray, *, seed: int, noise_seed: int, epochs: int,
    batch_size: int, lr: float, max_grad_norm: float, delta: float,
    noise_multiplier: float | None = None, target_epsilon: float | None = None,
    accountant: str = "rdp",
) -> PrivacyReport:
    """Train ``model`` (a DP forecaster) in place with DP-SGD; return what it spent.

    Exactly one of ``noise_multiplier`` and ``target_epsilon`` is used (the target wins).
    """
    import torch
    from opacus import PrivacyEngine

    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.float32).reshape(len(y), -1))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(xt, yt), batch_size=batch_size,
        # opacus's Poisson sampler draws from the loader's generator
        generator=torch.Generator().manual_seed(derived_seed(seed, "sampling")),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    engine = PrivacyEngine(accountant=accountant)
    common = dict(module=model, optimizer=optimizer, data_loader=loader,
                  max_grad_norm=max_grad_norm,
                  noise_generator=torch.Generator().manual_seed(noise_seed))
    if target_epsilon is not None:
        module, optimizer, loader = engine.make_private_with_epsilon(
            **common, target_epsilon=target_epsilon, target_delta=delta, epochs=epochs)
    else:
        module, optimizer, loader = engine.make_private(**common,
                                                        noise_multiplier=noise_multiplier)
    module.train()
    with warnings.catch_warnings():
        # opacus's per-sample-gradient hooks; harmless when the inputs need no gradient.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for _ in range(epochs):
            for xb, yb in loader:
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(module(xb), yb).backward()
                optimizer.step()
    module.eval()
    history = engine.accountant.history  # [(noise_multiplier, sample_rate, steps), ...]
    return PrivacyReport(
        accountant=engine.accountant.mechanism(),
        noise_multiplier=float(optimizer.noise_multiplier),
        sample_rate=float(history[0][1]),
        steps=int(sum(h[2] for h in history)),
        max_grad_norm=float(max_grad_norm),
        delta=float(delta),
        epsilon=float(engine.get_epsilon(delta)),
    )


# ── the program ─────────────────────────────────────────────────────────────────────────────


def main(argv: list[str] | None = None) -> int:
    """Train with DP-SGD, convert, check, save, optionally submit; print epsilon and a summary."""
    args = parse_args(argv)
    data = forecast.site_from_args(args)
    if data is None:
        return 2
    x, y = data.train_xy()
    xv, yv = forecast.rows_xy(data, forecast.VAL_ROWS, max_n=args.max_val, seed=args.seed)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _train_save_submit(args, x, y, xv, yv)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a larger process (tests)


def _train_save_submit(args: argparse.Namespace, x: np.ndarray, y: np.ndarray,
                       xv: np.ndarray, yv: np.ndarray) -> int:
    """Train with DP-SGD, convert, check, save, report and optionally submit."""
    import torch

    dp_model = build_dp_lstm(args.seed)
    t0 = time.perf_counter()
    report = train_dp(dp_model, x, y, seed=args.seed, noise_seed=args.noise_seed,
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      max_grad_norm=args.max_grad_norm, delta=args.delta,
                      noise_multiplier=args.noise_multiplier, target_epsilon=args.target_epsilon,
                      accountant=args.accountant)
    train_s = time.perf_counter() - t0

    model = torch_from_dp(dp_model)
    max_diff = conversion_error(dp_model, model, xv)
    if not max_diff <= CONVERSION_TOLERANCE:
        print(f"the nn.LSTM conversion differs from the DPLSTM model by {max_diff:.3g}; "
              "not saving", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    train_nrmse = forecast.rmse(forecast.predict_torch(model, x), y)
    val_nrmse = forecast.rmse(forecast.predict_torch(model, xv), yv)
    n_samples = int(len(y))
    print(f"sensor={args.sensor!r} seed={args.seed} epochs={args.epochs} "
          f"train_seconds={train_s:.1f} train_nrmse={train_nrmse:.4f} val_nrmse={val_nrmse:.4f}")
    print(f"privacy: this model is ({report.epsilon:.4g}, {report.delta:g})-differentially "
          f"private for each training window: epsilon = {report.epsilon:.4g} at delta = "
          f"{report.delta:g} ({report.accountant.upper()} accountant; {report.steps} steps, "
          f"noise multiplier {report.noise_multiplier:.4g}, sampling rate "
          f"{report.sample_rate:.4g}, clipping norm {report.max_grad_norm:g})")
    print(f"saved {args.out} (nn.LSTM convention; max |DPLSTM - nn.LSTM| = {max_diff:.2g})")
    print(f"samples={n_samples}")
    if args.server:
        forecast.submit_site(args, n_samples)
    summary = {
        "sensor": args.sensor, "samples": n_samples, "epochs": args.epochs,
        "batch_size": args.batch_size, **dataclasses.asdict(report),
        "target_epsilon": args.target_epsilon,
        "train_nrmse": train_nrmse, "val_nrmse": val_nrmse, "val_samples": int(len(yv)),
        "conversion_max_abs_diff": max_diff, "out": str(args.out),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
