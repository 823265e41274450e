"""One site of a secure-aggregation round: train a pedestrian-count LSTM and (optionally) submit it.

Train and save::

    python clients/keras_site.py --sensor "45 Queen Street" --out site.keras

Train, save and submit the encrypted weights to a running aggregator::

    python clients/keras_site.py --sensor "45 Queen Street" --out site.keras \\
        --server 127.0.0.1:50051 --round r1 --key keys/client.key --client-id site-3

The number of training windows is printed (``samples=N``); it is the site's aggregation weight.
Without ``--seed`` the model starts from a fresh random initialization, as an independent user's
would.
"""

from __future__ import annotations

import argparse
import sys
import time

import forecast


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = forecast.site_parser(__doc__, "where to save the model (.keras)")
    return forecast.parse_site_args(p, argv)


def main(argv: list[str] | None = None) -> int:
    """Train, save, print the sample count and optionally submit."""
    args = parse_args(argv)
    data = forecast.site_from_args(args)
    if data is None:
        return 2
    t0 = time.perf_counter()
    model, n_samples = forecast.train_site(data, seed=args.seed, epochs=args.epochs)
    train_s = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.save(args.out)
    print(f"sensor={args.sensor!r} seed={args.seed} epochs={args.epochs} "
          f"train_seconds={train_s:.1f} test_nrmse={forecast.model_nrmse(model, data):.4f}")
    print(f"saved {args.out}")
    print(f"samples={n_samples}")
    if args.server:
        forecast.submit_site(args, n_samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
