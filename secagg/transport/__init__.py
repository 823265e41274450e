"""The gRPC layer: a thin servicer and client over the transport-free core in ``secagg.rounds``.

``secagg_pb2*.py`` are generated from ``proto/secagg.proto`` by ``make proto``; do not edit them.
"""
