"""Row-level DP on merge statistics (readout, hybrid, linear): clipped rows, noised sums, accounted releases."""

from __future__ import annotations

import numpy as np
import pytest

from secagg.errors import PrivacyError
from secagg.merge.heads import HybridModel, LinearModel
from secagg.merge.simulate import Releases, dp_releases, simulate
from secagg.privacy.accountant import epsilon
from secagg.privacy.mechanism import DPConfig
from secagg.privacy.statistics import RowSums, clip_rows, default_clip_norm, second_moments


DP_RIDGE = 1e-2  # secagg.merge.methods.DP_RIDGE (the least penalty of a head fitted on DP statistics), restated


def dp(z: float, sites: int, mode: str = "distributed") -> DPConfig:
    return DPConfig(clip_norm=1.0, noise_multiplier=z, delta=1e-5, mode=mode, min_honest=sites)


def clipped_linear_reference(mh, sites, clip: float | None = None) -> np.ndarray:
    """Plaintext: rows [window, 1, y] of each site's training rows (all of them: fewer than a statistics sample),
    clipped to ||r||^2 <= the default bound, summed over sites, then the ridge on the sub-blocks."""
    blocks = []
    for s in sites:
        r = np.concatenate([s.x_train.reshape(len(s.x_train), -1), np.ones((len(s.x_train), 1)), s.y_train], axis=1)
        blocks.append(clip_rows(r, clip or default_clip_norm(r.shape[1])) if clip != np.inf else r)
    r = np.concatenate(blocks)
    m = r.T @ r
    d = r.shape[1] - 1
    gram, cross = m[:d, :d], m[:d, d:]
    penalty = np.eye(d) * DP_RIDGE * np.trace(gram[:-1, :-1]) / (d - 1)
    penalty[-1, -1] = 0.0
    return np.linalg.solve(gram + penalty, cross)


def test_clip_rows_bounds_every_row_and_leaves_small_ones():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(500, 7)) * rng.uniform(0.1, 3, size=(500, 1))
    out = clip_rows(rows, 4.0)
    sq = np.einsum("ij,ij->i", out, out)
    assert np.all(sq <= 4.0)
    small = np.einsum("ij,ij->i", rows, rows) <= 4.0
    assert small.any() and (~small).any()
    np.testing.assert_array_equal(out[small], rows[small])
    # One row's contribution to the summed statistic is at most the bound (Frobenius norm of r r^T = ||r||^2).
    full, without = second_moments("m", out, 4.0), second_moments("m", out[1:], 4.0)
    assert np.linalg.norm(full["m"] - without["m"]) <= 4.0 + 1e-9
    with pytest.raises(PrivacyError, match="not finite"):
        clip_rows(np.array([[np.nan, 1.0]]), 1.0)


def test_linear_under_dp_with_negligible_noise_is_the_clipped_pooled_ridge(mh, keras_sites, tmp_path):
    # A clip that bites: rows of this data have ||r||^2 from about 1 to 19.
    result = simulate("linear", [s.pair() for s in keras_sites], tmp_path / "g.keras", dp=dp(1e-6, len(keras_sites)),
                      workdir=tmp_path / "w", stats_clip=8.0)
    assert isinstance(result.network, LinearModel)
    want = clipped_linear_reference(mh, keras_sites, 8.0)
    unclipped = clipped_linear_reference(mh, keras_sites, np.inf)
    assert float(np.max(np.abs(want - unclipped))) > 1e-2  # the clipping changes the fit ...
    got = np.concatenate([result.network.kernel, np.asarray(result.network.bias).reshape(1, -1)])
    np.testing.assert_allclose(got, want, atol=1e-4 * float(np.max(np.abs(want))))  # ... and secagg clipped
    # One statistics release, row-level; no site-level guarantee is claimed for statistics.
    assert result.epsilon is None
    assert result.row_epsilon == pytest.approx(epsilon([1e-6], 1e-5))


def test_linear_under_dp_carries_noise_of_the_promised_size(mh, keras_sites, tmp_path):
    """The released statistic differs from the exact one by noise of std z * clip on the sum (distributed: the
    sites' shares add up to it), so two runs differ and neither equals the noiseless fit."""
    want = clipped_linear_reference(mh, keras_sites)
    fits = []
    for i in range(2):
        r = simulate("linear", [s.pair() for s in keras_sites], tmp_path / f"g{i}.keras", dp=dp(1.0, len(keras_sites)),
                     workdir=tmp_path / f"w{i}")
        fits.append(np.concatenate([r.network.kernel, np.asarray(r.network.bias).reshape(1, -1)]))
    assert float(np.max(np.abs(fits[0] - fits[1]))) > 1e-4
    assert all(float(np.max(np.abs(f - want))) > 1e-4 for f in fits)


def test_hybrid_under_dp_is_a_hybrid_with_both_epsilons_accounted(mh, keras_sites, tmp_path):
    result = simulate("align+hybrid", [s.pair() for s in keras_sites], tmp_path / "g.keras",
                      dp=dp(2.0, len(keras_sites)), workdir=tmp_path / "w")
    assert isinstance(result.network, HybridModel)
    x = keras_sites[0].x_val
    np.testing.assert_allclose(mh.keras_predict(result.out, x).reshape(len(x), -1), result.network.forward(x),
                               atol=2e-5, rtol=1e-4)
    releases = dp_releases("align+hybrid")
    assert releases == Releases(weights=3, rows=1)
    # A weight release protects one row at half the noise multiplier (re-clipping: sensitivity 2C for a row).
    assert result.row_epsilon == pytest.approx(epsilon([1.0, 1.0, 1.0, 2.0], 1e-5))
    assert result.epsilon is None


def test_methods_whose_statistics_dp_does_not_cover_are_refused(keras_sites, tmp_path):
    for method in ("auto", "align+regmean+readout", "regmean"):
        with pytest.raises(PrivacyError, match="does not privatize"):
            simulate(method, [s.pair() for s in keras_sites], tmp_path / "g.keras", dp=dp(1.0, 3))
    assert dp_releases("hybrid") == Releases(1, 1)
    assert dp_releases("init") == Releases(2, 0)
    assert dp_releases("align+readout", finetune_rounds=1) == Releases(4, 2)


def test_a_row_level_round_refuses_anything_but_row_clipped_statistics(server, client_key, tmp_path):
    """Without clipping row by row, a row-level round's noise would protect nothing: secagg.api.submit refuses a
    plain mapping, and statistics clipped to a larger bound than the round's."""
    import secagg

    server = server.address
    template = {"m": np.zeros((3, 3))}
    round_dp = DPConfig(clip_norm=2.0, noise_multiplier=1.0, delta=1e-5, mode="local", min_honest=1, unit="row")
    secagg.create_round(server, "rows1", template=template, clients=2, dp=round_dp, value_bound=1e3, max_weight=1)
    status = secagg.round_status(server, "rows1")
    assert status.dp["unit"] == "row"
    with pytest.raises(PrivacyError, match="row-level DP round"):
        secagg.submit(server, "rows1", client_key, "a", {"m": np.eye(3)}, min_cohort=1)
    with pytest.raises(PrivacyError, match="row-level DP round"):
        secagg.submit(server, "rows1", client_key, "a", second_moments("m", np.ones((4, 3)), 3.0), min_cohort=1)
    ok = secagg.submit(server, "rows1", client_key, "a", second_moments("m", np.ones((4, 3)), 2.0), min_cohort=1)
    assert ok.dp.unit == "row" and isinstance(second_moments("m", np.ones((2, 3)), 2.0), RowSums)


def test_a_site_that_requires_dp_refuses_row_level_rounds_unless_it_allows_them(server, client_key, tmp_path):
    """A site asking for DP means its whole contribution by default; a row-level round promises less."""
    import secagg
    from secagg.site_policy import SitePolicy

    server = server.address
    round_dp = DPConfig(clip_norm=2.0, noise_multiplier=1.0, delta=1e-5, mode="local", min_honest=1, unit="row")
    secagg.create_round(server, "rows2", template={"m": np.zeros((3, 3))}, clients=2, dp=round_dp, value_bound=1e3,
                        max_weight=1)
    stats = second_moments("m", np.ones((4, 3)), 2.0)
    with pytest.raises(PrivacyError, match="row-level"):
        secagg.submit(server, "rows2", client_key, "a", stats, min_cohort=1, policy=SitePolicy(require_dp=True))
    ok = secagg.submit(server, "rows2", client_key, "a", stats, min_cohort=1,
                       policy=SitePolicy(require_dp=True, allow_row_dp=True))
    assert ok.submitted == 1
