"""``secagg.merge.simulate``: every method through the real encrypted path, its output files, its errors.

Every simulation runs a real aggregator on loopback with a fresh key; each exchange of a method is
an encrypted round, recorded as a StepRecord. Results are cached per session (``simulated``), so
test_methods.py and this file share them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from secagg.errors import ModelFormatError, SecAggError
from secagg.merge.methods import run_method
from secagg.merge.protocol import Federation
from secagg.merge.simulate import load_site, simulate

AUTO_STEPS = ["mean", "align1", "align2", "regmean", "repair", "auto-heads", "score"]
ALIGN_STEPS = ["align0", "align1", "align2"]
METHOD_STEPS = {
    "mean": ["mean"],
    "align": ALIGN_STEPS,
    "readout": ["mean", "readout"],
    "align+readout": [*ALIGN_STEPS, "readout"],
    "align+regmean+readout": [*ALIGN_STEPS, "regmean", "readout"],
    "align+hybrid": [*ALIGN_STEPS, "hybrid"],
    "regmean": ["regmean"],
    "linear": ["linear"],
    "auto": AUTO_STEPS,
    "init": ["init", "init-warmup1", "init-mean"],
}


def finetune_steps(result, rounds: int) -> list[str]:
    """Fine-tune steps; a refit of the readout follows them when the pipeline (or auto's choice) ends in one."""
    head = result.chosen.get("head") if result.chosen else result.method.split("+")[-1]
    refit = [f"finetune-{head}"] if rounds and head in ("readout", "hybrid") else []
    return [f"finetune{r + 1}" for r in range(rounds)] + refit


def check_steps(result, want: list[str], sites: int = 3) -> None:
    assert [s.name for s in result.steps] == want
    for step in result.steps:
        # Every site contributes to every exchange.
        assert step.contributors == sites, step.name
        assert step.wire_bytes > 0 and step.num_params > 0, step.name
    assert len({s.round_id for s in result.steps}) == len(result.steps)  # one fresh round per exchange


def check_written_keras(mh, result, x: np.ndarray) -> None:
    assert result.out.is_file()
    np.testing.assert_allclose(mh.keras_predict(result.out, x), result.network.forward(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", list(METHOD_STEPS))
def test_every_method_runs_encrypted_and_writes_a_loadable_model(mh, simulated, keras_sites, method):
    result = simulated(keras_sites, method)
    check_steps(result, METHOD_STEPS[method])
    assert result.method == method
    x = np.concatenate([s.x_val for s in keras_sites])
    if method == "linear":
        kernel, bias = result.tensors["kernel"], result.tensors["bias"]
        want = x.reshape(len(x), -1) @ kernel + bias
        np.testing.assert_allclose(result.network.forward(x), want, atol=1e-12, rtol=0)
        np.testing.assert_allclose(mh.keras_predict(result.out, x), want, atol=1e-5, rtol=0)
        return
    check_written_keras(mh, result, x)
    if method == "align+hybrid" or (method == "auto" and result.chosen["head"] in ("hybrid", "linear")):
        return  # a model of its own architecture (tests/merge/test_hybrid.py); Keras ran it above
    # The written file holds exactly the result's tensors (the file's dtypes).
    got = mh.read_tensors(result.out)
    assert list(got) == list(result.tensors)
    for name, value in result.tensors.items():
        np.testing.assert_array_equal(got[name], value.astype(np.float64), err_msg=name)
    if method == "auto":
        assert result.chosen["chosen"] in result.chosen["scores"]["candidates"]
    else:
        assert result.chosen == {}


@pytest.mark.slow
def test_auto_with_a_finetune_round(mh, simulated, keras_sites):
    result = simulated(keras_sites, "auto", finetune_rounds=1)
    check_steps(result, [*AUTO_STEPS, *finetune_steps(result, 1)])
    check_written_keras(mh, result, keras_sites[0].x_val)
    # The fine-tune round trained locally from the chosen candidate: the model moved.
    chosen = simulated(keras_sites, "auto")
    assert result.chosen["chosen"] == chosen.chosen["chosen"]
    moved = max(float(np.max(np.abs(result.tensors[k] - chosen.tensors[k]))) for k in chosen.tensors)
    assert moved > 1e-4


def test_init_starts_every_site_from_one_initialization(mh, simulated, keras_sites):
    result = simulated(keras_sites, "init")
    init_step, warmup_step, mean_step = result.steps
    assert (init_step.contributors, warmup_step.contributors, mean_step.contributors) == (3, 3, 3)
    sizes = {init_step.num_params, warmup_step.num_params, mean_step.num_params}
    assert sizes == {sum(v.size for v in result.tensors.values())}
    # Not the average of the sites' own models: a fresh start, trained at the sites, averaged.
    plain = simulated(keras_sites, "mean")
    assert max(float(np.max(np.abs(result.tensors[k] - plain.tensors[k]))) for k in plain.tensors) > 0.05


@pytest.mark.parametrize("family", ["keras", "torch"])
def test_fresh_initialization_is_the_same_at_every_site(mh, family, keras_sites, torch_sites):
    """Every site draws the common start from the seed alone (Keras's own seeded initializers gave
    different values at different sites, and their average was a shrunken start)."""
    sites = keras_sites if family == "keras" else torch_sites
    loaded = [load_site(f"s{i}", *s.pair(), seed=i, **mh.torch_options(s.model)) for i, s in enumerate(sites)]
    fresh = [site.reinit(site.network, 0) for site in loaded]
    first = fresh[0].to_tensors()
    for other in fresh[1:]:
        for name, value in other.to_tensors().items():
            np.testing.assert_array_equal(value, first[name], err_msg=name)
    again = loaded[0].reinit(loaded[0].network, 1).to_tensors()
    assert any(not np.array_equal(again[k], first[k]) for k in first)  # the seed matters
    own = loaded[0].network.to_tensors()
    assert any(not np.array_equal(own[k], first[k]) for k in first)  # not the site's model
    # Keras defaults: LSTM forget-gate bias 1, other biases 0, orthogonal recurrent kernel.
    lstm = fresh[0].layers[0]
    units = lstm.recurrent_kernel.shape[0]
    f = lstm.gate_order.index("f")
    np.testing.assert_array_equal(lstm.bias[f * units:(f + 1) * units], 1.0)
    np.testing.assert_allclose(lstm.recurrent_kernel @ lstm.recurrent_kernel.T, np.eye(units), atol=1e-10)


def test_init_options(tmp_path, keras_sites):
    from secagg import cli
    from secagg.merge import methods

    # The CLI repeats the defaults so that it can start without the merge code: they must agree.
    assert (cli.INIT_EPOCHS, cli.INIT_WARMUP_ROUNDS) == (methods.INIT_EPOCHS, methods.INIT_WARMUP_ROUNDS)
    result = simulate("init", [s.pair() for s in keras_sites], tmp_path / "g.keras", init_epochs=1, init_warmup=0,
                      workdir=tmp_path / "w")
    assert [s.name for s in result.steps] == ["init", "init-mean"]
    with pytest.raises(SecAggError, match="at least one local epoch"):
        simulate("init", [s.pair() for s in keras_sites], tmp_path / "h.keras", init_epochs=0, workdir=tmp_path / "v")


def test_finetune_ends_with_a_readout_refit(mh, tmp_path, keras_sites):
    result = simulate("align+readout", [s.pair() for s in keras_sites], tmp_path / "g.keras", finetune_rounds=1,
                      workdir=tmp_path / "w")
    check_steps(result, [*ALIGN_STEPS, "readout", "finetune1", "finetune-readout"])
    check_written_keras(mh, result, keras_sites[0].x_val)


# -- PyTorch sites ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method,finetune", [("mean", 0), ("align", 0), ("auto", 0), ("auto", 1)])
def test_torch_sites(mh, simulated, torch_sites, method, finetune):
    result = simulated(torch_sites, method, finetune_rounds=finetune, suffix=".pt")
    steps = METHOD_STEPS[method] + finetune_steps(result, finetune)
    check_steps(result, steps)
    assert result.out.suffix == ".pt"
    x = np.concatenate([s.x_val for s in torch_sites])
    np.testing.assert_allclose(mh.torch_predict(result.out, x), result.network.forward(x), atol=1e-5, rtol=0)
    site_names = list(mh.read_tensors(torch_sites[0].model))
    if result.chosen and result.chosen["head"] == "hybrid":  # the sites' module under base., plus the skip
        assert list(mh.read_tensors(result.out)) == [*(f"base.{k}" for k in site_names), "skip.weight"]
    elif not result.chosen or result.chosen["head"] != "linear":
        assert list(mh.read_tensors(result.out)) == site_names
    if method == "auto":
        scores = result.chosen["scores"]["candidates"]
        assert result.chosen["chosen"] == min(scores, key=scores.get)
        assert result.chosen["scores"]["skipped"] == {}  # an LSTM: every candidate applies


# -- errors ----------------------------------------------------------------------------------------


def test_unknown_method(keras_sites):
    with pytest.raises(SecAggError, match=r"unknown merge method 'bogus'.*choose from mean, align"):
        simulate("bogus", [s.pair() for s in keras_sites[:2]])
    with pytest.raises(SecAggError, match=r"unknown merge method 'nope'"):
        simulate("align+nope+readout", [s.pair() for s in keras_sites[:2]])


def test_linear_cannot_be_combined(keras_sites):
    with pytest.raises(SecAggError, match="'linear' is a model of its own and cannot be combined"):
        simulate("linear+align", [s.pair() for s in keras_sites[:2]])


def test_auto_cannot_be_combined(keras_sites):
    with pytest.raises(SecAggError, match="'auto' chooses its own pipeline"):
        simulate("auto+readout", [s.pair() for s in keras_sites[:2]])


def test_pipeline_errors_come_before_any_round(tmp_path, keras_sites):
    """A pipeline that cannot finish fails at the start, with no encrypted round spent on it."""
    sites = [load_site(f"site{i}", *s.pair()) for i, s in enumerate(keras_sites[:2])]
    with Federation(tmp_path / "federation") as federation:
        for method, message in (("mean+auto", "'auto' chooses its own pipeline"), ("mean+bogus", "unknown merge"),
                                ("align+linear", "'linear' is a model of its own")):
            with pytest.raises(SecAggError, match=message):
                federation.run({s.name: run_method(s, method) for s in sites})
        assert federation.steps == []


@pytest.fixture(scope="module")
def gru_sites(tmp_path_factory, keras_sites):
    """Two sites with (untrained, differently initialized) PyTorch GRU regressors (GRU(4) -> Linear(1))."""
    import torch

    from secagg.merge import make_torch_regressor

    root = tmp_path_factory.mktemp("gru")
    sites = []
    for i, site in enumerate(keras_sites[:2]):
        torch.manual_seed(i)
        torch.save(make_torch_regressor(1, [GRU_UNITS], [1], kind="gru").state_dict(), root / f"gru{i}.pt")
        sites.append(type(site)(root / f"gru{i}.pt", site.data, site.x, site.y))
    return sites


GRU_UNITS = 4
REGMEAN_ALPHA = 0.9  # secagg.merge.methods.regmean's default, restated: the reference must not import it


def gru_options(mh) -> dict:
    return {"torch_module": mh.TORCH_MODULE, "torch_kwargs": mh.torch_kwargs(GRU_UNITS, "gru")}


def gru_module(tensors: dict[str, np.ndarray]):
    """PyTorch's own GRU regressor holding ``tensors``."""
    import torch

    from secagg.merge import make_torch_regressor

    module = make_torch_regressor(1, [GRU_UNITS], [1], kind="gru")
    module.load_state_dict({k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in tensors.items()})
    return module.eval()


def permuted_gru(tensors: dict[str, np.ndarray], q: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The GRU regressor's tensors with hidden unit j taken from unit q[j] (torch layout: 3 gate blocks of rows)."""
    q = np.asarray(q)
    rows = np.concatenate([k * GRU_UNITS + q for k in range(3)])
    return {"rnn.weight_ih_l0": tensors["rnn.weight_ih_l0"][rows],
            "rnn.weight_hh_l0": tensors["rnn.weight_hh_l0"][rows][:, q],
            "rnn.bias_ih_l0": tensors["rnn.bias_ih_l0"][rows], "rnn.bias_hh_l0": tensors["rnn.bias_hh_l0"][rows],
            "head.0.weight": tensors["head.0.weight"][:, q], "head.0.bias": tensors["head.0.bias"]}


def test_regmean_merges_gru(mh, tmp_path, gru_sites):
    """GRU layers are not linear maps: regmean averages them (after alignment) and solves the Dense layer."""
    import itertools

    import torch

    result = simulate("align+regmean", [s.pair() for s in gru_sites], tmp_path / "g.pt", workdir=tmp_path / "w",
                      **gru_options(mh))
    check_steps(result, [*ALIGN_STEPS, "regmean"], sites=2)
    got = mh.read_tensors(result.out)
    own = [mh.read_tensors(s.model) for s in gru_sites]
    n = np.array([len(s.x_train) for s in gru_sites], np.float64)
    gru_names = [k for k in got if k.startswith("rnn.")]
    # The GRU tensors are the training-count weighted average of the sites' models, each site's units in
    # the order that matches them (found here by trying every pair of unit orders).
    orders = list(itertools.permutations(range(GRU_UNITS)))
    best, aligned = np.inf, None
    for qs in itertools.product(orders, repeat=len(gru_sites)):
        models = [permuted_gru(t, q) for t, q in zip(own, qs)]
        diff = max(float(np.max(np.abs(sum(w * m[k] for w, m in zip(n, models)) / n.sum() - got[k])))
                   for k in gru_names)
        if diff < best:
            best, aligned = diff, models
    assert best <= 1e-6
    # The Dense layer is RegMean's: (alpha G + (1 - alpha) diag G + ridge)^-1 sum(G_i W_i) over the pooled Gram
    # matrices of its inputs [h, 1] (each aligned site model's GRU features on its training windows).
    grams, cross = [], []
    for site, tensors in zip(gru_sites, aligned):
        with torch.no_grad():
            out, _ = gru_module(tensors).rnn(torch.from_numpy(site.x_train.astype(np.float32)))
        h = mh.with_ones(out[:, -1].numpy().astype(np.float64))
        w = np.vstack([tensors["head.0.weight"].T, tensors["head.0.bias"][None]])
        grams.append(h.T @ h / len(h))
        cross.append(grams[-1] @ w)
    g = sum(wi * gi for wi, gi in zip(n, grams)) / n.sum()
    gw = sum(wi * c for wi, c in zip(n, cross)) / n.sum()
    shrunk = REGMEAN_ALPHA * g + (1 - REGMEAN_ALPHA) * np.diag(np.diag(g))
    want = np.linalg.solve(shrunk + mh.RIDGE * np.eye(len(g)) * np.trace(g) / len(g), gw)
    got_w = np.vstack([got["head.0.weight"].T, got["head.0.bias"][None]])
    np.testing.assert_allclose(got_w, want, atol=1e-5, rtol=0)
    plain = sum(wi * np.vstack([m["head.0.weight"].T, m["head.0.bias"][None]]) for wi, m in zip(n, aligned)) / n.sum()
    assert float(np.max(np.abs(want - plain))) > 1e-2  # RegMean is not the plain average here
    # PyTorch's own module runs the written file as the merged network computes.
    x = gru_sites[0].x_val
    with torch.no_grad():
        framework = gru_module(got)(torch.from_numpy(x.astype(np.float32))).numpy()
    np.testing.assert_allclose(result.network.forward(x), framework, atol=1e-5)


def test_auto_on_gru_includes_regmean_and_skips_repair(mh, gru_sites):
    result = simulate("auto", [s.pair() for s in gru_sites], **gru_options(mh))
    check_steps(result, ["mean", "align1", "align2", "regmean", "auto-heads", "score"], sites=2)
    report = result.chosen["scores"]
    nets = ("mean", "align", "align+regmean")
    assert {c.partition("@")[0] for c in report["candidates"]} == {
        *nets, *(f"{n}+{head}" for n in nets for head in ("readout", "hybrid")), "linear"}
    assert report["dropped"] == {}
    assert set(report["skipped"]) == {"align+repair"}
    assert "GRU" in report["skipped"]["align+repair"]
    assert result.chosen["chosen"] == min(report["candidates"], key=report["candidates"].get)


def test_fewer_than_two_sites(keras_sites):
    with pytest.raises(SecAggError, match="at least two"):
        simulate("mean", [keras_sites[0].pair()])
    with pytest.raises(SecAggError, match="at least two"):
        simulate("mean", [])


def test_mismatched_architectures(mh, tmp_path, keras_sites):
    other = mh.keras_model(units=5)
    other.save(tmp_path / "lstm5.keras")
    sites = [keras_sites[0].pair(), (str(tmp_path / "lstm5.keras"), str(keras_sites[1].data))]
    with pytest.raises(ModelFormatError, match=r"architecture.*lstm/lstm_cell/kernel"):
        simulate("mean", sites)


def test_a_contribution_beyond_the_steps_bound_is_refused_in_the_merges_terms(mh, tmp_path, keras_sites):
    """A weight beyond 100 cannot travel in a weight exchange: the error names the step and the site, and does not
    advise --value-bound, which simulate does not have."""
    from secagg.models import read_model, write_model

    tensors = read_model(keras_sites[0].model)
    name = next(iter(tensors))
    big = dict(tensors)
    big[name] = tensors[name].copy()
    big[name].flat[0] = 500.0
    path = write_model(keras_sites[0].model, big, tmp_path / "big.keras")
    sites = [(str(path), str(keras_sites[0].data))] + [s.pair() for s in keras_sites[1:]]
    with pytest.raises(SecAggError) as info:
        simulate("mean", sites, workdir=tmp_path / "work")
    message = str(info.value)
    assert "merge step 'mean'" in message and "site0" in message and "500" in message
    assert "--value-bound" not in message


def test_mixed_model_formats(keras_sites, torch_sites):
    with pytest.raises(ModelFormatError, match="one format"):
        simulate("mean", [keras_sites[0].pair(), torch_sites[1].pair()])


def test_bad_site_data(mh, tmp_path, keras_sites):
    site = keras_sites[0]
    np.savez(tmp_path / "no_y.npz", x=site.x)
    with pytest.raises(ModelFormatError, match=r"no_y.npz: a site's data must be an .npz with arrays 'x' and 'y'"):
        simulate("mean", [site.pair(), (str(site.model), str(tmp_path / "no_y.npz"))])
    np.savez(tmp_path / "flat.npz", x=site.x[:, :, 0], y=site.y)
    with pytest.raises(ModelFormatError, match=r"'x' must be \(samples, timesteps, features\)"):
        simulate("mean", [site.pair(), (str(site.model), str(tmp_path / "flat.npz"))])
    np.savez(tmp_path / "short_y.npz", x=site.x, y=site.y[:-3])
    with pytest.raises(ModelFormatError, match=f"'x' has {len(site.x)} samples but 'y' has {len(site.y) - 3}"):
        simulate("mean", [site.pair(), (str(site.model), str(tmp_path / "short_y.npz"))])


def test_unreadable_model(tmp_path, keras_sites):
    (tmp_path / "m.npz").write_bytes(b"")
    with pytest.raises(ModelFormatError, match="Keras .*PyTorch"):
        simulate("mean", [(str(tmp_path / "m.npz"), str(keras_sites[0].data)), keras_sites[1].pair()])


# -- the command -----------------------------------------------------------------------------------


def site_args(sites) -> list[str]:
    return [a for s in sites for a in ("--site", *s.pair())]


@pytest.mark.slow
def test_cli_simulate(mh, cli, tmp_path, keras_sites):
    out = tmp_path / "global.keras"
    proc = cli("simulate", "--method", "mean", "--out", str(out), *site_args(keras_sites))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["method"] == "mean" and report["out"] == str(out) and report["chosen"] == {}
    assert [s["name"] for s in report["steps"]] == ["mean"] and report["steps"][0]["wire_bytes"] > 0
    # The file is the training-count weighted average of the sites' models.
    tensors = [mh.read_tensors(s.model) for s in keras_sites]
    w = np.array([len(s.x_train) for s in keras_sites], np.float64)
    got = mh.read_tensors(out)
    for name in tensors[0]:
        want = sum(wi * t[name] for wi, t in zip(w, tensors)) / w.sum()
        assert float(np.max(np.abs(got[name] - want))) <= 1e-6, name


@pytest.mark.slow
def test_cli_simulate_errors(cli, tmp_path, keras_sites):
    proc = cli("simulate", "--quiet", "--method", "bogus", "--out", str(tmp_path / "g.keras"),
               *site_args(keras_sites[:2]))
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("secagg: error: unknown merge method 'bogus'"), proc.stderr
    assert not (tmp_path / "g.keras").exists()
    # Without --quiet, progress lines come first; the error is still one line, the last.
    proc = cli("simulate", "--method", "bogus", "--out", str(tmp_path / "g.keras"), *site_args(keras_sites[:2]))
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("secagg: error: unknown merge method 'bogus'"), proc.stderr
    assert sum(line.startswith("secagg: error:") for line in lines) == 1
    assert not (tmp_path / "g.keras").exists()


def torch_cli_args(mh) -> list[str]:
    return ["--torch-model", mh.TORCH_MODULE, "--torch-kwargs", json.dumps(mh.torch_kwargs())]


@pytest.mark.slow
def test_cli_simulate_torch(mh, cli, tmp_path, torch_sites):
    """PyTorch sites through the command: the module is named with --torch-model and built with --torch-kwargs."""
    out = tmp_path / "global.pt"
    proc = cli("simulate", "--method", "mean", "--out", str(out), *torch_cli_args(mh), *site_args(torch_sites))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["method"] == "mean" and report["out"] == str(out)
    tensors = [mh.read_tensors(s.model) for s in torch_sites]
    w = np.array([len(s.x_train) for s in torch_sites], np.float64)
    got = mh.read_tensors(out)
    assert list(got) == list(tensors[0])
    for name in tensors[0]:
        want = sum(wi * t[name] for wi, t in zip(w, tensors)) / w.sum()
        assert float(np.max(np.abs(got[name] - want))) <= 1e-6, name
    x = torch_sites[0].x_val
    np.testing.assert_allclose(mh.torch_predict(out, x), mh.lstm_forward(got, x), atol=1e-5)


@pytest.mark.slow
def test_cli_simulate_torch_needs_the_module(mh, cli, tmp_path, torch_sites):
    proc = cli("simulate", "--quiet", "--method", "mean", "--out", str(tmp_path / "g.pt"), *site_args(torch_sites[:2]))
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("secagg: error: ") and "--torch-model" in lines[0], proc.stderr
    proc = cli("simulate", "--method", "mean", "--out", str(tmp_path / "g.pt"), "--torch-model", mh.TORCH_MODULE,
               "--torch-kwargs", "[1, 2]", *site_args(torch_sites[:2]))
    assert proc.returncode == 1 and "--torch-kwargs must be a JSON object" in proc.stderr
    assert not (tmp_path / "g.pt").exists()


def test_torch_sites_need_the_module(torch_sites):
    with pytest.raises(ModelFormatError, match="--torch-model"):
        simulate("mean", [s.pair() for s in torch_sites[:2]])


def test_repair_refuses_gru(mh, tmp_path, gru_sites):
    with pytest.raises(SecAggError, match=r"'repair' corrects chains of LSTM and Dense layers only, not GRU\(4\)"):
        simulate("align+repair", [s.pair() for s in gru_sites], workdir=tmp_path / "w", **gru_options(mh))
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").rglob("round.json"))  # before any round


# -- client-level DP ---------------------------------------------------------------------------------


def test_simulate_with_dp(mh, tmp_path, keras_sites):
    from secagg.privacy.accountant import epsilon
    from secagg.privacy.mechanism import DPConfig

    pairs = [s.pair() for s in keras_sites]
    plain = simulate("mean", pairs, tmp_path / "plain.keras", workdir=tmp_path / "w0")
    dp = DPConfig(clip_norm=0.5, noise_multiplier=2.0, delta=1e-5, mode="distributed", min_honest=3)
    noisy = simulate("mean", pairs, tmp_path / "dp.keras", workdir=tmp_path / "w1", dp=dp)
    assert noisy.epsilon == pytest.approx(epsilon([2.0], 1e-5))
    # Equal weights, clipped to 0.5, noised with std z*C/3 per coordinate of the mean: far from the plain mean.
    diff = np.concatenate([(noisy.tensors[k] - plain.tensors[k]).ravel() for k in plain.tensors])
    assert 0.2 < float(np.std(diff)) < 0.5
    # init + a fine-tune round: 1 warm-up + 1 final mean + 1 fine-tune = 3 DP releases.
    result = simulate("init", pairs, tmp_path / "i.keras", workdir=tmp_path / "w2", dp=dp, finetune_rounds=1,
                      init_epochs=1)
    assert result.epsilon == pytest.approx(epsilon([2.0] * 3, 1e-5))
    check_written_keras(mh, result, keras_sites[0].x_val)


def test_dp_refuses_methods_that_exchange_statistics(tmp_path, keras_sites):
    from secagg.errors import PrivacyError
    from secagg.privacy.mechanism import DPConfig

    dp = DPConfig(1.0, 1.0, 1e-5, "distributed", 3)
    with pytest.raises(PrivacyError, match="statistics"):
        simulate("auto", [s.pair() for s in keras_sites], tmp_path / "a.keras", workdir=tmp_path / "w", dp=dp)
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").rglob("round.json"))


@pytest.mark.slow
def test_masked_simulation_gives_the_same_model(mh, simulated, keras_sites, tmp_path):
    """simulate(masking=True): every exchange a masked round (mutual TLS, a thread per site); same result."""
    from secagg.merge.simulate import simulate

    plain = simulated(keras_sites, "align+readout")
    masked = simulate("align+readout", [(s.model, s.data) for s in keras_sites], tmp_path / "m.keras", masking=True)
    assert [s.name for s in masked.steps] == [s.name for s in plain.steps]
    x = keras_sites[0].x_val
    # The same sums, decrypted and released on the same grid (CKKS noise differs between runs, amplified
    # by the ridge solve of the readout).
    np.testing.assert_allclose(mh.keras_predict(masked.out, x), mh.keras_predict(plain.out, x), atol=1e-4)
