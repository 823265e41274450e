"""``secagg simulate``: run a merge method on several sites' models and data, on the real path.

One process plays every site, but nothing is short-cut: a real aggregator listens on loopback
with a fresh federation key, every exchange is a round, every contribution is encrypted,
submitted over gRPC, summed under encryption and decrypted. Each site's protocol sees only its own
model, its own data and the decrypted averages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from secagg.errors import ModelFormatError, PrivacyError, SecAggError
from secagg.merge import training
from secagg.merge.methods import ALIGN_ITERATIONS, INIT_EPOCHS, INIT_WARMUP_ROUNDS, Site, check_method, run_method
from secagg.merge.protocol import Federation, StepRecord
from secagg.models import write_model


@dataclasses.dataclass
class SimulationResult:
    """The global model and what it took to build it."""

    method: str
    tensors: dict[str, np.ndarray]
    network: object | None
    out: Path | None
    steps: list[StepRecord]
    chosen: dict
    dp: object | None = None  # the DPConfig of every weight exchange, if any
    epsilon: float | None = None  # client-level epsilon over the weight exchanges (None with statistics releases)
    row_epsilon: float | None = None  # row-level epsilon over every DP release (weights and statistics)


def load_site_data(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (samples, timesteps, features) and ``y`` (samples, outputs) from a DATA npz."""
    try:
        with np.load(path, allow_pickle=False) as data:
            x, y = np.asarray(data["x"], dtype=np.float64), np.asarray(data["y"], dtype=np.float64)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelFormatError(f"{path}: a site's data must be an .npz with arrays 'x' and 'y' ({exc})") from exc
    if x.ndim != 3:
        raise ModelFormatError(f"{path}: 'x' must be (samples, timesteps, features), got shape {x.shape}")
    y = y.reshape(len(y), -1)
    if len(x) != len(y):
        raise ModelFormatError(f"{path}: 'x' has {len(x)} samples but 'y' has {len(y)}")
    return x, y


def simulate(
    method: str,
    sites: Sequence[tuple[str | Path, str | Path]],
    out: str | Path | None = None,
    finetune_rounds: int = 0,
    finetune_epochs: int = 1,
    seed: int = 0,
    workdir: str | Path | None = None,
    init_epochs: int = INIT_EPOCHS,
    init_warmup: int = INIT_WARMUP_ROUNDS,
    dp=None,
    torch_module=None,
    torch_kwargs=None,
    progress: Callable[[str, str], None] | None = None,
    masking: bool = False,
    same_architecture: bool = False,
    stats_clip: float | None = None,
) -> SimulationResult:
    """Merge the sites' models with ``method`` through a real loopback aggregator.

    ``sites``: (model file, data npz) per site; all models of one architecture and format.
    Writes the global model to ``out`` (same format as the sites' models) if given.
    ``init_epochs`` and ``init_warmup`` shape ``init`` (:func:`secagg.merge.methods.common_init`).
    ``dp`` (a :class:`secagg.privacy.DPConfig`): client-level DP on every exchange of model weights
    (methods mean, align, init and fine-tune rounds) and row-level DP on the statistics of readout,
    hybrid and linear (:mod:`secagg.privacy.statistics`), all at ``dp``'s noise multiplier; other
    methods exchange statistics DP does not cover and are refused (:func:`dp_releases`).
    ``torch_module``/``torch_kwargs``: the sites' ``nn.Module`` for PyTorch state dicts
    (:mod:`secagg.models.framework`). ``progress(step, detail)`` is told as every step starts.
    ``masking``: every exchange is a masked round (:class:`secagg.merge.protocol.Federation`).
    ``same_architecture``: ``auto`` keeps to the sites' architecture (no hybrid or linear model).
    ``stats_clip``: with ``dp``, the bound on one statistics row's ``||r||^2`` (default 2 x its width).
    """
    if len(sites) < 2:
        raise SecAggError("simulate needs at least two --site MODEL DATA pairs")
    check_method(method, finetune_rounds)
    model_paths = [Path(m) for m, _ in sites]
    suffixes = {training.family(p) for p in model_paths}
    if len(suffixes) != 1:
        raise ModelFormatError("all sites' models must be of one format (all Keras or all PyTorch)")
    states = []
    for i, (model_path, data_path) in enumerate(sites):
        if progress:
            progress("load", f"site {i + 1} of {len(sites)}: {Path(model_path).name}, checked against its framework")
        states.append(load_site(f"site{i}", model_path, data_path, seed + i, torch_module, torch_kwargs,
                                report=progress if i == 0 else None))
    _check_same_architecture(states, model_paths)
    for state in states:
        state.stats_dp = dp is not None  # readout/hybrid/linear statistics: rows clipped, noised (row-level DP)
        state.stats_clip = stats_clip
    releases = dp_releases(method, finetune_rounds, init_warmup) if dp is not None else None
    with Federation(workdir, dp=dp, masking=masking) as federation:
        results = federation.run({s.name: run_method(s, method, finetune_rounds, finetune_epochs, init_epochs, init_warmup,
                                                         same_architecture) for s in states})
        steps = list(federation.steps)
    model, info = results[states[0].name]
    tensors, network, written = write_result(method, model, states[0], model_paths[0], out)
    eps = row_eps = None
    if releases is not None:
        eps = releases.site_epsilon(dp.noise_multiplier, dp.delta)
        row_eps = releases.row_epsilon(dp.noise_multiplier, dp.delta)
    return SimulationResult(method, tensors, network, written, steps, info, dp, eps, row_eps)


#: Bases whose every exchange is model weights (or public), so client-level DP covers them, and their
#: number of weight exchanges (init's depends on its warm-up rounds).
DP_METHODS = {"mean": 1, "align": ALIGN_ITERATIONS + 1, "init": None}
#: Closed-form heads whose one statistics exchange gets row-level DP (secagg.privacy.statistics).
DP_HEADS = ("readout", "hybrid")


@dataclasses.dataclass(frozen=True)
class Releases:
    """The DP releases of a method: Gaussian mechanisms on weights (site-level) and on statistics (row-level)."""

    weights: int
    rows: int

    def site_epsilon(self, noise_multiplier: float, delta: float) -> float | None:
        """Client-level epsilon: over the weight releases only (None if there are statistics releases,
        which have no site-level guarantee, or no release at all)."""
        from secagg.privacy.accountant import epsilon

        return epsilon([noise_multiplier] * self.weights, delta) if self.weights and not self.rows else None

    def row_epsilon(self, noise_multiplier: float, delta: float) -> float:
        """Row-level epsilon over every release. Removing one row moves a site's clipped weight update by up
        to 2C (it is re-clipped), so a weight release counts as noise multiplier z / 2 for one row."""
        from secagg.privacy.accountant import epsilon

        return epsilon([noise_multiplier / 2] * self.weights + [noise_multiplier] * self.rows, delta)

    @property
    def row_equivalent(self) -> int:
        """Releases at noise multiplier z with the same row-level epsilon (a z/2 release counts 4 times)."""
        return 4 * self.weights + self.rows


def dp_releases(method: str, finetune_rounds: int = 0, init_warmup: int = INIT_WARMUP_ROUNDS) -> Releases:
    """How many DP releases ``method`` makes, or a PrivacyError for a method DP does not cover."""
    parts = method.split("+")
    base, head = parts[0], parts[-1]
    covered = (parts == ["linear"] or (len(parts) == 1 and (base in DP_METHODS or base in DP_HEADS))
               or (len(parts) == 2 and base in DP_METHODS and head in DP_HEADS))
    if not covered:
        raise PrivacyError(
            f"DP covers exchanges of model weights (mean, align, init, fine-tune rounds) and the statistics of "
            f"readout, hybrid and linear; method {method!r} also exchanges statistics (Gram matrices, activation "
            f"moments, scores) that this version does not privatize. With DP use one of mean, align, init, linear, "
            f"readout, hybrid or a base+head pipeline such as align+hybrid (plus --finetune-rounds)"
        )
    if parts == ["linear"]:
        return Releases(0, 1)
    if base in DP_HEADS:  # readout or hybrid alone: on the plain mean
        base = "mean"
    weights = (init_warmup + 1 if base == "init" else DP_METHODS[base]) + finetune_rounds
    heads = (1 if head in DP_HEADS else 0) * (2 if finetune_rounds else 1)  # refit after fine-tuning
    return Releases(weights, heads)


def dp_exchanges(method: str, finetune_rounds: int = 0, init_warmup: int = INIT_WARMUP_ROUNDS) -> int:
    """Releases at one noise multiplier with the method's epsilon: the weight releases for a method of weights
    only (client-level), else the row-level equivalent count (:attr:`Releases.row_equivalent`)."""
    r = dp_releases(method, finetune_rounds, init_warmup)
    return r.weights if not r.rows else r.row_equivalent


def _check_same_architecture(states: list[Site], paths: list[Path]) -> None:
    from secagg.packing import ModelSpec

    first = ModelSpec.of(states[0].network.to_tensors())
    for state, path in zip(states[1:], paths[1:]):
        spec = ModelSpec.of(state.network.to_tensors())
        if not first.matches(spec):  # by structure: layer names may differ (Keras numbers them lstm, lstm_1, ...)
            raise ModelFormatError(
                f"{path} does not match {paths[0]} {first.describe_difference(spec, str(paths[0]), str(path))}. "
                "Names may differ; the layers must be the same kinds and sizes in the same order: build every site's "
                "model with the same code"
            )
    for state, path in zip(states, paths):
        if state.x.shape[1:] != states[0].x.shape[1:]:
            raise ModelFormatError(f"{path}: its data windows {state.x.shape[1:]} differ from the first site's "
                                   f"{states[0].x.shape[1:]}")


def load_site(name: str, model_path: str | Path, data_path: str | Path, seed: int = 0, torch_module=None,
              torch_kwargs=None, report: Callable[[str, str], None] | None = None) -> Site:
    """A site's protocol state from its model file and DATA npz.

    The model's numpy view is checked against its framework on the site's own data before anything
    is exchanged (:func:`secagg.merge.network.open_model`); the site keeps the framework model to
    check every model it is about to score or release.
    """
    from secagg.merge.network import open_model

    x, y = load_site_data(data_path)
    model = open_model(model_path, torch_module, torch_kwargs, x)
    trainer = training.Trainer(model.framework, seed=seed)
    net = model.network
    return Site(name, net, x, y, rebuild=trainer.rebuild(net), trainer=trainer.train, reinit=trainer.reinit,
                fisher_info=trainer.fisher, check=model.check, report=report)


def write_result(method: str, model, site: Site, template: Path, out: str | Path | None):
    """(tensors, network or None, written path or None) for a method's result.

    A hybrid or linear model (method ``hybrid`` pipelines, ``linear``, or ``auto``'s choice) is written
    by :mod:`secagg.merge.head_files` and, for Keras, loaded back and checked against secagg's forward
    pass on this site's data.
    """
    from secagg.merge.heads import HybridModel, LinearModel

    if isinstance(model, (HybridModel, LinearModel)):
        from secagg.merge import head_files

        written = head_files.write_head_model(Path(template), model, site.x.shape[1:], out) if out else None
        if written is not None:
            head_files.check_written(written, model, site.x_val)
        if isinstance(model, LinearModel):
            return {"kernel": model.kernel, "bias": np.asarray(model.bias)}, model, written
        return {**model.base.to_tensors(), "skip": model.skip}, model, written
    tensors = model.to_tensors()
    return tensors, model, (write_model(template, tensors, out) if out else None)
