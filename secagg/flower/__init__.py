"""secagg inside Flower (``pip install "secagg[flower]"``): Flower's fleet carries secagg's encrypted rounds.

- :data:`secagg_mod` / :class:`SecAggMod` (client, :mod:`secagg.flower.mod`): the first mod of a
  ``ClientApp``; decrypts the global model on the way in, encrypts the trained model on the way out.
- :class:`EncryptedFedAvg` (server, :mod:`secagg.flower.strategy`): FedAvg over secagg's aggregator
  core; holds no secret key and never sees an update or the sum.

The two halves are imported lazily, so that a ServerApp never loads TenSEAL.
"""

from __future__ import annotations

__all__ = ["EncryptedFedAvg", "SecAggMod", "secagg_mod"]


def __getattr__(name: str):
    if name in ("SecAggMod", "secagg_mod"):
        from secagg.flower import mod

        return getattr(mod, name)
    if name == "EncryptedFedAvg":
        from secagg.flower.strategy import EncryptedFedAvg

        return EncryptedFedAvg
    raise AttributeError(f"module 'secagg.flower' has no attribute {name!r}")
