"""One PyTorch site of a secure-aggregation round: train a pedestrian-count LSTM, save it.

Train and save (and export the site's training windows for merging methods that need data)::

    python clients/torch_site.py --sensor "45 Queen Street" --out site.pt --data-out site.npz

Train, save and submit the encrypted weights to a running aggregator::

    python clients/torch_site.py --sensor "45 Queen Street" --out site.pt \\
        --server 127.0.0.1:50051 --round r1 --key keys/client.key --client-id site-3

Plain PyTorch: ``nn.LSTM(batch_first=True)`` whose last time step feeds ``nn.Linear``, Adam on
the MSE, the state dict saved with ``torch.save`` (keys ``lstm.*`` and ``head.*``).  The number
of training windows is printed (``samples=N``); it is the site's aggregation weight.  The DATA
file (``--data-out``) holds ``x`` (samples, 24, 1) and ``y`` (samples, 1), float32, in the site's
own normalized space (log1p, then standardized with its training mean/std).  Without ``--seed``
the model starts from a fresh random initialization, as an independent user's would.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import forecast


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = forecast.site_parser(__doc__, "where to save the state dict (.pt)")
    p.add_argument("--data-out", type=Path, help="also export the training windows (.npz)")
    return forecast.parse_site_args(p, argv)


def main(argv: list[str] | None = None) -> int:
    """Train, save, optionally export the data and submit; print the sample count."""
    args = parse_args(argv)
    data = forecast.site_from_args(args)
    if data is None:
        return 2
    import torch

    t0 = time.perf_counter()
    model, n_samples = forecast.train_torch_site(data, seed=args.seed, epochs=args.epochs)
    train_s = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    x, y = data.test_xy()
    nrmse = forecast.rmse(forecast.predict_torch(model, x), y)
    print(f"sensor={args.sensor!r} seed={args.seed} epochs={args.epochs} "
          f"train_seconds={train_s:.1f} test_nrmse={nrmse:.4f}")
    print(f"saved {args.out}")
    if args.data_out:
        forecast.save_site_data(data, args.data_out)
        print(f"data {args.data_out}")
    print(f"samples={n_samples}")
    if args.server:
        forecast.submit_site(args, n_samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
