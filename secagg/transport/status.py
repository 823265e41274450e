"""The one place where secagg errors and gRPC status codes are mapped, both ways.

The server sends the status code that fits and, in trailing metadata, the name of the secagg error
class, so the client raises the same class the core raised, with the aggregator's own message.
"""

from __future__ import annotations

import grpc

from secagg import errors as e

ERROR_CLASS_KEY = "secagg-error"

# Order matters: subclasses before their bases.
_TO_CODE: list[tuple[type[e.SecAggError], grpc.StatusCode]] = [
    (e.RoundNotFoundError, grpc.StatusCode.NOT_FOUND),
    (e.UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (e.AuthError, grpc.StatusCode.PERMISSION_DENIED),
    (e.PrivacyBudgetError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.CohortError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.MaskingError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.RoundExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (e.DuplicateSubmissionError, grpc.StatusCode.ALREADY_EXISTS),
    (e.RoundStateError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.KeyFileError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.MessageTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.BusyError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.SecAggError, grpc.StatusCode.INVALID_ARGUMENT),
]


def code_for(exc: e.SecAggError) -> grpc.StatusCode:
    """The gRPC status code for a secagg error."""
    for cls, code in _TO_CODE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INVALID_ARGUMENT


def abort(context: grpc.ServicerContext, exc: e.SecAggError) -> None:
    """End the call with ``exc``'s status code, message and class name."""
    context.set_trailing_metadata(((ERROR_CLASS_KEY, type(exc).__name__),))
    context.abort(code_for(exc), str(exc))


def error_from_rpc(err: grpc.RpcError, server: str, hint: str = "") -> e.SecAggError:
    """A secagg error for a failed call, of the class the aggregator raised.

    ``hint`` replaces the generic advice when the aggregator could not be reached (e.g. a TLS problem).
    """
    code = err.code()
    detail = err.details() or str(code)
    if code == grpc.StatusCode.UNAVAILABLE:
        # With a hint the handshake failed (TLS settings): trying again cannot help.
        return e.TransportError(f"cannot reach the aggregator at {server} ({detail}); "
                                f"{hint or 'check --server and that it runs'}", transient=not hint)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return e.TransportError(f"the aggregator at {server} did not answer in time; try again")
    name = dict(err.trailing_metadata() or ()).get(ERROR_CLASS_KEY, "")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and name == e.BusyError.__name__:
        return e.BusyError(f"{detail} (aggregator {server})")
    if code == grpc.StatusCode.CANCELLED:
        return e.TransportError(f"the aggregator at {server} cancelled the call ({detail}): an upload that sent "
                                "nothing for its idle timeout, or the aggregator is stopping; try again")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return e.MessageTooLargeError(
            f"the aggregator refused a message as too large ({detail}); messages must stay under 4 MiB: "
            "use the secagg client, which streams updates in chunks"
        )
    cls = getattr(e, name, None)
    if isinstance(cls, type) and issubclass(cls, e.SecAggError):
        return cls(detail)
    return e.SecAggError(f"the aggregator at {server} answered {code.name}: {detail}")
