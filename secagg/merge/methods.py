"""Merge methods, written from one site's point of view (see ``secagg.merge.protocol``).

Each method is a generator: it yields :class:`Exchange` contributions and receives encrypted
averages back. What a site contributes, per method:

* ``mean``     its weights, weighted by its sample count (the plain average).
* ``align``    its weights after permuting its hidden units to match the previous global model,
               matched on the correlation of hidden activations on its own data (Hungarian).
               Round 0's reference is the plain average; each further round re-aligns to the
               latest global model.
* ``regmean``  per linear map (every LSTM layer's gates are a linear map of [x_t, h_{t-1}, 1];
               every Dense layer's output of [input, 1]): the Gram matrix G = X^T X / n of its
               inputs and G W. Clients solve W = (sum G')^-1 sum G W, where G' has off-diagonal
               terms shrunk by ``alpha`` (RegMean, Jin et al. 2023).
* ``readout``  H^T H / n and H^T y / n, H being the current global model's last hidden features
               on its own training data; the output layer is refit in closed form (ridge).
* ``linear``   X^T X / n and X^T y / n of its flattened input windows: a ridge model pooled
               across sites, exactly what pooling the data would give a linear model.
* ``auto``     builds candidates (mean+readout, align+readout, align+regmean+readout), then
               its mean squared error of every candidate on its own validation data; the
               candidate with the lowest pooled error wins (secure model selection).

Sums of statistics are encrypted weighted averages with the sample count as weight, which is
the pooled statistic divided by the total count; ridge solutions are unchanged by that factor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from secagg.errors import SecAggError
from secagg.merge.protocol import Exchange, SiteProtocol

STATS_BOUND = 1e4  # |value| bound for statistics exchanges (normalized data gives entries of order 1-100)
RIDGE = 1e-3


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


# -- building blocks ------------------------------------------------------------------------------


def mean(site: Site, net=None, name: str = "mean", reference=None) -> SiteProtocol:
    """The sample-weighted average of the sites' weights.

    ``reference``: a network every site knows (the round's starting model); under client-level DP
    each site's update relative to it is what gets clipped and noised.
    """
    net = site.network if net is None else net
    ref = None if reference is None else reference.to_tensors()
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


def regmean(site: Site, net=None, alpha: float = 0.9, name: str = "regmean") -> SiteProtocol:
    """RegMean over encrypted sums of Gram matrices, for every layer of ``net`` (this site's, aligned)."""
    net = site.network if net is None else net
    # Every window contributes one row per time step, so a matching-size sample already gives
    # tens of thousands of rows for Gram matrices of a few dozen columns.
    inputs = net.linear_inputs(site.match_sample())
    stats: dict[str, np.ndarray] = {}
    for i, (layer, rows) in enumerate(zip(net.layers, inputs)):
        w = _stacked(layer)
        gram = rows.T @ rows / len(rows)
        stats[f"g{i}"] = gram
        stats[f"gw{i}"] = gram @ w
    pooled = yield Exchange(name, stats, site.n, value_bound=STATS_BOUND)
    merged = net
    for i, layer in enumerate(net.layers):
        g = pooled[f"g{i}"]
        shrunk = alpha * g + (1 - alpha) * np.diag(np.diag(g))
        w = np.linalg.solve(shrunk + RIDGE * np.eye(len(g)) * np.trace(g) / len(g), pooled[f"gw{i}"])
        merged = merged.replace(i, _unstacked(layer, w))
    return merged


def fisher(site: Site, net=None, name: str = "fisher", eps: float = 1e-8) -> SiteProtocol:
    """Diagonal-Fisher-weighted averaging: theta = sum(F_i * theta_i) / sum(F_i), from encrypted sums."""
    if site.fisher_info is None:
        raise SecAggError("'fisher' needs gradients, which this model format does not support")
    net = site.network if net is None else net
    theta = net.to_tensors()
    info = site.fisher_info(net, site.x_train, site.y_train)
    # Normalize by the site's mean Fisher so one site's loss scale cannot swamp the others; the
    # sample count then weights sites as in the plain average.
    scale = np.mean(np.concatenate([f.ravel() for f in info.values()])) or 1.0
    stats = {}
    for k, v in theta.items():
        f = info[k] / scale
        stats[f"ft.{k}"] = f * np.asarray(v, dtype=np.float64)
        stats[f"f.{k}"] = f
    pooled = yield Exchange(name, stats, site.n, value_bound=STATS_BOUND)
    merged = {k: pooled[f"ft.{k}"] / (pooled[f"f.{k}"] + eps) for k in theta}
    if any(np.any(pooled[f"f.{k}"] <= eps) for k in theta):
        # No site has Fisher mass there (0/eps): use the plain average. Every site sees the same
        # pooled values, so all of them take this extra step together.
        plain = (yield from mean(site, net, name=f"{name}-mean")).to_tensors()
        merged = {k: np.where(pooled[f"f.{k}"] <= eps, plain[k], merged[k]) for k in theta}
    return site.rebuild(merged)


def repair(site: Site, merged, own=None, name: str = "repair") -> SiteProtocol:
    """REPAIR (Jordan et al. 2022) for recurrent nets: undo the variance collapse of averaged units.

    Averaging aligned but different units shrinks their activations. Every site measures, on its
    own data, the per-unit mean and second moment of hidden outputs of its own (aligned) model and
    of the merged model; the pooled values give each unit an affine correction a*h + b that
    restores the sites' average statistics. It is applied where the unit is consumed: the rows of
    the next layer's kernel and of the layer's own recurrent kernel (plus the bias). All hidden
    layers are corrected from one pass (for stacked layers the later statistics are not re-measured).
    """
    from secagg.merge.network import Recurrent

    own = site.network if own is None else own
    x = site.match_sample()
    stats = {}
    hidden = range(len(merged.layers) - 1)
    for k, (h_own, h_merged) in enumerate(zip(own.hidden_states(x), merged.hidden_states(x))):
        if k not in hidden:
            continue
        for tag, h in (("own", h_own), ("merged", h_merged)):
            flat = h.reshape(-1, h.shape[-1])
            stats[f"{tag}.mean{k}"] = flat.mean(axis=0)
            stats[f"{tag}.sq{k}"] = (flat**2).mean(axis=0)
    pooled = yield Exchange(name, stats, site.n)
    net = merged
    for k in hidden:
        mu_t, mu_m = pooled[f"own.mean{k}"], pooled[f"merged.mean{k}"]
        sd_t = np.sqrt(np.maximum(pooled[f"own.sq{k}"] - mu_t**2, 0.0))
        sd_m = np.sqrt(np.maximum(pooled[f"merged.sq{k}"] - mu_m**2, 0.0))
        ok = sd_m > 1e-6
        a = np.where(ok, sd_t / np.where(ok, sd_m, 1.0), 1.0)
        b = np.where(ok, mu_t - a * mu_m, 0.0)
        layer = net.layers[k]
        if isinstance(layer, Recurrent):
            layer = dataclasses.replace(layer, recurrent_kernel=a[:, None] * layer.recurrent_kernel,
                                        bias=layer.bias + b @ layer.recurrent_kernel)
            net = net.replace(k, layer)
        nxt = net.layers[k + 1]
        bias = nxt.bias + b @ nxt.kernel if nxt.bias is not None else None
        net = net.replace(k + 1, dataclasses.replace(nxt, kernel=a[:, None] * nxt.kernel, bias=bias))
    return net


def readout(site: Site, net, name: str = "readout", ridge: float = RIDGE) -> SiteProtocol:
    """Refit ``net``'s output layer in closed form from pooled H^T H and H^T y."""
    fitted = yield from readout_many(site, {"net": net}, name, ridge)
    return fitted["net"]


def readout_many(site: Site, nets: dict, name: str = "readout", ridge: float = RIDGE) -> SiteProtocol:
    """Readout refits of several candidate networks in one encrypted exchange."""
    stats = {}
    x, y = site.stats_sample()
    for key, net in nets.items():
        h = net.features(x)
        if net.layers[-1].bias is not None:
            h = _with_ones(h)
        stats[f"{key}.hth"] = h.T @ h / len(h)
        stats[f"{key}.hty"] = h.T @ y / len(h)
    pooled = yield Exchange(name, stats, site.n, value_bound=STATS_BOUND)
    out = {}
    for key, net in nets.items():
        last = net.layers[-1]
        has_bias = last.bias is not None
        w = _ridge(pooled[f"{key}.hth"], pooled[f"{key}.hty"], ridge, bias_row=has_bias)
        layer = dataclasses.replace(last, kernel=w[:-1], bias=w[-1]) if has_bias else dataclasses.replace(last, kernel=w)
        out[key] = net.replace(len(net.layers) - 1, layer)
    return out


def linear(site: Site, ridge: float = RIDGE) -> SiteProtocol:
    """The pooled ridge regression on flattened input windows: (W, b)."""
    x = _with_ones(site.x_train.reshape(len(site.x_train), -1))
    pooled = yield Exchange("linear", {"xtx": x.T @ x / len(x), "xty": x.T @ site.y_train / len(x)}, site.n,
                            value_bound=STATS_BOUND)
    w = _ridge(pooled["xtx"], pooled["xty"], ridge)
    return w[:-1], w[-1]


def score(site: Site, candidates: dict, name: str = "score") -> SiteProtocol:
    """Pooled validation MSE of each candidate: every site scores on its own validation data."""
    mse = {k: float(np.mean((net.forward(site.x_val) - site.y_val) ** 2)) for k, net in candidates.items()}
    keys = sorted(candidates)
    # Scores are averaged like everything else; clip so one broken candidate cannot overflow the round.
    pooled = yield Exchange(name, {"mse": np.array([min(mse[k], 1e3) for k in keys])}, float(len(site.x_val)),
                            value_bound=1e3)
    return dict(zip(keys, pooled["mse"].tolist()))


def finetune(site: Site, net, rounds: int, epochs: int) -> SiteProtocol:
    """FedAvg: ``rounds`` times, train ``epochs`` locally from the global model, then average."""
    if rounds and site.trainer is None:
        raise SecAggError("fine-tune rounds need local training, which this model format does not support")
    for r in range(rounds):
        local = site.trainer(net, site.x_train, site.y_train, epochs, r)
        net = yield from mean(site, local, name=f"finetune{r + 1}", reference=net)
    return net


# -- methods by name --------------------------------------------------------------------------------

BASE_METHODS = ("mean", "align", "regmean", "fisher", "repair", "readout", "linear", "auto", "init")


#: Local epochs after the common initialization of ``init`` (as long as the benchmark's sites train).
INIT_EPOCHS = 10
#: FedAvg rounds of one local epoch between the common initialization and the local training of ``init``.
INIT_WARMUP_ROUNDS = 1


def run_method(site: Site, method: str, finetune_rounds: int = 0, finetune_epochs: int = 1,
               init_epochs: int = INIT_EPOCHS, init_warmup: int = INIT_WARMUP_ROUNDS) -> SiteProtocol:
    """The protocol for ``method``: a base method or a '+'-joined pipeline, e.g. 'align+regmean+readout'.

    With ``finetune_rounds``, a pipeline that ends in a readout refit (including an ``auto`` choice
    that does) refits the output layer once more after the last fine-tune round: readout is the last
    stage whatever comes before it.
    """
    parts = method.split("+")
    unknown = [p for p in parts if p not in BASE_METHODS]
    if unknown:
        raise SecAggError(f"unknown merge method {'+'.join(unknown)!r}; choose from {', '.join(BASE_METHODS)} "
                          "or a '+'-joined pipeline such as align+regmean+readout")
    info: dict = {}
    if parts == ["linear"] and finetune_rounds:
        raise SecAggError("fine-tune rounds train the sites' network; the pooled linear model is exact already")
    if parts == ["linear"]:
        return (yield from linear(site)), info
    if "linear" in parts:
        raise SecAggError("'linear' is a model of its own and cannot be combined with other methods")
    if parts == ["auto"]:
        net, info = yield from auto(site)
        ends_in_readout = info["chosen"].endswith("readout")
    else:
        net = yield from pipeline(site, parts, init_epochs, init_warmup)
        ends_in_readout = parts[-1] == "readout"
    net = yield from finetune(site, net, finetune_rounds, finetune_epochs)
    if finetune_rounds and ends_in_readout:
        # Local epochs move the features away from the refitted output layer; one more closed-form
        # refit costs a single exchange. Measured on the benchmark (seed 0, auto + 3 rounds):
        # held-out nRMSE 0.279 without it, 0.274 with it.
        net = yield from readout(site, net, name="finetune-readout")
    return net, info


def pipeline(site: Site, parts: list[str], init_epochs: int = INIT_EPOCHS,
             init_warmup: int = INIT_WARMUP_ROUNDS) -> SiteProtocol:
    """Run the building blocks in order: a base (mean, align or init), then regmean and/or readout."""
    # Checked before the first exchange, so that no round is spent on a pipeline that cannot finish.
    if "auto" in parts:
        raise SecAggError("'auto' chooses its own pipeline; use it alone")
    ranks = [_STAGE[p] for p in parts]
    if any(b <= a for a, b in zip(ranks, ranks[1:])):
        raise SecAggError(
            f"pipeline {'+'.join(parts)!r} is out of order: at most one base (mean, align or init) first, then at "
            "most one of regmean/fisher, then repair, then readout, e.g. align+regmean+readout"
        )
    if "repair" in parts and not all(_is_lstm_or_dense(layer) for layer in site.network.layers):
        raise SecAggError("'repair' corrects LSTM and Dense units only (a GRU's state enters its candidate gate "
                          "through the reset gate, so an affine correction cannot be folded in)")
    if "regmean" in parts and not all(_is_lstm_or_dense(layer) for layer in site.network.layers):
        raise SecAggError("'regmean' merges LSTM and Dense layers only (a GRU's candidate gate is not a linear map "
                          "of [x, h, 1], so RegMean would change the function); use align+readout or auto")
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
        elif part == "readout":
            net = yield from readout(site, net if net is not None else (yield from mean(site)))
    return net


_STAGE = {"mean": 0, "align": 0, "init": 0, "regmean": 1, "fisher": 1, "repair": 2, "readout": 3}


def auto(site: Site) -> SiteProtocol:
    """Secure model selection among one-shot candidates; returns (network, info)."""
    plain = yield from mean(site)
    aligned_avg = yield from align(site, reference=plain)
    candidates = {"mean": plain, "align": aligned_avg}
    if all(_is_lstm_or_dense(layer) for layer in site.network.layers):
        candidates["align+regmean"] = yield from regmean(site, site.aligned)
        candidates["align+repair"] = yield from repair(site, aligned_avg, site.aligned)
    refit = yield from readout_many(site, candidates, name="auto-readout")
    candidates.update({f"{k}+readout": v for k, v in refit.items()})
    scores = yield from score(site, candidates)
    best = min(scores, key=scores.get)
    return candidates[best], {"chosen": best, "scores": scores}


def common_init(site: Site, epochs: int = INIT_EPOCHS, warmup_rounds: int = INIT_WARMUP_ROUNDS) -> SiteProtocol:
    """Round 0 gives every site one fresh initialization; then ``warmup_rounds`` FedAvg
    rounds of one local epoch; then every site trains ``epochs`` epochs on its own; then the mean.

    Why the warm-up: from a shared but *random* start, separately trained LSTMs drift into
    different basins and their average is poor. After a little shared training, networks trained
    on from one point tend to stay linearly connected (Frankle et al. 2020, "Linear mode
    connectivity and the lottery ticket hypothesis"). Benchmark, seed 0, held-out nRMSE ÷ the
    output ensemble: no warm-up, 5 local epochs 1.45x; one warm-up round, 10 local epochs 1.03x.
    """
    if site.trainer is None:
        raise SecAggError("'init' needs local training, which this model format does not support")
    if site.reinit is None:
        raise SecAggError("'init' needs a way to draw a fresh initialization for this model format")
    if epochs < 1 or warmup_rounds < 0:
        raise SecAggError("'init' needs at least one local epoch and a non-negative number of warm-up rounds")
    # Every site draws the initialization from the same seed and contributes it with equal weight,
    # so the average is that initialization (even if a framework's seeding differed at one site)
    # and no round ever has a single contributor.
    fresh = site.reinit(site.network, 0)
    init = yield Exchange("init", fresh.to_tensors(), 1.0, privacy="public")
    start = site.rebuild(init)
    for r in range(warmup_rounds):
        local = site.trainer(start, site.x_train, site.y_train, 1, 100 + r)
        start = yield from mean(site, local, name=f"init-warmup{r + 1}", reference=start)
    local = site.trainer(start, site.x_train, site.y_train, epochs, 0)
    site.aligned = local  # this site's own model, in the common basin (for a following regmean/fisher)
    return (yield from mean(site, local, name="init-mean", reference=start))


# -- linear algebra helpers -------------------------------------------------------------------------


def _with_ones(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a, np.ones((len(a), 1))], axis=1)


def _ridge(gram: np.ndarray, cross: np.ndarray, ridge: float, bias_row: bool = True) -> np.ndarray:
    """Solve (G + lambda I') W = C, with no penalty on the last (bias) row if ``bias_row``."""
    d = len(gram)
    k = d - 1 if bias_row else d
    penalty = np.eye(d) * ridge * max(np.trace(gram[:k, :k]) / max(k, 1), 1e-12)
    if bias_row:
        penalty[-1, -1] = 0.0
    return np.linalg.solve(gram + penalty, cross)


def _is_lstm_or_dense(layer) -> bool:
    return getattr(layer, "kind", "lstm") == "lstm"


def _stacked(layer) -> np.ndarray:
    """A layer's linear map as one matrix over its input rows [x, h, 1] (recurrent) or [x, 1] (dense)."""
    from secagg.merge.network import Recurrent

    if isinstance(layer, Recurrent):
        bias = layer.bias + (layer.recurrent_bias if layer.recurrent_bias is not None else 0.0)
        return np.concatenate([layer.kernel, layer.recurrent_kernel, bias[None, :]], axis=0)
    bias = layer.bias if layer.bias is not None else np.zeros(layer.kernel.shape[1])
    return np.concatenate([layer.kernel, bias[None, :]], axis=0)


def _unstacked(layer, w: np.ndarray):
    """Inverse of :func:`_stacked`; a torch-style second bias is folded into the first (same function for LSTM)."""
    from secagg.merge.network import Recurrent

    if isinstance(layer, Recurrent):
        n_in = layer.kernel.shape[0]
        units = layer.recurrent_kernel.shape[0]
        rb = None if layer.recurrent_bias is None else np.zeros_like(layer.recurrent_bias)
        return dataclasses.replace(layer, kernel=w[:n_in], recurrent_kernel=w[n_in : n_in + units], bias=w[-1],
                                   recurrent_bias=rb)
    return dataclasses.replace(layer, kernel=w[:-1], bias=w[-1] if layer.bias is not None else None)
