"""Merge methods, written from one site's point of view (see ``secagg.merge.protocol``).

Each method is a generator: it yields :class:`Exchange` contributions and receives encrypted
averages back. What a site contributes, per method:

* ``mean``     its weights, weighted by its sample count (the plain average).
* ``align``    its weights after permuting its hidden units to match the previous global model,
               matched on the correlation of hidden activations on its own data (Hungarian).
               Round 0's reference is the plain average; each further round re-aligns to the
               latest global model.
* ``regmean``  per linear map (every LSTM layer's gates are a linear map of [x_t, h_{t-1}, 1], per
               direction of a Bidirectional LSTM; every Dense layer's output of [input, 1]): the Gram
               matrix G = X^T X / n of its inputs and G W. Clients solve W = (sum G')^-1 sum G W,
               where G' has off-diagonal terms shrunk by ``alpha`` (RegMean, Jin et al. 2023). Layers
               that are not such maps (GRU, normalization statistics) get the weighted average of
               their aligned weights in the same exchange.
* ``readout``  H^T H / n and H^T y / n, H being the current global model's last hidden features
               on its own training data; the output layer is refit in closed form (ridge).
* ``hybrid``   Z^T Z / n and Z^T y / n with Z = [H, input window, 1]: the global model plus a linear
               skip from its input, fitted as one ridge regression (:mod:`secagg.merge.heads`).
* ``linear``   X^T X / n and X^T y / n of its flattened input windows: a ridge model pooled
               across sites, exactly what pooling the data would give a linear model.
* ``auto``     builds candidates (mean, align, align+regmean, align+repair; each with a readout refit
               and a hybrid head; the linear model), drops those that diverge at any site, then scores
               the rest on every site's validation data; the lowest pooled error wins (secure model
               selection). ``same_architecture`` keeps to the sites' architecture.

Sums of statistics are encrypted weighted averages with the sample count as weight, which is
the pooled statistic divided by the total count; ridge solutions are unchanged by that factor.

A statistic that cannot be sent (not finite, or beyond the exchange's value bound, e.g. a
candidate whose activations blew up) is sent as zeros with a flag of 0 in the same exchange. The
pooled flag is below 1 exactly when some site could not send, and every site sees the same pooled
flag, so all of them drop that candidate together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from secagg.errors import SecAggError
from secagg.merge import heads
from secagg.merge.heads import HybridModel, LinearModel, hybrid_problem
from secagg.merge.layers import Bidirectional, Dense, Recurrent, describe
from secagg.merge.protocol import Exchange, SiteProtocol

#: |value| bound of second-moment statistics (Gram matrices, moments, readout sums). Normalized data gives
#: entries of order 1-10. The bound sets the precision of the released statistics (secagg.release: the
#: grid is a fixed fraction of bound x clients / weights), so it is no larger than it must be; a site
#: whose statistics exceed it flags them and the candidate is dropped (or, for linear, refused with advice).
STATS_BOUND = 1e2
#: |value| bound of Fisher-weighted exchanges: the Fisher is normalized by its mean but spiky.
FISHER_BOUND = 1e4
SCORE_BOUND = 1e3  # validation MSE above this (in normalized units) counts as diverged
RIDGE = 1e-3  # regmean and linear; readout and hybrid heads use heads.DEFAULT_RIDGE (or auto's choice)
#: Least ridge penalty of a head fitted on DP statistics: the noise in the released sums would otherwise be fitted too.
DP_RIDGE = 1e-2
_OK = 0.999  # a pooled flag at or above this: every site could send (CKKS keeps it within 1e-6 of 1)


@dataclasses.dataclass
class Site:
    """One site's view: its own model (as a numpy network) and its own data, nothing else."""

    name: str
    network: "object"  # secagg.merge.network.Network
    x: np.ndarray
    y: np.ndarray
    rebuild: Callable[[dict], "object"]  # tensors with this site's names -> Network
    trainer: Callable[["object", np.ndarray, np.ndarray, int, int], "object"] | None = None
    fisher_info: Callable[["object", np.ndarray, np.ndarray], dict] | None = None  # diagonal Fisher per tensor
    reinit: Callable[["object", int], "object"] | None = None  # draws a fresh initialization (for 'init')
    val_fraction: float = 0.2
    match_samples: int = 2048
    stats_samples: int = 4096  # windows per site for readout statistics (an evenly spaced subsample)
    aligned: "object" = None  # set by align(): this site's model permuted to the global model's unit order
    #: (network, x, what) -> largest difference: compares a network's forward pass with the framework's own and
    #: raises ForwardMismatchError if they differ (secagg.merge.network.SiteModel.check). None: no framework here.
    check: Callable[["object", np.ndarray, str], object] | None = None
    #: Told about every step of the method as it starts: (step name, detail). For progress output.
    report: Callable[[str, str], None] | None = None
    #: Statistics exchanges under row-level DP (secagg.privacy.statistics): rows clipped to ||r||^2 <= stats_clip
    #: (None: the default for the row width), sums sent with weight 1, noise added by the round's DP.
    stats_dp: bool = False
    stats_clip: float | None = None

    def __post_init__(self) -> None:
        if self.y.ndim == 1:
            self.y = self.y[:, None]
        if len(self.x) != len(self.y) or len(self.x) < 10:
            raise SecAggError(f"site {self.name}: x and y must have the same, non-trivial number of samples")
        cut = int(len(self.x) * (1 - self.val_fraction))
        # Time-ordered data: validate on the latest part, never on a shuffled sample.
        self.x_train, self.y_train = self.x[:cut], self.y[:cut]
        self.x_val, self.y_val = self.x[cut:], self.y[cut:]

    @property
    def n(self) -> float:
        return float(len(self.x_train))

    def match_sample(self) -> np.ndarray:
        """A fixed, evenly spaced subsample of the training inputs for activation matching."""
        return self.x_train[self._spaced(self.match_samples)]

    def stats_sample(self) -> tuple[np.ndarray, np.ndarray]:
        """A fixed, evenly spaced subsample of the training rows for second-moment statistics.

        The statistics are per-row means, so a subsample estimates them; the site still weighs in
        with its full row count. It bounds the numpy forward passes on large sites.
        """
        idx = self._spaced(self.stats_samples)
        return self.x_train[idx], self.y_train[idx]

    def _spaced(self, k: int) -> np.ndarray:
        return np.unique(np.linspace(0, len(self.x_train) - 1, min(k, len(self.x_train))).astype(int))

    def verify(self, net, what: str) -> None:
        """The framework's own forward pass must agree with ``net``'s on this site's validation data."""
        if self.check is not None:
            self.check(net, self.x_val, what)

    def step(self, name: str, detail: str = "") -> None:
        if self.report is not None:
            self.report(name, detail)


# -- building blocks ------------------------------------------------------------------------------


def mean(site: Site, net=None, name: str = "mean", reference=None) -> SiteProtocol:
    """The sample-weighted average of the sites' weights.

    ``reference``: a network every site knows (the round's starting model); under client-level DP
    each site's update relative to it is what gets clipped and noised.
    """
    net = site.network if net is None else net
    ref = None if reference is None else reference.to_tensors()
    site.step(name, "weighted average of the weights")
    average = yield Exchange(name, net.to_tensors(), site.n, privacy="weights", reference=ref)
    return site.rebuild(average)


#: Matching rounds of ``align`` after its first average (one weight exchange each).
ALIGN_ITERATIONS = 2


def align(site: Site, iterations: int = ALIGN_ITERATIONS, reference=None) -> SiteProtocol:
    """Iterated activation matching against the latest global model, then averaging.

    Without a ``reference`` (a model every site may see), round 0's plain average is the first one.
    Sets ``site.aligned``: this site's own model, permuted to match the final global model.
    """
    from secagg.merge.align import apply_permutations, match_activations

    if reference is None:
        reference = yield from mean(site, name="align0")
    x = site.match_sample()
    for k in range(1, iterations + 1):
        perms = match_activations(reference, site.network, x)
        aligned = apply_permutations(site.network, perms)
        reference = yield from mean(site, aligned, name=f"align{k}")
    site.aligned = apply_permutations(site.network, match_activations(reference, site.network, x))
    return reference


def _flagged(stats: dict[str, np.ndarray], bound: float) -> tuple[dict[str, np.ndarray], float]:
    """``stats`` and 1.0 if all are finite and within ``bound``; else zeros and 0.0 (see the module docstring)."""
    ok = all(np.all(np.isfinite(v)) and float(np.max(np.abs(v), initial=0.0)) <= bound for v in stats.values())
    return (stats, 1.0) if ok else ({k: np.zeros_like(v, dtype=np.float64) for k, v in stats.items()}, 0.0)


def _flagged_exchange(site: Site, name: str, stats: dict[str, np.ndarray], what: str, required: bool) -> SiteProtocol:
    """One statistics exchange with an "ok" flag; the pooled statistics, or None (or an error if ``required``)
    when some site could not send its own."""
    stats, ok = _flagged(stats, STATS_BOUND)
    pooled = yield Exchange(name, {**stats, "ok": np.array([ok])}, site.n, value_bound=STATS_BOUND)
    if pooled["ok"][0] >= _OK:
        return pooled
    if required:
        raise SecAggError(f"{name}: some site's {what} are not finite or exceed {STATS_BOUND:g} (its activations are "
                          "too large); use align+readout or auto instead")
    return None


def regmean_problem(net) -> str | None:
    """Why RegMean cannot merge ``net``, or None."""
    if not any(_linear_maps(layer) for layer in net.layers):
        return "the network has no LSTM or Dense layer to merge as a linear map"
    return None


def regmean(site: Site, net=None, alpha: float = 0.9, name: str = "regmean", required: bool = True) -> SiteProtocol:
    """RegMean over encrypted sums of Gram matrices, for every linear map of ``net`` (this site's, aligned).

    Returns None instead of a network when some site's statistics could not be sent and not
    ``required`` (``auto`` then drops the candidate); raises otherwise.
    """
    net = site.network if net is None else net
    site.step(name, "Gram matrices of every linear map")
    # Every window contributes one row per time step, so a matching-size sample already gives
    # tens of thousands of rows for Gram matrices of a few dozen columns.
    inputs = net.layer_inputs(site.match_sample())
    stats: dict[str, np.ndarray] = {}
    for i, (layer, inp) in enumerate(zip(net.layers, inputs)):
        maps = _linear_maps(layer)
        for key, part in maps:
            rows = _map_rows(part, inp, key)
            w = _stacked(part)
            gram = rows.T @ rows / len(rows)
            stats[f"g{i}{key}"] = gram
            stats[f"gw{i}{key}"] = gram @ w
        if not maps:
            for role in _weight_roles(layer):
                stats[f"p{i}.{role}"] = _get(layer, role)
    pooled = yield from _flagged_exchange(site, name, stats, "Gram matrices", required)
    if pooled is None:
        return None
    merged = net
    for i, layer in enumerate(net.layers):
        maps = _linear_maps(layer)
        for key, part in maps:
            g = pooled[f"g{i}{key}"]
            shrunk = alpha * g + (1 - alpha) * np.diag(np.diag(g))
            w = np.linalg.solve(shrunk + RIDGE * np.eye(len(g)) * np.trace(g) / len(g), pooled[f"gw{i}{key}"])
            layer = _with_part(layer, key, _unstacked(part, w))
        if not maps:
            for role in _weight_roles(layer):
                layer = _set(layer, role, pooled[f"p{i}.{role}"])
        merged = merged.replace(i, layer)
    return merged


def fisher(site: Site, net=None, name: str = "fisher", eps: float = 1e-8) -> SiteProtocol:
    """Diagonal-Fisher-weighted averaging: theta = sum(F_i * theta_i) / sum(F_i), from encrypted sums."""
    if site.fisher_info is None:
        raise SecAggError("'fisher' needs gradients, which this model format does not support")
    net = site.network if net is None else net
    site.step(name, "Fisher-weighted weights")
    theta = net.to_tensors()
    info = site.fisher_info(net, site.x_train, site.y_train)
    # Normalize by the site's mean Fisher so one site's loss scale cannot swamp the others; the
    # sample count then weights sites as in the plain average.
    floats = [k for k, v in theta.items() if np.asarray(v).dtype.kind == "f"]
    scale = np.mean(np.concatenate([info[k].ravel() for k in floats])) or 1.0
    stats = {}
    for k in floats:
        f = info[k] / scale
        stats[f"ft.{k}"] = f * np.asarray(theta[k], dtype=np.float64)
        stats[f"f.{k}"] = f
    pooled = yield Exchange(name, stats, site.n, value_bound=FISHER_BOUND)
    merged = dict(theta)
    merged.update({k: pooled[f"ft.{k}"] / (pooled[f"f.{k}"] + eps) for k in floats})
    if any(np.any(pooled[f"f.{k}"] <= eps) for k in floats):
        # No site has Fisher mass there (0/eps): use the plain average. Every site sees the same
        # pooled values, so all of them take this extra step together.
        plain = (yield from mean(site, net, name=f"{name}-mean")).to_tensors()
        merged.update({k: np.where(pooled[f"f.{k}"] <= eps, plain[k], merged[k]) for k in floats})
    return site.rebuild(merged)


def repair_problem(net) -> str | None:
    """Why REPAIR cannot correct ``net``, or None."""
    bad = [layer for layer in net.layers if not (isinstance(layer, Dense)
                                                  or isinstance(layer, Recurrent) and layer.kind == "lstm")]
    if not bad:
        return None
    if isinstance(bad[0], Recurrent):
        why = "a GRU's state enters its candidate gate through the reset gate, so an affine correction cannot be folded in"
    elif isinstance(bad[0], Bidirectional):
        why = "its two directions would need corrections of their own, which REPAIR as implemented does not make"
    else:
        why = "the correction is folded into the layer that consumes a unit, which must come right after it"
    return f"'repair' corrects chains of LSTM and Dense layers only, not {describe(bad[0])} ({why})"


def repair(site: Site, merged, own=None, name: str = "repair", required: bool = True) -> SiteProtocol:
    """REPAIR (Jordan et al. 2022) for recurrent nets: undo the variance collapse of averaged units.

    Averaging aligned but different units shrinks their activations. Every site measures, on its
    own data, the per-unit mean and second moment of hidden outputs of its own (aligned) model and
    of the merged model; the pooled values give each unit an affine correction a*h + b that
    restores the sites' average statistics. It is applied where the unit is consumed: the rows of
    the next layer's kernel and of the layer's own recurrent kernel (plus the bias). All hidden
    layers are corrected from one pass (for stacked layers the later statistics are not re-measured).
    Returns None when some site could not send its statistics and not ``required``.
    """
    problem = repair_problem(merged)
    if problem:
        raise SecAggError(problem)
    own = site.network if own is None else own
    site.step(name, "per-unit activation statistics")
    x = site.match_sample()
    stats = {}
    hidden = merged.unit_layers()
    own_states, merged_states = own.hidden_states(x), merged.hidden_states(x)
    for k in hidden:
        for tag, h in (("own", own_states[k]), ("merged", merged_states[k])):
            flat = h.reshape(-1, h.shape[-1])
            stats[f"{tag}.mean{k}"] = flat.mean(axis=0)
            stats[f"{tag}.sq{k}"] = (flat**2).mean(axis=0)
    pooled = yield from _flagged_exchange(site, name, stats, "activation statistics", required)
    if pooled is None:
        return None
    net = merged
    for k in hidden:
        mu_t, mu_m = pooled[f"own.mean{k}"], pooled[f"merged.mean{k}"]
        sd_t = np.sqrt(np.maximum(pooled[f"own.sq{k}"] - mu_t**2, 0.0))
        sd_m = np.sqrt(np.maximum(pooled[f"merged.sq{k}"] - mu_m**2, 0.0))
        ok_units = sd_m > 1e-6
        a = np.where(ok_units, sd_t / np.where(ok_units, sd_m, 1.0), 1.0)
        b = np.where(ok_units, mu_t - a * mu_m, 0.0)
        layer = net.layers[k]
        if isinstance(layer, Recurrent):
            layer = dataclasses.replace(layer, recurrent_kernel=a[:, None] * layer.recurrent_kernel,
                                        bias=layer.bias + b @ layer.recurrent_kernel)
            net = net.replace(k, layer)
        nxt = net.layers[k + 1]
        bias = nxt.bias + b @ nxt.kernel if nxt.bias is not None else None
        net = net.replace(k + 1, dataclasses.replace(nxt, kernel=a[:, None] * nxt.kernel, bias=bias))
    return net


def readout(site: Site, net, name: str = "readout", ridge: float = heads.DEFAULT_RIDGE, kind: str = "readout") -> SiteProtocol:
    """Refit ``net``'s output layer in closed form (``kind`` "readout"), or give it a linear skip
    from the input window fitted with it (``kind`` "hybrid", :mod:`secagg.merge.heads`)."""
    problem = net.readout_problem() if kind == "readout" else hybrid_problem(net, site.x_val)
    if problem:
        raise SecAggError(f"'{kind}' cannot refit this model: {problem}")
    fitted, dropped = yield from head_exchange(site, {"net": net}, (kind,), (ridge,), name)
    if dropped:
        raise SecAggError(f"{name}: the global model's features are not finite or too large at some site "
                          f"({dropped['net']}); the model diverged, so there is nothing to refit")
    return fitted[f"net+{kind}"]


def head_exchange(site: Site, nets: dict, kinds: tuple[str, ...] = ("readout",),
                  ridges: tuple[float, ...] = (heads.DEFAULT_RIDGE,),
                  name: str = "readout") -> SiteProtocol:
    """Closed-form heads (:mod:`secagg.merge.heads`) of several networks from one encrypted exchange.

    Every network sends the pooled-moment statistic of ``Z = [h, lags, 1]``; from it come, per network
    and per ridge penalty, the ``kinds`` asked for ("readout", "hybrid"), plus "linear" (the same for
    every network) if asked. Returns (heads, dropped): heads are keyed ``"<net>+<kind>"`` with one
    penalty, ``"<net>+<kind>@<ridge>"`` with several; ``dropped`` maps networks that some site could
    not send statistics for to the reason.
    """
    site.step(name, f"Z^T Z and Z^T y of {len(nets)} model(s), Z = [features, input window, 1]")
    if site.stats_dp:
        return (yield from _private_heads(site, nets, kinds, ridges, name))
    stats = {}
    flags = []
    x, y = site.stats_sample()
    keys = sorted(nets)
    widths = {}
    with_lags = any(kind in ("hybrid", "linear") for kind in kinds)
    for key in keys:
        z, target, widths[key] = heads.rows(nets[key], x, y, lags=with_lags)
        part, ok = _flagged({f"{key}.ztz": z.T @ z / len(z), f"{key}.zty": z.T @ target / len(z)}, STATS_BOUND)
        stats.update(part)
        flags.append(ok)
    pooled = yield Exchange(name, {**stats, "ok": np.array(flags)}, site.n, value_bound=STATS_BOUND)
    out, dropped = {}, {}
    for j, key in enumerate(keys):
        if pooled["ok"][j] < _OK:
            dropped[key] = f"features not finite or beyond {STATS_BOUND:g} at some site"
            continue
        for head, model in _fit_heads(key, nets[key], kinds, ridges, pooled[f"{key}.ztz"], pooled[f"{key}.zty"],
                                      widths[key]).items():
            out.setdefault(head, model)  # linear: the same from every network's statistics; the first is kept
    return out, dropped


def _fit_heads(key: str, net, kinds, ridges, gram: np.ndarray, cross: np.ndarray, width: int) -> dict:
    """Every head of ``kinds`` at every penalty of ``ridges``, named as :func:`head_exchange` says."""
    tag = (lambda r: f"@{r:g}") if len(ridges) > 1 else (lambda r: "")  # noqa: E731
    out = {}
    for kind in kinds:
        for r in ridges:
            if net is None or kind == "linear":
                out[f"linear{tag(r)}"] = heads.fit("linear", None, gram, cross, width, r)
            else:
                out[f"{key}+{kind}{tag(r)}"] = heads.fit(kind, net, gram, cross, width, r)
    return out


def _private_heads(site: Site, nets: dict, kinds: tuple[str, ...], ridges: tuple[float, ...], name: str
                   ) -> SiteProtocol:
    """:func:`head_exchange` under row-level DP: one network, R = [Z, y] clipped row by row, R^T R summed.

    No flag travels (whether a site's features are finite would depend on its data): a site whose
    rows are not finite stops with an error instead. The released R^T R is made symmetric and
    positive semi-definite before the ridge solve (post-processing).
    """
    from secagg.privacy.statistics import default_clip_norm, moments_from_release, second_moments

    ridges = tuple(max(r, DP_RIDGE) for r in ridges)
    if len(nets) != 1:
        raise SecAggError(f"{name}: under DP a statistics exchange carries one model's statistics (each row's "
                          "contribution is the sensitivity); auto, which compares many, is not available with DP")
    (key, net), = nets.items()
    x, y = site.stats_sample()
    with_lags = any(kind in ("hybrid", "linear") for kind in kinds)
    z, target, width = heads.rows(net, x, y, lags=with_lags)
    r = np.concatenate([z, target], axis=1)
    clip = site.stats_clip or default_clip_norm(r.shape[1])
    # Every site's bound must be the same and must not depend on its row count: size it to the largest
    # sample any site sends (stats_samples rows), each row at most clip.
    bound = float(site.stats_samples) * clip
    pooled = yield Exchange(name, second_moments(f"{key}.rr", r, clip), 1.0, value_bound=bound, privacy="rows")
    m = moments_from_release(pooled[f"{key}.rr"])
    d = z.shape[1]
    return _fit_heads(key, net, kinds, ridges, m[:d, :d], m[:d, d:], width), {}


def linear(site: Site, ridge: float = RIDGE) -> SiteProtocol:
    """The pooled ridge regression on flattened input windows (a :class:`~secagg.merge.heads.LinearModel`)."""
    if site.stats_dp:
        site.step("linear", "X^T X and X^T y of the input windows, rows clipped, under DP")
        fitted, _ = yield from _private_heads(site, {"linear": None}, ("linear",), (ridge,), "linear")
        return fitted["linear"]
    site.step("linear", "X^T X and X^T y of the input windows")
    x = _with_ones(site.x_train.reshape(len(site.x_train), -1))
    pooled = yield Exchange("linear", {"xtx": x.T @ x / len(x), "xty": x.T @ site.y_train / len(x)}, site.n,
                            value_bound=STATS_BOUND)
    w = heads.ridge(pooled["xtx"], pooled["xty"], ridge)
    return LinearModel(w[:-1], w[-1])


@dataclasses.dataclass(frozen=True)
class Scores:
    """Pooled validation errors: nRMSE = sqrt(pooled MSE / pooled variance of the targets)."""

    candidates: dict[str, float]  # candidate -> pooled nRMSE
    own: float  # each site's own model on its own validation data, pooled
    dropped: dict[str, str]  # candidate -> why it was not scored

    def to_json_dict(self) -> dict:
        return {"metric": "nRMSE on the sites' validation tails (pooled RMSE / pooled std of the targets)",
                "candidates": {k: round(v, 6) for k, v in sorted(self.candidates.items(), key=lambda kv: kv[1])},
                "sites_own_models": round(self.own, 6), "dropped": dict(self.dropped)}


def score(site: Site, candidates: dict, name: str = "score") -> SiteProtocol:
    """Pooled validation nRMSE of each candidate and of the sites' own models: every site scores on its own data.

    A candidate that diverges at any site (non-finite or MSE beyond SCORE_BOUND) is dropped by all.
    """
    site.step(name, f"validation error of {len(candidates)} candidate(s)")
    keys = sorted(candidates)
    y = site.y_val.reshape(len(site.y_val), -1)
    mse, flags = [], []
    for k in keys:
        err = float(np.mean((candidates[k].forward(site.x_val) - y) ** 2))
        ok = np.isfinite(err) and err <= SCORE_BOUND
        mse.append(err if ok else 0.0)
        flags.append(1.0 if ok else 0.0)
    own = min(float(np.mean((site.network.forward(site.x_val) - y) ** 2)), SCORE_BOUND)
    var = min(float(np.mean((y - y.mean(axis=0)) ** 2)), SCORE_BOUND)
    pooled = yield Exchange(name, {"mse": np.array(mse), "ok": np.array(flags), "own": np.array([own]),
                                   "var": np.array([var])}, float(len(site.x_val)), value_bound=SCORE_BOUND)
    scale = max(float(pooled["var"][0]), 1e-12)
    nrmse = lambda m: float(np.sqrt(max(m, 0.0) / scale))  # noqa: E731
    kept = {k: nrmse(m) for k, m, f in zip(keys, pooled["mse"], pooled["ok"]) if f >= _OK}
    dropped = {k: f"diverged at some site (validation MSE not finite or above {SCORE_BOUND:g})"
               for k, f in zip(keys, pooled["ok"]) if f < _OK}
    return Scores(kept, nrmse(pooled["own"][0]), dropped)


def finetune(site: Site, net, rounds: int, epochs: int) -> SiteProtocol:
    """FedAvg: ``rounds`` times, train ``epochs`` locally from the global model, then average."""
    if rounds and site.trainer is None:
        raise SecAggError("fine-tune rounds need local training, which this model format does not support")
    for r in range(rounds):
        site.step(f"finetune{r + 1}", f"{epochs} local epoch(s), then the average")
        local = site.trainer(net, site.x_train, site.y_train, epochs, r)
        net = yield from mean(site, local, name=f"finetune{r + 1}", reference=net)
    return net


# -- methods by name --------------------------------------------------------------------------------

BASE_METHODS = ("mean", "align", "regmean", "fisher", "repair", "readout", "hybrid", "linear", "auto", "init")


#: Local epochs after the common initialization of ``init`` (as long as the benchmark's sites train).
INIT_EPOCHS = 10
#: FedAvg rounds of one local epoch between the common initialization and the local training of ``init``.
INIT_WARMUP_ROUNDS = 1


def check_method(method: str, finetune_rounds: int = 0) -> list[str]:
    """The parts of ``method``, or a SecAggError naming what is wrong; needs no model (checked before any work)."""
    parts = method.split("+")
    unknown = [p for p in parts if p not in BASE_METHODS]
    if unknown:
        raise SecAggError(f"unknown merge method {'+'.join(unknown)!r}; choose from {', '.join(BASE_METHODS)} "
                          "or a '+'-joined pipeline such as align+regmean+readout")
    if parts == ["linear"] and finetune_rounds:
        raise SecAggError("fine-tune rounds train the sites' network; the pooled linear model is exact already")
    if "linear" in parts and parts != ["linear"]:
        raise SecAggError("'linear' is a model of its own and cannot be combined with other methods")
    if "auto" in parts and parts != ["auto"]:
        raise SecAggError("'auto' chooses its own pipeline; use it alone")
    ranks = [_STAGE[p] for p in parts if p in _STAGE]
    if any(b <= a for a, b in zip(ranks, ranks[1:])):
        raise SecAggError(
            f"pipeline {'+'.join(parts)!r} is out of order: at most one base (mean, align or init) first, then at "
            "most one of regmean/fisher, then repair, then readout or hybrid, e.g. align+regmean+readout"
        )
    return parts


def run_method(site: Site, method: str, finetune_rounds: int = 0, finetune_epochs: int = 1,
               init_epochs: int = INIT_EPOCHS, init_warmup: int = INIT_WARMUP_ROUNDS,
               same_architecture: bool = False) -> SiteProtocol:
    """The protocol for ``method``: a base method or a '+'-joined pipeline, e.g. 'align+regmean+readout'.

    With ``finetune_rounds``, a pipeline that ends in a closed-form head (readout or hybrid, including
    an ``auto`` choice that does) refits that head once more after the last fine-tune round: the head
    is the last stage whatever comes before it. An ``auto`` choice of the linear model has no network
    to fine-tune and ends there. ``same_architecture``: ``auto`` chooses only among models of the
    sites' architecture (no hybrid, no linear). The model returned has passed the framework check on
    this site's data (:meth:`Site.verify`): nothing is released that the framework computes differently.
    """
    parts = check_method(method, finetune_rounds)
    info: dict = {}
    if parts == ["linear"]:
        return (yield from linear(site)), info
    if parts == ["auto"]:
        net, info = yield from auto(site, same_architecture)
        head = info["head"]
    else:
        net = yield from pipeline(site, parts, init_epochs, init_warmup)
        head = parts[-1] if parts[-1] in ("readout", "hybrid") else None
    if isinstance(net, LinearModel):
        if finetune_rounds:
            info["finetune"] = "skipped: auto chose the linear model, which has no network to fine-tune"
        return net, info
    ridge = info.get("ridge") or heads.DEFAULT_RIDGE
    base = net.base if isinstance(net, HybridModel) else net
    base = yield from finetune(site, base, finetune_rounds, finetune_epochs)
    if finetune_rounds and head:
        # Local epochs move the features away from the refitted head; one more closed-form
        # refit costs a single exchange. Measured on the benchmark (seed 0, auto + 3 rounds):
        # held-out nRMSE 0.279 without it, 0.274 with it.
        net = yield from readout(site, base, name=f"finetune-{head}", ridge=ridge, kind=head)
    elif finetune_rounds:
        net = base
    site.verify(net.base if isinstance(net, HybridModel) else net, "the global model")
    return net, info


def pipeline(site: Site, parts: list[str], init_epochs: int = INIT_EPOCHS,
             init_warmup: int = INIT_WARMUP_ROUNDS) -> SiteProtocol:
    """Run the building blocks in order: a base (mean, align or init), then regmean and/or readout."""
    # Checked before the first exchange, so that no round is spent on a pipeline that cannot finish.
    check_method("+".join(parts))
    problems = {"repair": repair_problem(site.network), "regmean": regmean_problem(site.network),
                "readout": site.network.readout_problem(), "hybrid": hybrid_problem(site.network, site.x_val)}
    for part in parts:
        if problems.get(part):
            raise SecAggError(f"'{part}' cannot merge this model ({site.network.describe()}): {problems[part]}; "
                              "use auto, which picks among the methods that apply")
    net = None
    own = site.network
    for part in parts:
        if part == "mean":
            net = yield from mean(site)
        elif part == "align":
            net = yield from align(site)
            own = site.aligned
        elif part == "init":
            net = yield from common_init(site, init_epochs, init_warmup)
            own = site.aligned
        elif part == "regmean":
            net = yield from regmean(site, own)
        elif part == "fisher":
            net = yield from fisher(site, own)
        elif part == "repair":
            net = yield from repair(site, net if net is not None else (yield from mean(site)), own)
        elif part in ("readout", "hybrid"):
            net = yield from readout(site, net if net is not None else (yield from mean(site)), name=part, kind=part)
    return net


_STAGE = {"mean": 0, "align": 0, "init": 0, "regmean": 1, "fisher": 1, "repair": 2, "readout": 3, "hybrid": 3}


def auto(site: Site, same_architecture: bool = False) -> SiteProtocol:
    """Secure model selection among one-shot candidates; returns (model, info).

    Candidates: the networks mean, align, align+regmean, align+repair; each with its output layer
    refit (readout) and, unless ``same_architecture``, each with a hybrid head (a linear skip from the
    input window fitted with the output layer), plus the pooled linear model; every head at each
    penalty of :data:`secagg.merge.heads.RIDGES`. All heads come from one exchange. Every site scores
    every candidate on its own validation data; the lowest pooled error wins.

    ``info``: ``chosen`` (the candidate), ``head`` (readout, hybrid, linear or None), ``ridge`` (its
    penalty), ``architecture`` (the chosen model in words), ``scores`` (:class:`Scores` as JSON: every
    scored candidate's pooled validation nRMSE beside the sites' own models) and ``skipped``
    (candidates not built for this architecture, with the reason).
    """
    net = site.network
    plain = yield from mean(site)
    aligned_avg = yield from align(site, reference=plain)
    candidates = {"mean": plain, "align": aligned_avg}
    skipped: dict[str, str] = {}
    for key, problem in (("align+regmean", regmean_problem(net)), ("align+repair", repair_problem(net))):
        if problem:
            skipped[key] = problem
    if "align+regmean" not in skipped:
        built = yield from regmean(site, site.aligned, required=False)
        if built is None:
            skipped["align+regmean"] = f"Gram matrices not finite or beyond {STATS_BOUND:g} at some site"
        else:
            candidates["align+regmean"] = built
    if "align+repair" not in skipped:
        built = yield from repair(site, aligned_avg, site.aligned, required=False)
        if built is None:
            skipped["align+repair"] = f"activation statistics not finite or beyond {STATS_BOUND:g} at some site"
        else:
            candidates["align+repair"] = built
    kinds = ["readout"]
    problem = net.readout_problem()
    if problem:
        skipped["+readout"] = problem
        kinds = []
    if same_architecture:
        skipped["+hybrid"] = skipped["linear"] = "excluded by --same-architecture"
    elif hybrid_problem(net, site.x_val):
        skipped["+hybrid"] = skipped["linear"] = hybrid_problem(net, site.x_val)
    else:
        kinds += ["hybrid", "linear"]
    for key, cand in candidates.items():
        site.verify(cand, f"candidate {key}")
    if kinds:
        # The heads change only the output layer of networks verified above (and add numpy skips); the
        # chosen model is verified once more as a whole before it is released (run_method).
        fitted, dropped = yield from head_exchange(site, candidates, tuple(kinds), heads.RIDGES, name="auto-heads")
        candidates.update(fitted)
        skipped.update({f"{k}+heads": why for k, why in dropped.items()})
    scores = yield from score(site, candidates)
    if not scores.candidates:
        raise SecAggError(f"auto: every candidate diverged at some site ({scores.dropped}); check the sites' data "
                          "and models")
    best = min(scores.candidates, key=scores.candidates.get)
    name, _, ridge = best.partition("@")
    head = next((k for k in ("readout", "hybrid", "linear") if name.endswith(k)), None)
    report = scores.to_json_dict() | {"skipped": skipped}
    chosen = candidates[best]
    return chosen, {"chosen": best, "head": head, "ridge": float(ridge) if ridge else None,
                    "architecture": heads.architecture(chosen), "scores": report}


def common_init(site: Site, epochs: int = INIT_EPOCHS, warmup_rounds: int = INIT_WARMUP_ROUNDS) -> SiteProtocol:
    """Round 0 gives every site one fresh initialization; then ``warmup_rounds`` FedAvg
    rounds of one local epoch; then every site trains ``epochs`` epochs on its own; then the mean.

    Why the warm-up: from a shared but *random* start, separately trained LSTMs drift into
    different basins and their average is poor. After a little shared training, networks trained
    on from one point tend to stay linearly connected (Frankle et al. 2020, "Linear mode
    connectivity and the lottery ticket hypothesis"). Benchmark, seed 0, held-out nRMSE ÷ the
    output ensemble: no warm-up, 5 local epochs 1.45x; one warm-up round, 10 local epochs 1.03x.

    A ``Normalization`` layer's statistics come from the sites' data, not from the seed: the start
    carries the sites' pooled statistics, so that exchange counts as data statistics for DP.
    """
    from secagg.merge.layers import Normalization

    if site.trainer is None:
        raise SecAggError("'init' needs local training, which this model format does not support")
    if site.reinit is None:
        raise SecAggError("'init' needs a way to draw a fresh initialization for this model format")
    if epochs < 1 or warmup_rounds < 0:
        raise SecAggError("'init' needs at least one local epoch and a non-negative number of warm-up rounds")
    # Every site draws the initialization from the same seed and contributes it with equal weight,
    # so the average is that initialization (even if a framework's seeding differed at one site)
    # and no round ever has a single contributor.
    site.step("init", "a common start drawn from the shared seed")
    fresh = site.reinit(site.network, 0)
    has_stats = any(isinstance(layer, Normalization) for layer in site.network.layers)
    init = yield Exchange("init", fresh.to_tensors(), site.n if has_stats else 1.0,
                          privacy="stats" if has_stats else "public")
    start = site.rebuild(init)
    for r in range(warmup_rounds):
        site.step(f"init-warmup{r + 1}", "one local epoch, then the average")
        local = site.trainer(start, site.x_train, site.y_train, 1, 100 + r)
        start = yield from mean(site, local, name=f"init-warmup{r + 1}", reference=start)
    site.step("init-train", f"{epochs} local epochs")
    local = site.trainer(start, site.x_train, site.y_train, epochs, 0)
    site.aligned = local  # this site's own model, in the common basin (for a following regmean/fisher)
    return (yield from mean(site, local, name="init-mean", reference=start))


# -- linear algebra helpers -------------------------------------------------------------------------


def _with_ones(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a, np.ones((len(a), 1))], axis=1)


def _linear_maps(layer) -> list[tuple[str, object]]:
    """The parts of ``layer`` that RegMean merges as linear maps: (key suffix, LSTM or Dense)."""
    if isinstance(layer, Dense) or isinstance(layer, Recurrent) and layer.kind == "lstm":
        return [("", layer)]
    if isinstance(layer, Bidirectional) and layer.kind == "lstm":
        return [(".f", layer.forward), (".b", layer.backward)]
    return []


def _map_rows(part, inp: np.ndarray, key: str) -> np.ndarray:
    """The rows a linear map is applied to: [x_t, h_{t-1}, 1] (LSTM, in processing order) or [x, 1] (Dense)."""
    if isinstance(part, Dense):
        flat = inp.reshape(-1, inp.shape[-1])
        return _with_ones(flat)
    if key == ".b":
        inp = inp[:, ::-1]
    return part.linear_rows(inp, part.sequence(inp))


def _with_part(layer, key: str, part):
    if key == ".f":
        return dataclasses.replace(layer, forward=part)
    if key == ".b":
        return dataclasses.replace(layer, backward=part)
    return part


def _weight_roles(layer) -> list[str]:
    """The array fields of a layer RegMean averages instead of solving (GRU, normalization statistics)."""
    from secagg.merge.layers import BatchNorm, Normalization

    if isinstance(layer, Recurrent):
        return ["kernel", "recurrent_kernel", "bias"] + ([] if layer.recurrent_bias is None else ["recurrent_bias"])
    if isinstance(layer, Bidirectional):
        return [f"{d}.{r}" for d in ("forward", "backward") for r in _weight_roles(getattr(layer, d))]
    if isinstance(layer, BatchNorm):
        return [r for r in ("mean", "var", "gamma", "beta") if getattr(layer, r) is not None]
    if isinstance(layer, Normalization):
        return ["mean", "var"]
    return []


def _get(layer, role: str):
    from secagg.merge.network import _get as get

    return get(layer, role)


def _set(layer, role: str, value):
    from secagg.merge.network import _set as set_

    return set_(layer, role, value)


def _stacked(layer) -> np.ndarray:
    """A layer's linear map as one matrix over its input rows [x, h, 1] (recurrent) or [x, 1] (dense)."""
    if isinstance(layer, Recurrent):
        bias = layer.bias + (layer.recurrent_bias if layer.recurrent_bias is not None else 0.0)
        return np.concatenate([layer.kernel, layer.recurrent_kernel, bias[None, :]], axis=0)
    bias = layer.bias if layer.bias is not None else np.zeros(layer.kernel.shape[1])
    return np.concatenate([layer.kernel, bias[None, :]], axis=0)


def _unstacked(layer, w: np.ndarray):
    """Inverse of :func:`_stacked`; a torch-style second bias is folded into the first (same function for LSTM)."""
    if isinstance(layer, Recurrent):
        n_in = layer.kernel.shape[0]
        units = layer.recurrent_kernel.shape[0]
        rb = None if layer.recurrent_bias is None else np.zeros_like(layer.recurrent_bias)
        return dataclasses.replace(layer, kernel=w[:n_in], recurrent_kernel=w[n_in : n_in + units], bias=w[-1],
                                   recurrent_bias=rb)
    return dataclasses.replace(layer, kernel=w[:-1], bias=w[-1] if layer.bias is not None else None)
