"""The aggregator's masked rounds (:mod:`secagg.masking`): stage messages, the stage machine's clock, unmasking.

A mixin of :class:`secagg.rounds.Aggregator`, kept apart so that the round core stays readable: it
uses the core's round table, lock discipline and close/fail paths, and adds what masked rounds need
on top: :meth:`MaskedRounds.mask_stage` (the ``MaskStage`` RPC), moving a round through its stages
at every message and tick, removing the masks before the round closes, and the stage journal
(``masking.log``: one fsynced JSON line per accepted message or stage change).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from secagg.envelope import check_id
from secagg.errors import AuthError, MaskingError, RoundStateError, SecAggError
from secagg.masking import stages as mask_stages

if TYPE_CHECKING:
    from secagg.rounds import _Round

log = logging.getLogger("secagg.aggregator")
# The core's round states (secagg.rounds), restated here to avoid an import cycle.
COLLECTING, CLOSED, FAILED = "collecting", "closed", "failed"


def read_journal(path: Path) -> list[dict]:
    """A masked round's journal; a torn last line (a crash mid-append, never acknowledged) is dropped."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    events = []
    for i, line in enumerate(lines):
        if not line:
            continue
        try:
            events.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:  # no newline after it: the append never completed
                break
            raise SecAggError(f"line {i + 1} of {path.name} is damaged") from None
    return events



class MaskedRounds:
    """Masked-round methods of :class:`secagg.rounds.Aggregator` (see the module docstring)."""

    def mask_stage(self, round_id: str, client_id: str, stage: str, payload: dict | None = None, wait: float = 0.0,
                   caller: str | None = None) -> tuple[bool, dict, str]:
        """Post ``client_id``'s message for a masked round's ``stage`` (if ``payload``), then wait up to ``wait``
        seconds for the stage to end. Returns (ended, what the client gets from it, the round's current stage).

        ``caller``: the authenticated client (mutual TLS); it may act only as itself. A failed round
        raises :class:`RoundStateError` with its reason, so that every waiting site learns why.
        """
        check_id("client", client_id)
        if stage not in mask_stages.ORDER[:-1]:
            raise MaskingError(f"unknown stage {stage!r}; the stages are {', '.join(mask_stages.ORDER[:-1])}")
        if caller is not None and caller != client_id:
            raise AuthError(f"certificate is for {caller!r} but the message claims client {client_id!r}")
        rnd = self._round(round_id)
        cfg = rnd.config
        if cfg.masking is None:
            raise MaskingError(f"round {round_id!r} is not masked; submit to it without the masking stages")
        if cfg.enrolled and client_id not in cfg.enrolled:
            raise AuthError(f"client {client_id!r} is not enrolled in round {round_id!r}")
        end = time.monotonic() + max(0.0, wait)
        with rnd.lock:
            self._apply_deadline(rnd)
            if payload is not None and rnd.state == CLOSED and client_id in rnd.clients_at_close:
                return True, {}, mask_stages.DONE  # its last message closed the round; the reply was lost
            if payload is not None:
                self._check_collecting(rnd)
                rnd.mask.post(stage, client_id, payload, cfg.terms(self.key.key_id), self.ca_pem)
                self._save_mask(rnd)
                self._advance_mask(rnd)
                rnd.changed.notify_all()  # whoever waits for this stage may now be served
            while True:
                self._apply_deadline(rnd)
                if rnd.state == CLOSED:
                    return True, {}, mask_stages.DONE
                self._check_collecting(rnd)
                view = rnd.mask.view(stage, client_id)
                left = end - time.monotonic()
                if view is not None or left <= 0:
                    return view is not None, view or {}, rnd.mask.stage
                rnd.changed.wait(min(left, 0.5))

    @staticmethod
    def _check_collecting(rnd: _Round) -> None:
        if rnd.state == FAILED:
            raise RoundStateError(f"round {rnd.config.round_id!r} failed: {rnd.reason}")
        if rnd.state != COLLECTING or rnd.mask is None:
            raise RoundStateError(f"round {rnd.config.round_id!r} is {rnd.state}; its masking stages are over")

    def _advance_mask(self, rnd: _Round) -> bool:
        """Move a masked round through every stage that is over; unmask and close it after the last one.

        True if anything changed (the caller, holding the round's lock, wakes whoever waits).
        """
        before = rnd.mask.stage
        why = rnd.mask.advance(self.clock(), set(rnd.accepted))
        if why is not None:
            self._fail(rnd, why)
            return True
        if rnd.mask.stage == mask_stages.DONE:
            try:
                self._unmask(rnd)
            except MaskingError as exc:
                self._fail(rnd, str(exc))
                return True
            self._close(rnd)
            return True
        if rnd.mask.stage != before:
            self._save_mask(rnd)
            log.info("masking stage", extra={"round": rnd.config.round_id, "stage": rnd.mask.stage})
            return True
        return False

    def _unmask(self, rnd: _Round) -> None:
        """Remove every mask left in the survivors' sum: what stays is the ordinary encrypted sum."""
        q = self.key.parameters.data_prime
        removals = rnd.mask.removals(rnd.config.terms(self.key.key_id), q)
        n = self.key.parameters.poly_modulus_degree
        for i in range(len(rnd.sum)):
            for sign, stream in removals:
                (rnd.sum.subtract if sign > 0 else rnd.sum.add)(i, stream.words(i, n))

    def _save_mask(self, rnd: _Round) -> None:
        """Append the stage machine's new events to the round's journal, durably (before any reply)."""
        if not rnd.mask.pending:
            return
        lines = "".join(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n" for e in rnd.mask.pending)
        with open(rnd.journal_path, "a") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
        rnd.mask.pending.clear()

