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
import secrets
import sys
import time
from pathlib import Path

import forecast


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sensor", required=True, help="sensor (column) name of the site")
    p.add_argument("--out", required=True, type=Path, help="where to save the model (.keras)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    p.add_argument("--seed", type=int, default=None, help="initialization seed (default: random)")
    p.add_argument("--window", type=int, default=forecast.WINDOW, help="input hours (default 24)")
    p.add_argument("--horizon", type=int, default=forecast.HORIZON, help="hours ahead (default 1)")
    p.add_argument("--max-train", type=int, default=None, help="subsample training windows")
    forecast.add_submit_options(p)
    args = p.parse_args(argv)
    forecast.check_submit_options(p, args)
    if args.seed is None:
        args.seed = secrets.randbelow(2**31)
    return args


def main(argv: list[str] | None = None) -> int:
    """Train, save, print the sample count and optionally submit."""
    args = parse_args(argv)
    counts = forecast.load_counts()
    if not forecast.known_sensor(counts, args.sensor):
        return 2
    data = forecast.prepare_site(
        counts, args.sensor, window=args.window, horizon=args.horizon,
        max_train=args.max_train, seed=args.seed,
    )
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
        import secagg

        receipt = secagg.submit(args.server, args.round_id, key=args.key,
                                client_id=args.client_id, model=args.out,
                                weight=float(n_samples))
        print(f"submitted to {args.server} round {args.round_id!r} as {args.client_id!r}: "
              f"{receipt.wire_bytes} bytes for {receipt.num_params} params "
              f"({receipt.wire_bytes / max(receipt.num_params, 1):.1f} bytes/param), "
              f"encrypt {receipt.encrypt_seconds:.2f}s, send {receipt.send_seconds:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
