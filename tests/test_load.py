"""Load: many clients submit to one `secagg serve` at the same moment; each counts exactly once.

A short version of ``benchmarks/load.py``: 24 clients (3 processes of 8 threads each; TenSEAL holds
the GIL, so encryption only runs in parallel across processes) released together into one round
of a `secagg serve` subprocess with its default settings. Nothing here measures time.
"""

from __future__ import annotations

import multiprocessing
import threading

import numpy as np

import secagg


CLIENTS = 24
PROCESSES = 3
LAYOUT = {"dense/kernel": (100, 199), "dense/bias": (100,)}  # 20,000 parameters: 3 ciphertexts


def model_for(index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([7, index])
    return {name: (rng.standard_normal(shape) * 0.05).astype(np.float32) for name, shape in LAYOUT.items()}


def weight_for(index: int) -> float:
    return float(index + 1)


def _client_process(address: str, client_key: str, indices: list[int], ready, go, results) -> None:
    """Several sites in one process: each thread waits for ``go``, then calls secagg.submit."""
    key = secagg.load_client_key(client_key)
    models = {i: model_for(i) for i in indices}
    out: list[dict] = []

    def one(i: int) -> None:
        go.wait()
        try:
            r = secagg.submit(address, "load", key, f"site-{i:02d}", models[i], weight_for(i))
            out.append({"client": r.client_id, "submitted": r.submitted, "already_accepted": r.already_accepted})
        except Exception as exc:
            out.append({"client": f"site-{i:02d}", "error": f"{type(exc).__name__}: {exc}"})

    threads = [threading.Thread(target=one, args=(i,)) for i in indices]
    for t in threads:
        t.start()
    ready.put(len(threads))
    for t in threads:
        t.join()
    results.put(out)


def test_concurrent_clients_are_each_counted_once(serve_process, keypair, helpers):
    server = serve_process()  # default settings: minimum cohort 3
    ids = [f"site-{i:02d}" for i in range(CLIENTS)]
    # Max weight = the largest site's weight: the average is exact to 1e-6 within the release grid.
    round_status = secagg.create_round(server.address, "load", model_for(0), clients=CLIENTS,
                                       max_weight=weight_for(CLIENTS - 1))

    ctx = multiprocessing.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_client_process,
                         args=(server.address, str(keypair.client), list(range(p, CLIENTS, PROCESSES)), ready, go,
                               results))
             for p in range(PROCESSES)]
    for p in procs:
        p.start()
    try:
        assert sum(ready.get(timeout=120) for _ in procs) == CLIENTS
        go.set()  # every site starts at once
        replies = [r for _ in procs for r in results.get(timeout=300)]
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()

    assert [r for r in replies if "error" in r] == []
    assert sorted(r["client"] for r in replies) == ids
    assert not any(r["already_accepted"] for r in replies)
    # Each acceptance was acknowledged with its own running count: none lost, none doubled.
    assert sorted(r["submitted"] for r in replies) == list(range(1, CLIENTS + 1))
    status = secagg.round_status(server.address, "load")
    assert (status.state, status.submitted, status.clients) == ("closed", CLIENTS, tuple(ids))
    assert helpers.wait_for(lambda: sum("update accepted" in line for line in server.log) >= CLIENTS)
    assert sum("update accepted" in line for line in server.log) == CLIENTS

    average = secagg.fetch_average(server.address, "load", keypair.client)
    assert average.contributions == CLIENTS and average.clients == tuple(ids)
    models = [model_for(i) for i in range(CLIENTS)]
    weights = [weight_for(i) for i in range(CLIENTS)]
    expected = helpers.weighted_average(models, weights)
    flat = np.concatenate([expected["dense/kernel"].ravel(), expected["dense/bias"]])
    tol = helpers.release_tolerance(round_status, models, weights)
    assert np.max(np.abs(average.vector - flat)) <= tol
    assert abs(average.total_weight - sum(weights)) <= tol * sum(weights)
