"""Audit item 8: no round closes below the minimum cohort (default 3).

With K contributors, K-1 colluding sites subtract their own updates from the decrypted sum and read
the remaining site's update; with 2, each site reads the other's model. So the aggregator refuses
to create a round that could close with fewer than its minimum cohort, and a round that somehow has
fewer contributions at close time (created under a lower minimum, then the server restarted with
the default) fails instead of releasing its sum.
"""

from __future__ import annotations

import pytest

import secagg
from secagg.errors import CohortError, RoundStateError
from secagg.rounds import DEFAULT_MIN_COHORT, Aggregator


def test_default_is_three_everywhere(keypair, tmp_path, serve_process, npz_models):
    import inspect

    assert DEFAULT_MIN_COHORT == 3
    assert inspect.signature(secagg.serve).parameters["min_cohort"].default == 3
    assert Aggregator(secagg.load_server_key(keypair.server), tmp_path / "a").min_cohort == 3
    # The CLI's default (a `secagg serve` process without --min-cohort) refuses a round of two.
    proc = serve_process()
    paths, _ = npz_models(1)
    with pytest.raises(CohortError, match="fewer than 3") as info:
        secagg.create_round(proc.address, "r1", template=paths[0], clients=2)
    assert "--min-clients 3" in str(info.value)  # the message names the fix
    with pytest.raises(CohortError):  # a quorum below the cohort is refused too
        secagg.create_round(proc.address, "r2", template=paths[0], clients=5, min_clients=2)
    status = secagg.create_round(proc.address, "r3", template=paths[0], clients=3)
    assert (status.min_clients, status.min_cohort) == (3, 3)


def test_round_below_cohort_at_close_fails_without_releasing(keypair, client_key, npz_models, tmp_path):
    """A round created under --min-cohort 1, recovered by a server with the default, never releases
    a sum of two."""
    state = tmp_path / "state"
    paths, _ = npz_models(2)
    small = secagg.serve(keypair.server, "127.0.0.1:0", state, min_cohort=1)
    try:
        secagg.create_round(small.address, "r1", template=paths[0], clients=2)
        secagg.submit(small.address, "r1", client_key, "a", paths[0])
    finally:
        small.stop(grace=0)
    strict = secagg.serve(keypair.server, "127.0.0.1:0", state)  # default minimum cohort 3
    try:
        secagg.submit(strict.address, "r1", client_key, "b", paths[1])
        status = secagg.round_status(strict.address, "r1")
        assert status.state == "failed"
        assert "minimum cohort 3" in status.reason and "a, b" in status.reason
        with pytest.raises(RoundStateError, match="failed"):
            secagg.fetch_average(strict.address, "r1", client_key)
        # Nothing of the two updates is left on disk: no sum was written.
        assert not (state / "rounds" / "r1" / "aggregate").exists()
        assert not (state / "rounds" / "r1" / "accepted").exists()
    finally:
        strict.stop(grace=0)


def test_min_cohort_option_is_validated(keypair, tmp_path):
    with pytest.raises(CohortError, match="at least 1"):
        Aggregator(secagg.load_server_key(keypair.server), tmp_path / "s", min_cohort=0)
