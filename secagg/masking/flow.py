"""A site's run through a masked round over the aggregator's ``MaskStage`` calls: what ``secagg submit`` does.

Encrypt first (the slow part, before any stage starts), then: advertise keys -> receive the cohort
and send shares -> receive shares, mask, submit -> sign the survivors -> reveal the shares the
aggregator needs. Each stage is waited for up to the round's stage timeout plus a margin; a round
that fails meanwhile raises with the aggregator's reason (who is missing).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from secagg.errors import MaskingError, RoundStateError
from secagg.masking.settings import MaskSettings
from secagg.masking.site import MaskingSite
from secagg.masking.stages import ADVERTISE, CONFIRM, SHARE, SUBMIT, UNMASK
from secagg.masking.statements import Advertisement, SurvivorsSignature

#: Seconds a site waits beyond the round's stage timeout before it gives up on a stage itself.
STAGE_MARGIN = 60.0
#: Longest single wait per call (the aggregator caps it at 30 s; short, so that waiting sites do not hold the
#: aggregator's worker threads for long).
POLL_SECONDS = 5.0

Report = Callable[[str, int, int], None]


def start(status, client_id: str, q: int, tls, min_cohort: int) -> MaskingSite:
    """This site's keys for the round, after checking the round's masking settings and that it can sign."""
    if tls is None or tls.cert is None:
        raise MaskingError(f"round {status.round_id!r} is masked: this site needs its certificate and key from the "
                           "federation's CA (--tls-ca, --tls-cert, --tls-key) to take part")
    settings = MaskSettings.from_dict(status.masking)
    settings.validate(status.expected)  # a threshold below a majority is refused here, whatever the aggregator says
    return MaskingSite(status.terms(), client_id, settings, q, tls.ca.read_bytes(), tls.cert.read_bytes(),
                       tls.key.read_bytes(), min_clients=status.min_clients, min_cohort=min_cohort,
                       enrolled=tuple(status.enrolled))


class StageCalls:
    """Posting to and waiting for one masked round's stages through ``call(stage, payload, wait)``."""

    def __init__(self, call: Callable[[str, dict | None, float], tuple[bool, dict, str]], settings: MaskSettings,
                 report: Report | None = None) -> None:
        self.call = call
        self.limit = settings.stage_seconds + STAGE_MARGIN
        self.report = report

    def run(self, stage: str, payload: dict | None) -> dict:
        """Post ``payload`` for ``stage`` (if any), then wait for its outcome."""
        end = time.monotonic() + self.limit
        ready, view, _ = self.call(stage, payload, min(POLL_SECONDS, self.limit))
        while not ready:
            left = end - time.monotonic()
            if left <= 0:
                raise RoundStateError(f"the aggregator did not end the {stage} stage within {self.limit:g} s; this site "
                                      "stops here (it revealed nothing it had not already sent)")
            ready, view, _ = self.call(stage, None, min(POLL_SECONDS, left))
        if self.report:
            self.report(f"masking: {stage}", 1, 1)
        return view


def exchange_keys(site: MaskingSite, calls: StageCalls) -> None:
    """Stages 1 and 2: advertise, check the cohort, send shares, open the shares received."""
    view = calls.run(ADVERTISE, site.advertise().to_dict())
    site.join([Advertisement.from_dict(a) for a in _list(view, "adverts")])
    boxes = site.shares()
    view = calls.run(SHARE, {"boxes": {k: v.hex() for k, v in boxes.items()}})
    received = view.get("boxes")
    if not isinstance(received, dict):
        raise MaskingError("the aggregator answered the share stage without boxes")
    try:
        site.receive({k: bytes.fromhex(v) for k, v in received.items()})
    except (TypeError, ValueError, AttributeError):
        raise MaskingError("the aggregator relayed a malformed box of shares") from None


def unmask(site: MaskingSite, calls: StageCalls) -> None:
    """Stage 4: check and sign the survivors, wait for the others' signatures, reveal the needed shares."""
    survivors = _list(calls.run(SUBMIT, None), "survivors")
    if not all(isinstance(s, str) for s in survivors):
        raise MaskingError("the aggregator's survivors are not a list of site ids")
    signatures = calls.run(CONFIRM, site.sign_survivors(survivors).to_dict())
    sigs = [SurvivorsSignature.from_dict(s) for s in _list(signatures, "signatures")]
    calls.call(UNMASK, site.reveal(survivors, sigs), 0.0)


def _list(view: dict, key: str) -> list:
    value = view.get(key)
    if not isinstance(value, list):
        raise MaskingError(f"the aggregator's answer lacks the list {key!r}")
    return value
