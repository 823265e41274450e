"""A masked round played without a network: real certificates, real X25519/AES/Shamir, the aggregator's own stage machine."""

from __future__ import annotations

import numpy as np
import pytest

from secagg import certs
from secagg.contribution import Terms, round_settings
from secagg.masking.prg import add_mod, sub_mod
from secagg.masking.settings import MaskSettings
from secagg.masking.site import MaskingSite
from secagg.masking.stages import MaskState
from secagg.masking.statements import Advertisement

Q = 1152921504606748673
N = 8192


@pytest.fixture(scope="session")
def site_pki(tmp_path_factory):
    """A federation CA with certificates for site0..site11 and an outsider CA's certificate for site1."""
    d = tmp_path_factory.mktemp("mask-pki")
    ca = certs.init_ca(d / "ca")
    sites = {f"site{i}": certs.issue(d / "ca", f"site{i}") for i in range(12)}
    other = certs.init_ca(d / "other")
    forged = certs.issue(d / "other", "site1")
    return ca, sites, forged


def terms(round_id: str = "m1", masking: dict | None = None, n: int = 4) -> Terms:
    settings = round_settings(n, 3, 1e5, 100.0, None, ()) | {"masking": masking or MaskSettings().to_dict()}
    return Terms("key0", round_id, "spec0", 3, settings)


class Played:
    """Drives sites and the aggregator's MaskState stage by stage, like the transport does."""

    def __init__(self, pki, n: int, settings: MaskSettings | None = None, cts: int = 3, min_clients: int = 3,
                 min_cohort: int = 3, round_id: str = "m1") -> None:
        ca, sites, _ = pki
        self.settings = settings or MaskSettings(stage_seconds=10)
        self.terms = terms(round_id, self.settings.to_dict(), n)
        self.ca_pem = ca.cert.read_bytes()
        self.names = [f"site{i}" for i in range(n)]
        self.sites = {name: MaskingSite(self.terms, name, self.settings, Q, self.ca_pem, sites[name].cert.read_bytes(),
                                        sites[name].key.read_bytes(), min_clients=min_clients, min_cohort=min_cohort)
                      for name in self.names}
        self.state = MaskState(self.settings, n, min_clients, stage_started=0.0)
        rng = np.random.default_rng(7)
        self.c0 = {name: [rng.integers(0, Q, N, dtype=np.uint64) for _ in range(cts)] for name in self.names}
        self.masked: dict[str, list[bytes]] = {}
        self.now = 0.0
        self.accepted: set[str] = set()

    def advance(self, late: bool = False) -> str | None:
        if late:
            self.now += self.settings.stage_seconds + 1
        return self.state.advance(self.now, self.accepted)

    def advertise(self, who=None) -> None:
        for name in who or self.names:
            self.state.post("advertise", name, self.sites[name].advertise().to_dict(), self.terms, self.ca_pem)

    def adverts(self, name: str) -> list[Advertisement]:
        return [Advertisement.from_dict(a) for a in self.state.view("advertise", name)["adverts"]]

    def share(self, who=None) -> None:
        for name in who or list(self.state.adverts):
            self.sites[name].join(self.adverts(name))
            boxes = self.sites[name].shares()
            self.state.post("share", name, {"boxes": {k: v.hex() for k, v in boxes.items()}}, self.terms, self.ca_pem)

    def submit(self, who=None) -> None:
        for name in who or list(self.state.boxes):
            boxes = self.state.view("share", name)["boxes"]
            self.sites[name].receive({k: bytes.fromhex(v) for k, v in boxes.items()})
            self.masked[name] = [self.sites[name].mask(i, row.astype("<u8").tobytes()) for i, row in enumerate(self.c0[name])]
            self.accepted.add(name)

    def confirm(self, who=None) -> None:
        survivors = self.state.view("submit", self.names[0])["survivors"]
        for name in who or survivors:
            sig = self.sites[name].sign_survivors(survivors)
            self.state.post("confirm", name, sig.to_dict(), self.terms, self.ca_pem)

    def unmask(self, who=None) -> None:
        from secagg.masking.statements import SurvivorsSignature

        survivors = self.state.view("submit", self.names[0])["survivors"]
        sigs = [SurvivorsSignature.from_dict(s) for s in self.state.view("confirm", self.names[0])["signatures"]]
        for name in who or sorted(self.state.signatures):
            self.state.post("unmask", name, self.sites[name].reveal(survivors, sigs), self.terms, self.ca_pem)

    def masked_sum(self) -> list[np.ndarray]:
        q = np.uint64(Q)
        out = []
        for i in range(len(next(iter(self.c0.values())))):
            row = np.zeros(N, dtype=np.uint64)
            for name in sorted(self.accepted):
                add_mod(row, np.frombuffer(self.masked[name][i], dtype="<u8"), q)
            out.append(row)
        return out

    def unmasked_sum(self) -> list[np.ndarray]:
        q = np.uint64(Q)
        rows = self.masked_sum()
        for sign, stream in self.state.removals(self.terms, Q):
            for i, row in enumerate(rows):
                (sub_mod if sign > 0 else add_mod)(row, stream.words(i, N), q)
        return rows

    def plain_sum(self, who) -> list[np.ndarray]:
        q = np.uint64(Q)
        rows = [np.zeros(N, dtype=np.uint64) for _ in self.c0[self.names[0]]]
        for name in who:
            for row, c0 in zip(rows, self.c0[name]):
                add_mod(row, c0, q)
        return rows

    def run(self) -> None:
        self.advertise(); assert self.advance() is None
        self.share(); assert self.advance() is None
        self.submit(); assert self.advance() is None
        self.confirm(); assert self.advance() is None
        self.unmask(); assert self.advance() is None
        assert self.state.stage == "done"


@pytest.fixture
def played(site_pki):
    return lambda n, **kw: Played(site_pki, n, **kw)
