"""secagg: encrypted aggregation of model weights.

A round in five names::

    paths = secagg.keygen("keys")                                   # once per federation
    server = secagg.serve(paths.server, "127.0.0.1:0", "state")     # the aggregator
    secagg.create_round(server.address, "r1", template="site.keras", clients=3)
    secagg.submit(server.address, "r1", key=paths.client, client_id="site-1", model="site.keras", weight=812)
    secagg.fetch(server.address, "r1", key=paths.client, template="site.keras", out="global.keras", wait=60)

Clients encrypt with CKKS (TenSEAL/SEAL); the aggregator holds no secret key and only adds.
"""

import logging
import os

# gRPC prints INFO lines (e.g. every failed TLS handshake) straight to stderr, where secagg's
# commands print one line per error. It reads this when first imported; a value the user set wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from secagg.api import (
    Average, Receipt, cancel_round, create_round, fetch, fetch_average, list_rounds, round_status, serve, submit,
)
from secagg.errors import SecAggError
from secagg.keys import KeyPaths, keygen, load_client_key, load_server_key
from secagg.masking.settings import MaskSettings
from secagg.models import read_model, write_model
from secagg.rounds import RoundStatus, RoundSummary
from secagg.scaler import Scaler
from secagg.transport.tls import ClientTLS, ServerTLS

__all__ = [
    "Average", "ClientTLS", "KeyPaths", "MaskSettings", "Receipt", "RoundStatus", "RoundSummary", "Scaler", "SecAggError",
    "ServerTLS", "cancel_round", "create_round", "fetch", "fetch_average", "keygen", "list_rounds",
    "load_client_key", "load_server_key", "read_model", "round_status", "serve", "submit", "write_model",
]
__version__ = "0.1.0"

# A library does not print: without logging configured by the application (``secagg serve`` does),
# secagg's warnings (e.g. an aggregator on loopback without TLS) stay silent instead of reaching stderr.
logging.getLogger("secagg").addHandler(logging.NullHandler())
