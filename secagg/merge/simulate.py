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
    epsilon: float | None = None  # client-level epsilon over all DP exchanges (at dp.delta)


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
) -> SimulationResult:
    """Merge the sites' models with ``method`` through a real loopback aggregator.

    ``sites``: (model file, data npz) per site; all models of one architecture and format.
    Writes the global model to ``out`` (same format as the sites' models) if given.
    ``init_epochs`` and ``init_warmup`` shape ``init`` (:func:`secagg.merge.methods.common_init`).
    ``dp`` (a :class:`secagg.privacy.DPConfig`): client-level DP on every exchange of model weights
    (methods mean, align, init and fine-tune rounds; others exchange statistics DP does not cover).
    ``torch_module``/``torch_kwargs``: the sites' ``nn.Module`` for PyTorch state dicts
    (:mod:`secagg.models.framework`). ``progress(step, detail)`` is told as every step starts.
    ``masking``: every exchange is a masked round (:class:`secagg.merge.protocol.Federation`).
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
    exchanges = dp_exchanges(method, finetune_rounds, init_warmup) if dp is not None else 0
    with Federation(workdir, dp=dp, masking=masking) as federation:
        results = federation.run({s.name: run_method(s, method, finetune_rounds, finetune_epochs, init_epochs, init_warmup) for s in states})
        steps = list(federation.steps)
    model, info = results[states[0].name]
    tensors, network, written = write_result(method, model, states[0], model_paths[0], out)
    eps = None
    if dp is not None:
        from secagg.privacy.accountant import epsilon

        eps = epsilon([dp.noise_multiplier] * exchanges, dp.delta)
    return SimulationResult(method, tensors, network, written, steps, info, dp, eps)


#: Methods whose every exchange is model weights (or public), so client-level DP covers them, and
#: their number of weight exchanges (init's depends on its warm-up rounds).
DP_METHODS = {"mean": 1, "align": ALIGN_ITERATIONS + 1, "init": None}


def dp_exchanges(method: str, finetune_rounds: int = 0, init_warmup: int = INIT_WARMUP_ROUNDS) -> int:
    """How many DP releases ``method`` makes (each one a Gaussian mechanism on every site's weights)."""
    if method not in DP_METHODS:
        raise PrivacyError(
            f"client-level DP covers exchanges of model weights; method {method!r} also exchanges data statistics "
            f"(Gram matrices, features, scores) that this version does not privatize. With DP use one of "
            f"{', '.join(DP_METHODS)} (plus --finetune-rounds)"
        )
    base = init_warmup + 1 if method == "init" else DP_METHODS[method]
    return base + finetune_rounds


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
    """(tensors, network or None, written path or None) for a method's result."""
    if method == "linear":
        kernel, bias = model
        written = training.write_linear(Path(template), kernel, bias, site.x.shape[1:], out) if out else None
        return {"kernel": kernel, "bias": bias}, None, written
    tensors = model.to_tensors()
    return tensors, model, (write_model(template, tensors, out) if out else None)
