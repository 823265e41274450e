"""Rounds and the aggregator core: the round state machine and its durable store, transport-free.

A round is created ``collecting``; it becomes ``closed`` when every expected client submitted, or
at its deadline if at least ``min_clients`` did; otherwise at the deadline it becomes ``failed``.

State directory layout, one folder per round::

    rounds/<round_id>/round.json          config (with the federation key id) and state (atomically replaced)
    rounds/<round_id>/incoming/*.part     updates still streaming in (deleted on restart)
    rounds/<round_id>/accepted/<client>   accepted updates, the write-ahead log of the sum
    rounds/<round_id>/aggregate           the final encrypted sum with every contributor's seeds and record
    rounds/<round_id>/masking.json        a masked round's settings while it collects (secagg.masking.stages)
    rounds/<round_id>/masking.log         ... and the journal of its stage messages (appended, fsynced)
    rounds/<round_id>/QUARANTINE          why a damaged round was set aside (its files are kept)

An update is accepted when its file is renamed into ``accepted/``; only then does the client get
its acknowledgement. The running sum of first polynomials lives in memory (O(model), whatever the
number of clients) and is rebuilt from ``accepted/`` after a restart, so a SIGKILL at any moment
loses nothing acknowledged and counts nothing twice. Once a round closes its individual updates are
deleted: only the sum (and every contributor's seeds and record, which clients need to decrypt and
check it) is kept.

The core trusts nothing it stores: at start every accepted update is re-read and its digest
re-checked, every round's key id and DP settings are compared with the federation's key and
privacy ledger, and a round that fails any of it is quarantined (failed, with the reason, its
files kept for inspection) while every other round is served.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from secagg import envelope, store
from secagg.budget import PrivacyLedger
from secagg.contribution import Contribution, Terms, round_settings, seeds_digest
from secagg.envelope import Chunk, ChunkValidator, Header, check_id
from secagg.polys import SEED_BYTES, C0Sum, c0_bytes, parse_c0
from secagg.release import grid
from secagg.slots import VALUE_LIMIT, Bounds, num_ciphertexts
from secagg.errors import (
    AggregateCheckError,
    AuthError,
    CiphertextError,
    CohortError,
    DuplicateSubmissionError,
    EnvelopeError,
    KeyFileError,
    MaskingError,
    PrivacyError,
    RoundExistsError,
    RoundNotFoundError,
    RoundStateError,
    SecAggError,
)
from secagg.keys import ServerKey
from secagg.masked_rounds import MaskedRounds, read_journal
from secagg.masking import stages as mask_stages
from secagg.masking.settings import MaskSettings
from secagg.masking.stages import MaskState
from secagg.packing import ModelSpec
from secagg.privacy.mechanism import DPConfig

log = logging.getLogger("secagg.aggregator")

COLLECTING, CLOSED, FAILED = "collecting", "closed", "failed"
DEFAULT_MAX_WEIGHT = 1e5
DEFAULT_VALUE_BOUND = 100.0
#: No sum of fewer contributions is ever released: with K contributors, K-1 colluding sites subtract
#: their own updates from the sum and read the remaining one (with 2, each reads the other's model).
DEFAULT_MIN_COHORT = 3
#: Largest model a round may be created for. The running sum is allocated when the round is created
#: (8 bytes per parameter), so an unbounded spec from anyone allowed to create rounds could exhaust
#: memory, and again on every restart.
DEFAULT_MAX_PARAMS = 100_000_000


class RoundObserver:
    """Told about every round's transitions, e.g. to count them (``secagg.metrics``); by default ignores them.

    The core calls it while holding the round's lock, so a method must be quick and must not raise.
    ``seconds`` is the time since the round was created, None if that is unknown (a round created by
    an older version).
    """

    def round_created(self, round_id: str) -> None:
        """A round was created and is collecting."""

    def round_closed(self, round_id: str, contributions: int, seconds: float | None) -> None:
        """A round closed: its encrypted sum is final."""

    def round_failed(self, round_id: str, seconds: float | None) -> None:
        """A round failed: no sum is released."""


def write_update(part: Path, header: Header, chunks: Iterator[Chunk], c0_size: int) -> None:
    """Validate an update's chunks against its header and write it, synced, to ``part``.

    Runs outside any round's lock (in the aggregator's threads or in an ingest worker process): the
    envelope checks (order, sizes, SHA-256 digests) and the durable write; the coefficient range
    check and the addition come at commit. On any error the file is removed and the error raised.
    """
    validator = ChunkValidator(header, c0_size)
    writer = store.BlobWriter(part, {"client_id": header.client_id, "digest": header.digest.hex(),
                                     "contribution": header.contribution.to_dict()})
    try:
        for chunk in chunks:
            writer.write(validator.accept(chunk))
        validator.finish()
        # Durable before it counts, and synced before the round's lock is taken (commit), so that other
        # uploads to the round are not held up while the disk writes this one.
        writer.sync()
    except BaseException:
        writer.discard()
        raise


def ingest_update(header: Header, chunks: Iterator[Chunk], c0_size: int,
                  begin: Callable[[Header], tuple[Path | None, SubmitResult | None]],
                  commit: Callable[[Header, Path], SubmitResult]) -> SubmitResult:
    """The one way an update goes in: ``begin`` checks its header (:meth:`Aggregator.begin_upload`),
    :func:`write_update` writes it, ``commit`` adds it (:meth:`Aggregator.commit_upload`); the written
    file never outlives the call. In the aggregator's process the two are its core's methods; in an
    ingest worker, calls to them (:mod:`secagg.transport.ingest`)."""
    part, resent = begin(header)
    if part is None:
        return resent
    write_update(part, header, chunks, c0_size)
    try:
        return commit(header, part)
    finally:
        part.unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class RoundConfig:
    """What a round is: fixed when it is created."""

    round_id: str
    spec: ModelSpec
    expected_clients: int
    min_clients: int
    deadline_unix: float | None
    max_weight: float = DEFAULT_MAX_WEIGHT
    value_bound: float = DEFAULT_VALUE_BOUND
    dp: DPConfig | None = None
    enrolled: tuple[str, ...] = ()
    key_id: str = ""  # the federation key the round belongs to ("" in rounds of older versions)
    masking: dict | None = None  # a masked round's MaskSettings as a dict (secagg.masking); None: unmasked

    @property
    def bounds(self) -> Bounds:
        return Bounds(self.expected_clients, self.max_weight, self.value_bound)

    @property
    def num_ciphertexts(self) -> int:
        return num_ciphertexts(self.spec.num_params)

    def to_dict(self) -> dict:
        return {
            "round_id": self.round_id,
            "spec": self.spec.to_json(),
            "expected_clients": self.expected_clients,
            "min_clients": self.min_clients,
            "deadline_unix": self.deadline_unix,
            "max_weight": self.max_weight,
            "value_bound": self.value_bound,
            "dp": self.dp.to_dict() if self.dp else None,
            "enrolled": list(self.enrolled),
            "key_id": self.key_id,
            "masking": self.masking,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "RoundConfig":
        return cls(
            d["round_id"], ModelSpec.from_json(d["spec"]), int(d["expected_clients"]), int(d["min_clients"]),
            d["deadline_unix"], float(d["max_weight"]), float(d["value_bound"]),
            DPConfig.from_dict(d["dp"]) if d.get("dp") else None, tuple(d.get("enrolled", ())),
            str(d.get("key_id", "")), d.get("masking"),
        )

    def terms(self, key_id: str) -> Terms:
        """What every contribution of this round is bound to (:mod:`secagg.contribution`)."""
        return Terms(key_id, self.round_id, self.spec.hash, self.num_ciphertexts,
                     round_settings(self.expected_clients, self.min_clients, self.max_weight, self.value_bound,
                                    self.dp.to_dict() if self.dp else None, self.enrolled, self.masking))


@dataclasses.dataclass(frozen=True)
class RoundStatus:
    """A round as anyone may see it: no weights, no ciphertexts."""

    round_id: str
    state: str
    submitted: int
    expected: int
    min_clients: int
    clients: tuple[str, ...]
    deadline_unix: float | None
    spec_hash: str
    key_id: str
    max_weight: float
    value_bound: float
    num_params: int
    reason: str = ""
    dp: dict | None = None  # the round's DPConfig as a dict
    enrolled: tuple[str, ...] = ()
    epsilon_round: float = 0.0  # this round's own epsilon (0: no DP)
    epsilon_spent: float = 0.0  # the federation's epsilon over all DP rounds created so far
    epsilon_budget: float | None = None
    delta: float | None = None  # the federation's delta
    min_cohort: int = DEFAULT_MIN_COHORT
    release_grid: float = 0.0  # released sums are rounded to this (encoded units; secagg.release)
    release_precision: float = 0.0  # precision of a released average when every weight is max_weight
    masking: dict | None = None  # a masked round's settings (secagg.masking); None: unmasked
    stage: str = ""  # a collecting masked round's stage (secagg.masking.stages)

    def terms(self) -> Terms:
        """What every contribution of this round is bound to, as a client sees the round."""
        from secagg.slots import num_ciphertexts as count

        return Terms(self.key_id, self.round_id, self.spec_hash, count(self.num_params),
                     round_settings(self.expected, self.min_clients, self.max_weight, self.value_bound, self.dp,
                                    self.enrolled, self.masking))

    def to_json_dict(self) -> dict:
        """The fields ``secagg round status`` prints."""
        return dataclasses.asdict(self) | {"clients": list(self.clients), "enrolled": list(self.enrolled)}


@dataclasses.dataclass(frozen=True)
class RoundSummary:
    """One line of the aggregator's list of rounds."""

    round_id: str
    state: str
    submitted: int
    expected: int
    created_unix: float | None  # None: created by a version that did not record it
    reason: str = ""  # why the round failed

    def to_json_dict(self) -> dict:
        return dataclasses.asdict(self)


#: Longest reason an administrator may give when cancelling a round.
MAX_CANCEL_REASON = 500
#: Written into a round's folder when it is quarantined at start; the round stays set aside until removed.
QUARANTINE_FILE = "QUARANTINE"


@dataclasses.dataclass(frozen=True)
class SubmitResult:
    round_id: str
    client_id: str
    submitted: int
    already_accepted: bool


@dataclasses.dataclass(frozen=True)
class Aggregate:
    """A closed round's sum of first polynomials with every contributor's seeds and record, ready to stream."""

    header: Header
    records: tuple[Contribution, ...]
    config: RoundConfig
    path: Path

    @property
    def contributions(self) -> int:
        return len(self.records)

    @property
    def clients(self) -> tuple[str, ...]:
        return tuple(r.client_id for r in self.records)

    def chunks(self) -> Iterator[Chunk]:
        """Per ciphertext: the summed c0 and the contributors' seeds, in chunks that fit a message."""
        return _aggregate_chunks(self.path, len(self.records))


def _aggregate_chunks(path: Path, contributions: int) -> Iterator[Chunk]:
    per = aggregate_chunk_size(contributions)
    c0s: list[bytes] = []
    seeds: list[bytes] = []
    index = 0
    for blob in store.iter_blobs(path):
        split = len(blob) - SEED_BYTES * contributions
        c0s.append(blob[:split])
        seeds.append(blob[split:])
        if len(c0s) == per:
            yield Chunk(index, tuple(c0s), tuple(seeds), envelope.chunk_digest(index, c0s, seeds))
            c0s, seeds, index = [], [], index + 1
    if c0s:
        yield Chunk(index, tuple(c0s), tuple(seeds), envelope.chunk_digest(index, c0s, seeds))


def _aggregate_digest(path: Path, contributions: int) -> bytes:
    """The digest a client checks the streamed sum against: of its chunk digests, cut as :meth:`Aggregate.chunks` cuts."""
    return envelope.update_digest(chunk.digest for chunk in _aggregate_chunks(path, contributions))


def aggregate_chunk_size(contributions: int) -> int:
    """Ciphertexts per aggregate chunk: as many as fit in 3 MiB with every contributor's seeds."""
    per_ct = 8 * 8192 + SEED_BYTES * contributions
    return max(1, min(envelope.CIPHERTEXTS_PER_CHUNK, (3 * 1024 * 1024) // per_ct))


class _Round:
    """In-memory state of one round; every field is recoverable from its folder."""

    def __init__(self, key: ServerKey, folder: Path, config: RoundConfig, state: str, reason: str,
                 created_unix: float | None = None) -> None:
        self.folder = folder
        self.config = config
        self.state = state
        self.reason = reason
        self.created_unix = created_unix
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.accepted: dict[str, str] = {}  # client id -> hex digest of its update
        self.records: dict[str, Contribution] = {}  # client id -> its contribution record (open rounds)
        self.seeds: dict[str, bytes] = {}  # client id -> its seeds, 64 bytes per ciphertext (open rounds)
        self.sum = C0Sum(key.parameters, config.num_ciphertexts) if state == COLLECTING else None
        self.clients_at_close: tuple[str, ...] = ()
        self.aggregate_digest = ""
        self.mask: MaskState | None = None  # a masked round's stages while it collects

    @property
    def mask_path(self) -> Path:
        return self.folder / "masking.json"

    @property
    def journal_path(self) -> Path:
        return self.folder / "masking.log"

    def drop_mask_files(self) -> None:
        # The shares revealed to unmask the sum are of no use once the individual updates are gone.
        self.mask_path.unlink(missing_ok=True)
        self.journal_path.unlink(missing_ok=True)

    @property
    def accepted_dir(self) -> Path:
        return self.folder / "accepted"

    @property
    def incoming_dir(self) -> Path:
        return self.folder / "incoming"


class Aggregator(MaskedRounds):
    """The aggregator's core: rounds, submissions and the running encrypted sums.

    It holds only a :class:`ServerKey`, which cannot decrypt. ``clock`` is injectable so tests of
    deadlines need no sleeping. ``min_cohort``: no round may close with fewer contributions.
    ``epsilon_budget``/``delta``: the federation's privacy budget (persisted in the state dir).
    ``observer`` is told when rounds are created, close or fail (metrics). ``ca_pem`` (mutual TLS):
    the federation's CA certificate; contributions must then carry their client's signature.
    ``allow_non_dp``: with a budget, rounds without DP are refused unless this is set.
    """

    def __init__(self, key: ServerKey, state_dir: str | Path, clock: Callable[[], float] = time.time,
                 min_cohort: int = DEFAULT_MIN_COHORT, max_params: int = DEFAULT_MAX_PARAMS,
                 epsilon_budget: float | None = None,
                 delta: float | None = None, observer: RoundObserver | None = None, ca_pem: bytes | None = None,
                 allow_non_dp: bool = False) -> None:
        if not isinstance(key, ServerKey) or hasattr(key, "secret_key"):
            raise KeyFileError("the aggregator must be given server.key, never the client's secret key")
        self.key = key
        self.clock = clock
        self.observer = observer or RoundObserver()
        self.state_dir = Path(state_dir)
        self._rounds_dir = self.state_dir / "rounds"
        self._rounds_dir.mkdir(parents=True, exist_ok=True)
        self._rounds: dict[str, _Round] = {}
        self._quarantine: dict[str, str] = {}  # round id -> why it was set aside at start
        self._lock = threading.Lock()
        # Under mutual TLS, the federation's CA: every contribution must be signed by its client's certificate.
        self.ca_pem = ca_pem
        if min_cohort < 1:
            raise CohortError(f"--min-cohort must be at least 1, got {min_cohort}")
        if min_cohort < DEFAULT_MIN_COHORT:
            log.warning("minimum cohort %d is below %d: with K contributors, K-1 colluding sites can read the "
                        "remaining site's update off the sum", min_cohort, DEFAULT_MIN_COHORT)
        self.min_cohort = min_cohort
        self.max_params = max_params
        self._check_state_key()
        self.ledger = PrivacyLedger(self.state_dir, epsilon_budget, delta, allow_non_dp=allow_non_dp, clock=clock)
        self._recover()

    # -- rounds -----------------------------------------------------------------------------------

    def create_round(self, config: RoundConfig) -> RoundStatus:
        """Create a round; refuses an existing id and limits that could overflow."""
        check_id("round", config.round_id)
        if config.expected_clients < 1:
            raise SecAggError("--clients must be at least 1")
        if not 1 <= config.min_clients <= config.expected_clients:
            raise SecAggError(
                f"--min-clients must be between 1 and --clients ({config.expected_clients}), got {config.min_clients}"
            )
        if config.min_clients < self.min_cohort:
            raise CohortError(
                f"round {config.round_id!r} could close with {config.min_clients} contribution(s), but this aggregator "
                f"releases no sum of fewer than {self.min_cohort}: with K contributors, K-1 colluding sites subtract "
                f"their own updates and read the remaining site's. Use --min-clients {self.min_cohort} or more "
                f"(and --clients at least that)"
            )
        if config.spec.num_params == 0:
            raise SecAggError("the template has no floating-point tensors: there is nothing to aggregate")
        if config.spec.num_params > self.max_params:
            raise SecAggError(
                f"the model has {config.spec.num_params} parameters; this aggregator takes rounds of at most "
                f"{self.max_params} (secagg serve --max-params)"
            )
        config.bounds.check()
        self._check_enrolled(config)
        if config.masking is not None:
            self._check_masking(config)
        if config.dp is not None:
            config.dp.validate()
            if config.dp.mode == "distributed" and config.dp.min_honest > config.min_clients:
                raise PrivacyError(
                    f"distributed DP counts on {config.dp.min_honest} honest contributions, but round "
                    f"{config.round_id!r} may close with {config.min_clients}; raise --min-clients or lower "
                    "--min-honest"
                )
        config = dataclasses.replace(config, key_id=self.key.key_id)
        with self._lock:
            if config.round_id in self._rounds or config.round_id in self._quarantine:
                raise RoundExistsError(f"round {config.round_id!r} already exists; pick a new round id")
            self.ledger.check_new_round(config.round_id, config.dp)
            if config.dp is not None:
                # Charged before the round exists: a crash in between over-counts, never under-counts.
                self.ledger.charge(config.round_id, config.dp.noise_multiplier, config.dp.delta, dp=config.dp)
            folder = self._rounds_dir / config.round_id
            folder.mkdir()
            (folder / "accepted").mkdir()
            (folder / "incoming").mkdir()
            rnd = _Round(self.key, folder, config, COLLECTING, "", created_unix=self.clock())
            if config.masking is not None:
                rnd.mask = MaskState(MaskSettings.from_dict(config.masking), config.expected_clients, config.min_clients,
                                     stage_started=self.clock(), enrolled=list(config.enrolled))
                store.write_json_atomic(rnd.mask_path, rnd.mask.to_dict())
            self._save_round(rnd)
            self._rounds[config.round_id] = rnd
        log.info("round created", extra={"round": config.round_id, "expected": config.expected_clients})
        self.observer.round_created(config.round_id)
        return self.status(config.round_id)

    @staticmethod
    def _check_enrolled(config: RoundConfig) -> None:
        for client in config.enrolled:
            check_id("client", client)
        if len(set(config.enrolled)) != len(config.enrolled):
            raise SecAggError("--enroll lists a client twice; name each client once")
        if config.enrolled and len(config.enrolled) < config.expected_clients:
            raise SecAggError(
                f"--enroll names {len(config.enrolled)} client(s) but --clients is {config.expected_clients}; "
                "enroll at least as many clients as the round expects"
            )

    def _check_masking(self, config: RoundConfig) -> None:
        if self.ca_pem is None:
            raise MaskingError("a masked round needs per-site identities: run the aggregator under mutual TLS "
                               "(secagg serve --tls-ca ...) with a certificate for every site")
        if config.deadline_unix is not None:
            raise MaskingError("a masked round times each of its stages instead of one deadline: drop --deadline and "
                               "use --stage-timeout")
        MaskSettings.from_dict(config.masking).validate(config.expected_clients)

    def status(self, round_id: str) -> RoundStatus:
        """The round's public state; applies its deadline first."""
        if round_id in self._quarantine:
            return RoundStatus(round_id, FAILED, 0, 0, 0, (), None, "", self.key.key_id, 0.0, 0.0, 0,
                               self._quarantine[round_id], min_cohort=self.min_cohort)
        rnd = self._round(round_id)
        with rnd.lock:
            self._apply_deadline(rnd)
            return self._status(rnd)

    def list_rounds(self) -> list[RoundSummary]:
        """Every round this aggregator holds, oldest first; applies deadlines first."""
        with self._lock:
            rounds = list(self._rounds.values())
        summaries = []
        for rnd in rounds:
            with rnd.lock:
                self._apply_deadline(rnd)
                submitted = len(rnd.accepted) if rnd.state == COLLECTING else len(rnd.clients_at_close)
                summaries.append(RoundSummary(rnd.config.round_id, rnd.state, submitted, rnd.config.expected_clients,
                                              rnd.created_unix, rnd.reason))
        summaries += [RoundSummary(r, FAILED, 0, 0, None, why) for r, why in self._quarantine.items()]
        return sorted(summaries, key=lambda s: (s.created_unix or 0.0, s.round_id))

    def cancel_round(self, round_id: str, reason: str = "", by: str | None = None) -> RoundStatus:
        """Fail a collecting round that can never complete, for ``reason`` (``by``: who cancelled it).

        Durable like any failure: ``round.json`` says failed, the accepted updates are deleted, and
        fetchers waiting for the round are woken and told why. A closed or failed round is refused.
        """
        why = " ".join(reason.split())  # one line: the reason ends up in one-line errors and logs
        if len(why) > MAX_CANCEL_REASON:
            raise SecAggError(f"the reason is {len(why)} characters long; say it in at most {MAX_CANCEL_REASON}")
        rnd = self._round(round_id)
        with rnd.lock:
            self._apply_deadline(rnd)
            if rnd.state != COLLECTING:
                raise RoundStateError(
                    f"round {round_id!r} is already {rnd.state}" + (f" ({rnd.reason})" if rnd.reason else "")
                    + "; only a collecting round can be cancelled"
                )
            self._fail(rnd, f"cancelled: {why or 'no reason given'}" + (f" (by {by})" if by else ""))
            rnd.changed.notify_all()
            return self._status(rnd)

    def end_collection(self, round_id: str, why: str) -> RoundStatus:
        """Apply the deadline's rule now: close with what was accepted if that is at least ``min_clients``,
        else fail, because no more updates can come (``why``: e.g. every sampled site has answered).

        For a host that knows whom it asked (the Flower strategy); an unmasked collecting round only.
        """
        rnd = self._round(round_id)
        with rnd.lock:
            self._apply_deadline(rnd)
            if rnd.state == COLLECTING and rnd.mask is None:
                if len(rnd.accepted) >= rnd.config.min_clients:
                    self._close(rnd)
                else:
                    self._fail(rnd, f"{why}, with {len(rnd.accepted)} of {rnd.config.expected_clients} updates, "
                                    f"fewer than the minimum {rnd.config.min_clients}")
                rnd.changed.notify_all()
            return self._status(rnd)

    def round_config(self, round_id: str) -> RoundConfig:
        return self._round(round_id).config

    def round_spec(self, round_id: str) -> ModelSpec:
        """The round's model spec; empty for a quarantined round (its status says why)."""
        if round_id in self._quarantine:
            return ModelSpec(())
        return self._round(round_id).config.spec

    def open_rounds(self) -> int:
        """How many rounds are collecting updates."""
        with self._lock:
            return sum(1 for rnd in self._rounds.values() if rnd.state == COLLECTING)

    def tick(self) -> None:
        """Close or fail every round whose deadline has passed (called periodically by the server)."""
        with self._lock:
            rounds = list(self._rounds.values())
        for rnd in rounds:
            with rnd.lock:
                self._apply_deadline(rnd)

    # -- submissions ------------------------------------------------------------------------------

    def submit(self, header: Header, chunks: Iterator[Chunk]) -> SubmitResult:
        """Validate and accept one client's update; nothing is changed unless all of it is valid."""
        return ingest_update(header, chunks, c0_bytes(self.key.parameters), self.begin_upload, self.commit_upload)

    def begin_upload(self, header: Header) -> tuple[Path | None, SubmitResult | None]:
        """Check an update's header before any of it is read.

        Returns where to write the update (:func:`write_update`, then :meth:`commit_upload`) and None,
        or, for a resend of an update already accepted (its reply was lost), None and the
        acknowledgement to give again without reading it.
        """
        rnd, retry = self._check_header(header)
        if retry:
            # The round may be closed, with its incoming/ folder gone.
            with rnd.lock:
                submitted = len(rnd.accepted) if rnd.state == COLLECTING else len(rnd.clients_at_close)
            return None, SubmitResult(rnd.config.round_id, header.client_id, submitted, True)
        return rnd.incoming_dir / f"{header.client_id}.{secrets.token_hex(6)}.part", None

    def commit_upload(self, header: Header, part: Path) -> SubmitResult:
        """Accept an update written and synced at ``part`` (from :meth:`begin_upload`); the caller removes the file."""
        rnd = self._round(header.round_id)
        if part.parent != rnd.incoming_dir or not part.name.startswith(f"{header.client_id}.") or part.suffix != ".part":
            raise EnvelopeError(f"{part} is not an upload of {header.client_id!r} to round {header.round_id!r}")
        return self._accept(rnd, header, part)

    def _check_header(self, header: Header) -> tuple[_Round, bool]:
        if header.format_version != envelope.FORMAT_VERSION:
            raise EnvelopeError(
                f"update format version {header.format_version} is not supported (this aggregator speaks "
                f"{envelope.FORMAT_VERSION}); upgrade the client or the aggregator so they match"
            )
        check_id("client", header.client_id)
        record = header.contribution
        if record is None or record.client_id != header.client_id or record.digest != header.digest:
            raise EnvelopeError("the update carries no contribution record for its own client id and digest; "
                                "submit with the secagg client")
        rnd = self._round(header.round_id)
        if rnd.config.enrolled and header.client_id not in rnd.config.enrolled:
            raise AuthError(
                f"client {header.client_id!r} is not enrolled in round {rnd.config.round_id!r} (enrolled: "
                f"{', '.join(rnd.config.enrolled)}); ask the round's administrator to enroll it"
            )
        if header.key_id != self.key.key_id:
            raise KeyFileError(
                f"the update is encrypted under key {header.key_id} but this aggregator serves key {self.key.key_id}; "
                "use the client.key from the same 'secagg keygen' as the aggregator's server.key"
            )
        cfg = rnd.config
        if header.spec_hash != cfg.spec.hash:
            raise EnvelopeError(
                f"the model does not match the architecture of round {cfg.round_id!r} (spec hash differs); "
                "submit a model with the same layers, shapes and dtypes as the round's template"
            )
        if header.num_ciphertexts != cfg.num_ciphertexts:
            raise EnvelopeError(
                f"the update has {header.num_ciphertexts} ciphertexts; round {cfg.round_id!r} needs {cfg.num_ciphertexts}"
            )
        self._verify_record(cfg, header.contribution)
        with rnd.lock:
            self._apply_deadline(rnd)
            return rnd, self._check_open(rnd, header)

    def _check_open(self, rnd: _Round, header: Header) -> bool:
        """Raises unless the client may submit; True if this is a retry of an accepted update."""
        prior = rnd.accepted.get(header.client_id)
        if prior is not None:
            if prior == header.digest.hex():
                return True
            raise DuplicateSubmissionError(
                f"client {header.client_id!r} already submitted a different update to round {rnd.config.round_id!r}; "
                "each client submits once per round (a retry must resend the same bytes)"
            )
        if rnd.state != COLLECTING:
            raise RoundStateError(
                f"round {rnd.config.round_id!r} is {rnd.state} ({len(rnd.accepted) or len(rnd.clients_at_close)} of "
                f"{rnd.config.expected_clients} submitted); it accepts no more updates: ask for a new round"
            )
        if rnd.mask is not None:
            if rnd.mask.stage != mask_stages.SUBMIT:
                raise RoundStateError(f"masked round {rnd.config.round_id!r} is in its {rnd.mask.stage} stage; it takes "
                                      "updates in its submit stage only (secagg submit runs every stage itself)")
            if header.client_id not in rnd.mask.boxes:
                raise MaskingError(f"client {header.client_id!r} did not share its mask keys in round "
                                   f"{rnd.config.round_id!r}, so its update could never be unmasked; it joins the next round")
        return False

    def _accept(self, rnd: _Round, header: Header, part: Path) -> SubmitResult:
        with rnd.lock:
            self._apply_deadline(rnd)
            if self._check_open(rnd, header):
                return SubmitResult(rnd.config.round_id, header.client_id, len(rnd.accepted), True)
            self._add_update(rnd, part, header.client_id, header.contribution)
            final = rnd.accepted_dir / header.client_id
            try:
                part.replace(final)
                store.fsync_dir(rnd.accepted_dir)
            except OSError:
                self._remove_update(rnd, header.client_id, part)
                raise
            rnd.accepted[header.client_id] = header.digest.hex()
            log.info("update accepted", extra={"round": rnd.config.round_id, "client": header.client_id})
            if rnd.mask is not None:
                self._advance_mask(rnd)
            elif len(rnd.accepted) == rnd.config.expected_clients:
                self._close(rnd)
            rnd.changed.notify_all()
            return SubmitResult(rnd.config.round_id, header.client_id, len(rnd.accepted), False)

    def _add_update(self, rnd: _Round, path: Path, client_id: str, record: Contribution) -> None:
        """Check every coefficient and the seeds' digest, then add; on a bad one, undo what was added (exact) and refuse."""
        params = self.key.parameters
        size = c0_bytes(params)
        added = 0
        seeds = bytearray()
        try:
            for i, blob in enumerate(store.iter_blobs(path, reuse=True)):
                if i >= rnd.config.num_ciphertexts or len(blob) != size + SEED_BYTES:
                    raise CiphertextError(f"ciphertext {i} has the wrong size for this round")
                rnd.sum.add(i, parse_c0(params, blob[:size]))
                seeds += blob[size:]
                added += 1
            if added != rnd.config.num_ciphertexts:
                raise CiphertextError(f"{added} of the round's {rnd.config.num_ciphertexts} ciphertexts")
            if seeds_digest(bytes(seeds[i:i + SEED_BYTES]) for i in range(0, len(seeds), SEED_BYTES)) != record.seeds_digest:
                raise CiphertextError("its seeds do not match the digest in its contribution record")
        except CiphertextError as exc:
            self._subtract_first(rnd, path, added)
            raise CiphertextError(
                f"the update is not valid for this federation (ciphertext {added}: {exc}); "
                "re-encrypt with the federation's client.key and resend"
            ) from None
        rnd.seeds[client_id] = bytes(seeds)
        rnd.records[client_id] = record

    def _subtract_first(self, rnd: _Round, path: Path, count: int) -> None:
        size = c0_bytes(self.key.parameters)
        for i, blob in enumerate(store.iter_blobs(path, reuse=True)):
            if i >= count:
                break
            rnd.sum.subtract(i, parse_c0(self.key.parameters, blob[:size]))

    def _remove_update(self, rnd: _Round, client_id: str, path: Path) -> None:
        self._subtract_first(rnd, path, rnd.config.num_ciphertexts)
        rnd.seeds.pop(client_id, None)
        rnd.records.pop(client_id, None)

    # -- aggregates -------------------------------------------------------------------------------

    def aggregate(self, round_id: str, wait: float = 0.0, caller: str | None = None) -> Aggregate:
        """The closed round's sum; waits up to ``wait`` seconds for it to close.

        ``caller``: the authenticated client asking (mutual TLS); a round with enrollment serves its
        sum only to its enrolled clients.
        """
        rnd = self._round(round_id)
        if caller is not None and rnd.config.enrolled and caller not in rnd.config.enrolled:
            raise AuthError(f"client {caller!r} is not enrolled in round {round_id!r}, so it may not fetch its sum; "
                            "ask the round's administrator to enroll it")
        end = time.monotonic() + max(0.0, wait)
        with rnd.lock:
            while True:
                self._apply_deadline(rnd)
                if rnd.state != COLLECTING:
                    break
                left = end - time.monotonic()
                if left <= 0:
                    raise RoundStateError(
                        f"round {round_id!r} is still collecting ({len(rnd.accepted)} of {rnd.config.expected_clients} "
                        "submitted); try again later or pass a longer --wait"
                    )
                rnd.changed.wait(min(left, 0.5))
            if rnd.state == FAILED:
                raise RoundStateError(f"round {round_id!r} failed: {rnd.reason}")
            path = rnd.folder / "aggregate"
            meta = store.read_blob_header(path)
            records = tuple(Contribution.from_dict(r) for r in meta["records"])
            cfg = rnd.config
            n_chunks = math.ceil(cfg.num_ciphertexts / aggregate_chunk_size(len(records)))
            header = Header(round_id, "", self.key.key_id, cfg.spec.hash, cfg.num_ciphertexts, n_chunks,
                            bytes.fromhex(rnd.aggregate_digest))
            return Aggregate(header, records, cfg, path)

    # -- internals --------------------------------------------------------------------------------

    def _round(self, round_id: str) -> _Round:
        with self._lock:
            rnd = self._rounds.get(round_id)
        if rnd is None and round_id in self._quarantine:
            raise RoundStateError(f"round {round_id!r} failed: {self._quarantine[round_id]}")
        if rnd is None:
            raise RoundNotFoundError(
                f"no round {round_id!r} on this aggregator; check the id with 'secagg round status' or create it"
            )
        return rnd

    def _status(self, rnd: _Round) -> RoundStatus:
        cfg = rnd.config
        clients = tuple(sorted(rnd.accepted)) if rnd.state == COLLECTING else rnd.clients_at_close
        ledger = self.ledger
        return RoundStatus(
            cfg.round_id, rnd.state, len(clients), cfg.expected_clients, cfg.min_clients, clients, cfg.deadline_unix,
            cfg.spec.hash, self.key.key_id, cfg.max_weight, cfg.value_bound, cfg.spec.num_params, rnd.reason,
            dp=cfg.dp.to_dict() if cfg.dp else None, enrolled=cfg.enrolled,
            epsilon_round=ledger.round_epsilon(cfg.round_id), epsilon_spent=ledger.spent(),
            epsilon_budget=ledger.epsilon_budget, delta=ledger.delta, min_cohort=self.min_cohort,
            release_grid=grid(cfg.expected_clients),
            release_precision=grid(cfg.expected_clients) * cfg.value_bound / VALUE_LIMIT,
            masking=cfg.masking, stage=rnd.mask.stage if rnd.mask is not None and rnd.state == COLLECTING else "",
        )

    def _apply_deadline(self, rnd: _Round) -> None:
        cfg = rnd.config
        if rnd.mask is not None and rnd.state == COLLECTING:
            if self._advance_mask(rnd):
                rnd.changed.notify_all()
            return
        if rnd.state != COLLECTING or cfg.deadline_unix is None or self.clock() < cfg.deadline_unix:
            return
        if len(rnd.accepted) >= cfg.min_clients:
            self._close(rnd)
        else:
            self._fail(rnd, f"deadline passed with {len(rnd.accepted)} of {cfg.expected_clients} updates, fewer than "
                            f"the minimum {cfg.min_clients}")
        rnd.changed.notify_all()

    def _fail(self, rnd: _Round, why: str) -> None:
        cfg = rnd.config
        rnd.state = FAILED
        rnd.clients_at_close = tuple(sorted(rnd.accepted))
        missing = sorted(set(cfg.enrolled) - set(rnd.clients_at_close))
        if rnd.mask is not None:  # a masked round's stage machine names who was missing at the stage it ended in
            missing = []
        rnd.reason = f"{why}; accepted from: {', '.join(rnd.clients_at_close) or 'nobody'}" + (
            f"; missing: {', '.join(missing)}" if missing else "")
        rnd.sum = None
        rnd.seeds, rnd.records = {}, {}
        self._save_round(rnd)
        self._drop_updates(rnd)
        rnd.drop_mask_files()
        log.warning("round failed", extra={"round": cfg.round_id, "reason": rnd.reason})
        self.observer.round_failed(cfg.round_id, self._age(rnd))

    def _close(self, rnd: _Round) -> None:
        clients = tuple(sorted(rnd.accepted))
        if len(clients) < self.min_cohort:
            # Only reachable for a round created under a lower --min-cohort, recovered by this server.
            self._fail(rnd, f"{len(clients)} contribution(s) are fewer than this aggregator's minimum cohort "
                            f"{self.min_cohort}: the sum is not released")
            return
        records = [rnd.records[c].to_dict() for c in clients]
        writer = store.BlobWriter(rnd.folder / "aggregate.tmp", {"contributions": len(clients), "clients": list(clients),
                                                                 "records": records})
        for i in range(len(rnd.sum)):  # one ciphertext at a time: no second copy of the sum
            writer.write([rnd.sum.row_bytes(i) + b"".join(rnd.seeds[c][i * SEED_BYTES:(i + 1) * SEED_BYTES]
                                                           for c in clients)])
        writer.commit(rnd.folder / "aggregate")
        digest = _aggregate_digest(rnd.folder / "aggregate", len(clients))
        rnd.state = CLOSED
        rnd.clients_at_close = clients
        rnd.aggregate_digest = digest.hex()
        rnd.sum = None
        rnd.seeds, rnd.records = {}, {}
        self._save_round(rnd)
        self._drop_updates(rnd)
        rnd.drop_mask_files()
        log.info("round closed", extra={"round": rnd.config.round_id, "contributions": len(clients)})
        self.observer.round_closed(rnd.config.round_id, len(clients), self._age(rnd))

    def _age(self, rnd: _Round) -> float | None:
        return None if rnd.created_unix is None else max(0.0, self.clock() - rnd.created_unix)

    @staticmethod
    def _drop_updates(rnd: _Round) -> None:
        # Individual updates are deleted once the sum is final: if the federation's key ever leaked,
        # stored updates would expose single models; the sum alone does not.
        shutil.rmtree(rnd.accepted_dir, ignore_errors=True)
        shutil.rmtree(rnd.incoming_dir, ignore_errors=True)

    def _save_round(self, rnd: _Round) -> None:
        # The digests of accepted updates are kept after the round ends, so that a client's resend
        # of an acknowledged update (reply lost in a crash) is still recognised after a restart.
        data = {"config": rnd.config.to_dict(), "state": rnd.state, "reason": rnd.reason,
                "clients_at_close": list(rnd.clients_at_close), "aggregate_digest": rnd.aggregate_digest,
                "accepted_digests": dict(rnd.accepted) if rnd.state != COLLECTING else {},
                "created_unix": rnd.created_unix}
        store.write_json_atomic(rnd.folder / "round.json", data)

    def _check_state_key(self) -> None:
        marker = self.state_dir / "key_id"
        if marker.exists():
            stored = marker.read_text().strip()
            if stored != self.key.key_id:
                raise KeyFileError(
                    f"state dir {self.state_dir} belongs to key {stored}, but the aggregator was started with key "
                    f"{self.key.key_id}; start it with that federation's server.key or use a new --state-dir"
                )
        else:
            tmp = marker.with_name("key_id.tmp")
            tmp.write_text(self.key.key_id + "\n")
            tmp.replace(marker)

    def _recover(self) -> None:
        """Rebuild every round from its folder: re-check and replay accepted updates, drop partial ones.

        A round that cannot be trusted (unreadable or inconsistent files, another federation's key,
        an update whose bytes no longer match its digest) is quarantined: failed with the reason, its
        files kept for inspection, and every other round served.
        """
        # The privacy ledger first: every DP round found is charged (deleting privacy.json does not reset
        # the spending), and a round whose DP settings differ from its charge is set aside.
        folders = sorted(p for p in self._rounds_dir.iterdir() if p.is_dir())
        dps = {}
        for folder in folders:
            try:
                dps[folder.name] = RoundConfig.from_dict(store.read_json(folder / "round.json")["config"]).dp
            except Exception:  # unreadable: quarantined below
                pass
        for round_id, why in self.ledger.reconcile(dps).items():
            if not (self._rounds_dir / round_id / QUARANTINE_FILE).exists():
                self._set_aside(self._rounds_dir / round_id, why)
        for folder in folders:
            meta_path = folder / "round.json"
            if (folder / QUARANTINE_FILE).exists():
                self._quarantine[folder.name] = (folder / QUARANTINE_FILE).read_text(errors="replace").strip()
                continue
            if not meta_path.exists():  # crashed between mkdir and the first save: never acknowledged
                shutil.rmtree(folder, ignore_errors=True)
                continue
            try:
                rnd = self._recover_round(folder)
            except Exception as exc:  # anything at all: one damaged round must not stop the others
                self._set_aside(folder, f"{type(exc).__name__}: {exc}")
                continue
            self._rounds[rnd.config.round_id] = rnd
            log.info("round recovered", extra={"round": rnd.config.round_id, "state": rnd.state})

    def _recover_round(self, folder: Path) -> _Round:
        meta = store.read_json(folder / "round.json")
        config = RoundConfig.from_dict(meta["config"])
        if config.round_id != folder.name:
            raise SecAggError(f"round.json names round {config.round_id!r}, not its folder's")
        if not config.key_id:
            raise KeyFileError("the round was created by a secagg version before format 2 (no federation key id); its "
                               "updates cannot be checked or served by this version")
        if config.key_id != self.key.key_id:
            raise KeyFileError(f"the round belongs to federation key {config.key_id}, not this aggregator's "
                               f"{self.key.key_id}")
        rnd = _Round(self.key, folder, config, meta["state"], meta.get("reason", ""), meta.get("created_unix"))
        if rnd.state not in (COLLECTING, CLOSED, FAILED):
            raise SecAggError(f"unknown state {rnd.state!r}")
        rnd.clients_at_close = tuple(meta.get("clients_at_close", ()))
        rnd.aggregate_digest = meta.get("aggregate_digest", "")
        if config.masking is not None and rnd.state == COLLECTING:
            rnd.mask = MaskState.from_dict(store.read_json(rnd.mask_path))
            rnd.mask.replay(read_journal(rnd.journal_path))
        if rnd.state == CLOSED:
            self._check_aggregate(rnd)
        if rnd.state != COLLECTING:
            rnd.accepted = dict(meta.get("accepted_digests", {}))
            self._drop_updates(rnd)
            return rnd
        shutil.rmtree(rnd.incoming_dir, ignore_errors=True)
        rnd.incoming_dir.mkdir(exist_ok=True)
        rnd.accepted_dir.mkdir(exist_ok=True)
        # Only complete updates are ever renamed into accepted/, under the client's id (which may
        # itself end in ".tmp"), so every file there is an acknowledged update: re-check it all.
        for path in sorted(rnd.accepted_dir.iterdir()):
            header = store.read_blob_header(path)
            record = Contribution.from_dict(header["contribution"])
            digest = bytes.fromhex(header["digest"])
            if header["client_id"] != path.name or record.client_id != path.name or record.digest != digest:
                raise SecAggError(f"accepted update {path.name!r} names client {header['client_id']!r}: it was copied "
                                  "or renamed outside the aggregator")
            if self._stored_digest(path) != digest:
                raise SecAggError(f"accepted update {path.name!r} no longer matches its digest: it was altered or "
                                  "damaged on disk")
            self._verify_record(config, record)
            self._add_update(rnd, path, path.name, record)
            rnd.accepted[path.name] = header["digest"]
        if rnd.mask is not None:
            self._advance_mask(rnd)
        elif len(rnd.accepted) == config.expected_clients:
            self._close(rnd)
        return rnd

    def _stored_digest(self, path: Path) -> bytes:
        """An accepted update's digest, recomputed from its stored ciphertexts as the client chunked them."""
        size = c0_bytes(self.key.parameters)
        digests, c0s, seeds = [], [], []
        for blob in store.iter_blobs(path):
            c0s.append(blob[:size])
            seeds.append(blob[size:])
            if len(c0s) == envelope.CIPHERTEXTS_PER_CHUNK:
                digests.append(envelope.chunk_digest(len(digests), c0s, seeds))
                c0s, seeds = [], []
        if c0s:
            digests.append(envelope.chunk_digest(len(digests), c0s, seeds))
        return envelope.update_digest(digests)

    def _check_aggregate(self, rnd: _Round) -> None:
        contributions = int(store.read_blob_header(rnd.folder / "aggregate")["contributions"])
        if _aggregate_digest(rnd.folder / "aggregate", contributions).hex() != rnd.aggregate_digest:
            raise SecAggError("the stored encrypted sum no longer matches its digest: it was altered or damaged on disk")

    def _set_aside(self, folder: Path, why: str) -> None:
        """Quarantine a round: failed with ``why``, its files kept as they are, every other round served."""
        reason = f"quarantined at start: {why}; its files are kept in {folder} for inspection"
        try:
            (folder / QUARANTINE_FILE).write_text(reason + "\n")
        except OSError:
            pass
        self._quarantine[folder.name] = reason
        log.error("round quarantined", extra={"round": folder.name, "reason": reason})
        self.observer.round_failed(folder.name, None)

    def _verify_record(self, config: RoundConfig, record: Contribution) -> None:
        """Under mutual TLS: the record is signed by its client's certificate from the federation's CA."""
        if self.ca_pem is None:
            return
        from secagg.contribution import check_signature, message

        msg = message(config.terms(self.key.key_id), record.client_id, record.digest, record.seeds_digest)
        try:
            check_signature(record, msg, self.ca_pem)
        except AggregateCheckError as exc:
            raise AuthError(str(exc)) from None
