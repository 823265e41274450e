"""Deployment mode: each site runs its own process against a real aggregator (``secagg merge``/``scaler``)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

import secagg
from secagg.merge.remote import run_protocol
from secagg.merge.scaling import shared_scaler


@pytest.mark.slow
def test_three_site_processes_build_the_same_global_model(serve_process, cli_popen, keypair, keras_sites, simulated,
                                                           mh, tmp_path):
    server = serve_process(state_dir=tmp_path / "state")
    procs = [
        cli_popen("merge", "--server", server.address, "--round", "m1", "--key", str(keypair.client),
                  "--client-id", f"site{i}", "--model", str(s.model), "--data", str(s.data),
                  "--method", "align+readout", "--clients", "3", "--wait", "120", "--out", str(tmp_path / f"g{i}.keras"),
                  # Training counts of a few hundred: a max weight close to them keeps the release grid
                  # (secagg.release) as fine as the simulation's, which sizes it the same way.
                  "--max-weight", "512")
        for i, s in enumerate(keras_sites)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
        assert json.loads(out)["method"] == "align+readout"
    globals_ = [mh.read_tensors(tmp_path / f"g{i}.keras") for i in range(3)]
    # Every site decrypted the same encrypted sums, so every site holds exactly the same global model.
    for other in globals_[1:]:
        assert all(np.array_equal(globals_[0][k], other[k]) for k in globals_[0])
    # Each step was a closed round on the aggregator with all three sites in it.
    for step in ("m1.0.align0", "m1.1.align1", "m1.2.align2", "m1.3.readout"):
        status = secagg.round_status(server.address, step)
        assert status.state == "closed" and status.clients == ("site0", "site1", "site2")
    # And it is the model the one-process simulation builds (up to CKKS noise amplified by the ridge solve).
    reference = simulated(keras_sites, "align+readout")
    x = keras_sites[0].x[-64:]
    np.testing.assert_allclose(mh.keras_predict(tmp_path / "g0.keras", x), reference.network.forward(x), atol=1e-4)


@pytest.mark.slow
def test_torch_site_processes_name_their_module(serve_process, cli_popen, keypair, torch_sites, mh, tmp_path):
    """PyTorch sites run `secagg merge` with --torch-model/--torch-kwargs: the state dict alone is not a model."""
    server = serve_process(state_dir=tmp_path / "state")
    sites = torch_sites  # the aggregator releases no sum of fewer than 3 contributions
    torch_args = ["--torch-model", mh.TORCH_MODULE, "--torch-kwargs", json.dumps(mh.torch_kwargs())]
    procs = [
        cli_popen("merge", "--server", server.address, "--round", "t1", "--key", str(keypair.client),
                  "--client-id", f"site{i}", "--model", str(s.model), "--data", str(s.data), *torch_args,
                  "--method", "mean", "--clients", "3", "--wait", "120", "--out", str(tmp_path / f"g{i}.pt"))
        for i, s in enumerate(sites)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
        assert json.loads(out)["method"] == "mean"
    # The training-count weighted average of the sites' state dicts, in the file's own names and order.
    tensors = [mh.read_tensors(s.model) for s in sites]
    w = np.array([len(s.x_train) for s in sites], np.float64)
    for i in range(3):
        got = mh.read_tensors(tmp_path / f"g{i}.pt")
        assert list(got) == list(tensors[0])
        for name in got:
            want = sum(wi * t[name] for wi, t in zip(w, tensors)) / w.sum()
            assert float(np.max(np.abs(got[name] - want))) <= 1e-6, name
    x = sites[0].x_val
    np.testing.assert_allclose(mh.torch_predict(tmp_path / "g0.pt", x), mh.lstm_forward(got, x), atol=1e-5)
    # Without the module a site stops before taking part, and says how to give it.
    proc = cli_popen("merge", "--server", server.address, "--round", "t2", "--key", str(keypair.client),
                     "--client-id", "site0", "--model", str(sites[0].model), "--data", str(sites[0].data),
                     "--method", "mean", "--clients", "3", "--wait", "5", "--out", str(tmp_path / "h.pt"))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "--torch-model" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "h.pt").exists()


def test_shared_scaler_equals_pooled_statistics(tmp_path):
    paths = secagg.keygen(tmp_path / "keys")
    key = secagg.load_client_key(paths.client)
    server = secagg.serve(paths.server, "127.0.0.1:0", tmp_path / "state")
    rng = np.random.default_rng(7)
    values = [rng.poisson(lam, size=(n, 2)).astype(float) for lam, n in ((20, 300), (200, 500), (900, 410))]
    results: dict[int, object] = {}

    def site(i: int) -> None:
        # Row counts are the weights: a max weight close to them keeps the release grid fine enough for 1e-6.
        results[i] = run_protocol(server.address, "s1", key, f"site{i}", shared_scaler(values[i], log1p=True), 3,
                                  wait=60, max_weight=512)

    try:
        threads = [threading.Thread(target=site, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        server.stop()
    assert sorted(results) == [0, 1, 2]
    pooled = np.log1p(np.concatenate(values))
    for scaler in results.values():
        np.testing.assert_allclose(scaler.mean, pooled.mean(axis=0), atol=1e-6)
        np.testing.assert_allclose(scaler.std, pooled.std(axis=0), atol=1e-6)
    # A value that is exactly at the pooled mean maps to 0 at every site.
    z = results[0].transform(np.expm1(pooled.mean(axis=0))[None, :])
    np.testing.assert_allclose(z, 0.0, atol=1e-6)


def test_out_of_order_pipeline_is_refused_before_any_round(keras_sites):
    from secagg.errors import SecAggError
    from secagg.merge.simulate import simulate

    with pytest.raises(SecAggError, match="out of order"):
        simulate("readout+align", [s.pair() for s in keras_sites])


@pytest.mark.slow
def test_masked_merge_sites_build_the_weighted_average(serve_process, cli_popen, keypair, keras_sites, mh, tmp_path):
    """`secagg merge --masking` under mutual TLS: every exchange is a masked round (secagg.masking)."""
    from secagg import certs

    ca = certs.init_ca(tmp_path / "pki")
    server_cert = certs.issue(tmp_path / "pki", "server", server=True)
    site_certs = [certs.issue(tmp_path / "pki", f"site{i}", admin=(i == 0)) for i in range(3)]  # site0 creates rounds
    server = serve_process(state_dir=tmp_path / "state", extra=(
        "--tls-cert", str(server_cert.cert), "--tls-key", str(server_cert.key), "--tls-ca", str(ca.cert)))
    procs = [
        cli_popen("merge", "--server", server.address, "--round", "mm", "--key", str(keypair.client),
                  "--client-id", f"site{i}", "--model", str(s.model), "--data", str(s.data), "--method", "mean",
                  "--clients", "3", "--wait", "120", "--max-weight", "512", "--masking",
                  "--tls-ca", str(ca.cert), "--tls-cert", str(site_certs[i].cert), "--tls-key", str(site_certs[i].key),
                  "--out", str(tmp_path / f"g{i}.keras"))
        for i, s in enumerate(keras_sites)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    globals_ = [mh.read_tensors(tmp_path / f"g{i}.keras") for i in range(3)]
    for other in globals_[1:]:
        assert all(np.array_equal(globals_[0][k], other[k]) for k in globals_[0])
    tls = secagg.ClientTLS(ca.cert, site_certs[1].cert, site_certs[1].key)
    rounds = [r for r in secagg.list_rounds(server.address, tls=tls) if r.round_id.startswith("mm.")]
    assert rounds and all(r.state == "closed" and r.submitted == 3 for r in rounds)
    for r in rounds:
        assert secagg.round_status(server.address, r.round_id, tls=tls).masking is not None
    tensors = [mh.read_tensors(s.model) for s in keras_sites]
    w = np.array([s.cut for s in keras_sites], np.float64)
    for name in globals_[0]:
        want = sum(wi * t[name].astype(np.float64) for wi, t in zip(w, tensors)) / w.sum()
        assert float(np.max(np.abs(globals_[0][name] - want))) <= 1e-6, name
