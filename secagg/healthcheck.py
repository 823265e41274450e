"""A probe for container health checks: ``python -m secagg.healthcheck --server HOST:PORT``.

Asks the aggregator's gRPC health service (``grpc.health.v1.Health/Check``) and exits 0 if it
answers SERVING, 1 otherwise (NOT_SERVING, unknown service, unreachable, TLS failure), 2 for bad
usage. It prints the status (or one ``secagg-healthcheck: error: ...`` line on stderr).

Unlike the client commands it does not read the ``SECAGG_TLS_*`` variables: in the aggregator's own
container those name the server's certificate, not a client's. Under mutual TLS either give a
client certificate (``--tls-cert``/``--tls-key``) or probe the plaintext health-only port
(``secagg serve --health-listen 127.0.0.1:50052``).
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from secagg.errors import SecAggError
from secagg.transport.tls import ClientTLS, handshake_hint

SERVING = health_pb2.HealthCheckResponse.SERVING


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m secagg.healthcheck",
                                description="Exit 0 if the aggregator's gRPC health check answers SERVING, else 1.")
    p.add_argument("--server", required=True, metavar="HOST:PORT",
                   help="the aggregator's gRPC port, or its --health-listen port")
    p.add_argument("--service", default="", metavar="NAME",
                   help="the service to ask about (default '': the whole server; or secagg.v1.Aggregator)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="give up after this long (default 5)")
    t = p.add_argument_group("TLS", "Default: plaintext.")
    t.add_argument("--tls-ca", metavar="CA_CRT", help="the CA that issued the aggregator's certificate")
    t.add_argument("--tls-cert", metavar="CRT", help="a client certificate (mutual TLS)")
    t.add_argument("--tls-key", metavar="KEY", help="its private key")
    t.add_argument("--tls-server-name", metavar="NAME",
                   help="the name to expect in the aggregator's certificate when --server is an IP it does not list")
    return p


def check(server: str, service: str = "", timeout: float = 5.0, tls: ClientTLS | None = None,
          server_name: str | None = None) -> str:
    """The health status name the aggregator at ``server`` reports for ``service`` (e.g. "SERVING").

    Raises :class:`SecAggError` if it cannot be asked (unreachable, TLS failure, unknown service).
    """
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    channel = (grpc.insecure_channel(server, options=options) if tls is None
               else grpc.secure_channel(server, tls.credentials(), options=options))
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=timeout)
        except grpc.RpcError as err:
            detail = err.details() or err.code().name
            if err.code() == grpc.StatusCode.NOT_FOUND:
                raise SecAggError(f"{server} knows no service {service!r}; leave out --service or use "
                                  "secagg.v1.Aggregator") from None
            hint = handshake_hint(detail, tls, server)
            raise SecAggError(f"cannot ask {server} ({err.code().name}: {detail})" + (f"; {hint}" if hint else "")) \
                from None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        tls = None
        if args.tls_ca or args.tls_cert or args.tls_key:
            if not args.tls_ca:
                raise SecAggError("--tls-cert and --tls-key need --tls-ca, the CA that issued the aggregator's certificate")
            tls = ClientTLS(args.tls_ca, args.tls_cert, args.tls_key)
        status = check(args.server, args.service, args.timeout, tls, args.tls_server_name)
    except SecAggError as exc:
        print(f"secagg-healthcheck: error: {exc}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
