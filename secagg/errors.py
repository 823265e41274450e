"""The one exception hierarchy of secagg.

Every error a user can cause derives from :class:`SecAggError`. Messages say what was wrong and
what to do about it. The gRPC layer maps these classes to status codes in one place
(``secagg.transport.status``), and the client maps the codes back, so a caller sees the same
class whether the problem was found locally or on the aggregator.
"""

from __future__ import annotations


class SecAggError(Exception):
    """Base class of every error secagg raises on purpose."""


class KeyFileError(SecAggError):
    """A key file is missing, unreadable, of the wrong kind, or does not match the round's key."""


class ModelFormatError(SecAggError):
    """A model file cannot be read or written, or does not match the round's model spec."""


class EnvelopeError(SecAggError):
    """An encrypted update failed validation: version, ids, spec hash, chunk order or checksum."""


class CiphertextError(EnvelopeError):
    """A ciphertext passed the envelope checks but is not a valid ciphertext for the parameters."""


class OverflowRiskError(SecAggError):
    """Encrypting this update could make the encrypted sum overflow (CKKS wraps silently)."""


class RoundNotFoundError(SecAggError):
    """The aggregator has no round with this id."""


class RoundExistsError(SecAggError):
    """A round with this id already exists."""


class RoundStateError(SecAggError):
    """The round is not in a state that allows this operation (closed, failed, still collecting)."""


class DuplicateSubmissionError(SecAggError):
    """This client already submitted a different update to this round."""


class MessageTooLargeError(SecAggError):
    """A gRPC message exceeds the size limit."""


class AggregateCheckError(SecAggError):
    """The decrypted aggregate failed its integrity check (wrong key or a corrupted sum)."""


class TransportError(SecAggError):
    """The aggregator could not be reached or the connection broke.

    ``transient`` is True when trying again may help (nothing answered, a connection broke) and
    False for a problem of the settings that no retry heals (e.g. a failed TLS handshake).
    """

    def __init__(self, message: str = "", transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class BusyError(TransportError):
    """The aggregator is serving as many long calls as it allows (in total or from this client): try again later."""


class PrivacyError(SecAggError):
    """A differential-privacy setting is invalid (clip norm, noise, delta, mode, cohort)."""


class PrivacyBudgetError(PrivacyError):
    """Running this round would spend more privacy than the federation's budget allows."""


class AuthError(SecAggError):
    """The caller's credentials do not allow this call (wrong client, not enrolled, not admin)."""


class UnauthenticatedError(AuthError):
    """The call carried no valid credentials where the aggregator requires them."""


class CohortError(SecAggError):
    """A round would release a sum of fewer contributions than the minimum cohort allows."""


class ScalerError(SecAggError):
    """A scaler file is invalid, or a scaler does not fit the data it is applied to."""


class MaskingError(SecAggError):
    """A masked round's stage cannot go on: a statement does not verify, too few sites, a share refused."""
