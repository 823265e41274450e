"""Benchmark-only plaintext aggregator: the baseline that ``wire.py`` compares secagg against.

It speaks secagg's own gRPC service and message layout (``Submit``: one header, then chunks of
blobs with their digests), but the blobs (in the chunks' ``c0`` field, with empty seeds) are raw
little-endian float32 values, 8192 per blob (the last one zero-padded), 24 blobs per chunk: the same
streaming shape as secagg's ciphertexts. It validates the envelope with secagg's ``ChunkValidator``
(order, exact sizes, per-chunk and overall SHA-256 digests) and adds the values into a float64
running sum with numpy. No encryption, no disk, no durability: the minimal plaintext
federated-averaging server.

Run: ``python benchmarks/_plain_server.py --listen 127.0.0.1:0``; it prints
``plain: serving on HOST:PORT`` to stderr once it accepts connections. SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent import futures

import grpc
import numpy as np

from secagg.envelope import MAX_MESSAGE_BYTES, ChunkValidator, Header
from secagg.errors import SecAggError
from secagg.transport import secagg_pb2 as pb
from secagg.transport import secagg_pb2_grpc as pb_grpc
from secagg.transport.allocator import tune_malloc
from secagg.transport.server import ADMITTED_KEY, add_servicer

VALUES_PER_BLOB = 8192  # float32 values per blob, like the 8192 reals per secagg ciphertext


class PlainServicer(pb_grpc.AggregatorServicer):
    """Submit only: sums float32 updates per round id; every other method is unimplemented."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sums: dict[str, np.ndarray] = {}
        self._counts: dict[str, int] = {}

    def GetServerInfo(self, request, context):
        return pb.ServerInfo(format_version=1)

    def Submit(self, request_iterator, context):
        context.send_initial_metadata(((ADMITTED_KEY, "1"),))  # the secagg client streams its chunks after it
        first = next(request_iterator, None)
        if first is None or first.header is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an update must start with its header")
        h = first.header
        header = Header(h.round_id, h.client_id, h.key_id, h.spec_hash, h.num_ciphertexts, h.num_chunks, h.digest,
                        format_version=h.format_version)
        validator = ChunkValidator(header, c0_size=VALUES_PER_BLOB * 4, seed_size=0)
        with self._lock:
            total = self._sums.get(h.round_id)
            if total is None:
                total = self._sums[h.round_id] = np.zeros(h.num_ciphertexts * VALUES_PER_BLOB)
        pos = 0
        try:
            # A real server would add into a scratch buffer and commit after the digest check; the
            # benchmark adds in place (same arithmetic work, no second buffer).
            for msg in request_iterator:
                if msg.chunk is None:
                    raise SecAggError(msg.error or "a second header inside an update")
                for blob, _ in validator.accept(msg.chunk):
                    values = np.frombuffer(blob, dtype="<f4")
                    total[pos : pos + values.size] += values
                    pos += values.size
            validator.finish()
        except SecAggError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        with self._lock:
            self._counts[h.round_id] = self._counts.get(h.round_id, 0) + 1
            n = self._counts[h.round_id]
        return pb.SubmitReply(round_id=h.round_id, client_id=h.client_id, submitted=n)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="127.0.0.1:0")
    args = p.parse_args()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
    )
    tune_malloc()  # the same allocator settings and zero-copy message reader as secagg serve
    add_servicer(PlainServicer(), server)
    port = server.add_insecure_port(args.listen)
    if port == 0:
        print(f"plain: cannot listen on {args.listen}", file=sys.stderr)
        return 1
    server.start()
    print(f"plain: serving on {args.listen.rsplit(':', 1)[0]}:{port}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(1.0))
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
