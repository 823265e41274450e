"""What a site does to its update before it is encrypted, whatever carries it (secagg's gRPC, Flower).

One path for every transport, so that the round's DP, the site's own policy and the value bound
are applied the same way: tensors -> flat vector in the round's order -> the site policy's check ->
clip and noise (the round's DP or the site's local DP) -> clamp to the round's value bound. Masking,
encryption and sealing follow in :mod:`secagg.updates`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from secagg.errors import PrivacyError
from secagg.packing import ModelSpec, flatten
from secagg.privacy.mechanism import DPConfig, privatize
from secagg.rounds import RoundStatus

if TYPE_CHECKING:
    from secagg.site_policy import SitePolicy


@dataclasses.dataclass(frozen=True)
class Plaintext:
    """A site's update as it will be encrypted: the flat vector, its weight and the DP applied to it."""

    theta: np.ndarray
    weight: float
    dp: DPConfig | None
    #: SHA-256 of the update before any noise: the site policy records a release under it, so that
    #: resending the same update is not counted twice.
    digest: str


def submission_dp(status: RoundStatus, local_dp: DPConfig | None, weight: float) -> DPConfig | None:
    """The DP a submission gets: the round's, or the site's own local DP; None for neither."""
    round_dp = DPConfig.from_dict(status.dp) if status.dp else None
    if local_dp is not None:
        local_dp.validate()
        if round_dp is not None and local_dp != round_dp:
            raise PrivacyError(
                f"round {status.round_id!r} has its own DP settings ({round_dp.to_dict()}); drop the site's DP options "
                "or give exactly the round's"
            )
        if round_dp is None and local_dp.mode != "local":
            raise PrivacyError("a site on its own can only add --dp-mode local noise; distributed noise needs the round's "
                               "DP settings, so that every site adds its share")
    dp = round_dp or local_dp
    if dp is not None and float(weight) != 1.0:
        raise PrivacyError("DP rounds average with equal weights (one site's clipped contribution is the sensitivity); "
                           "drop --weight")
    return dp


def plaintext_update(key_id: str, status: RoundStatus, spec: ModelSpec, tensors: Mapping[str, np.ndarray],
                     weight: float, *, dp_reference: Mapping[str, np.ndarray] | None = None,
                     local_dp: DPConfig | None = None, rng: np.random.Generator | None = None,
                     policy: SitePolicy | None = None) -> Plaintext:
    """The vector a site encrypts for the round: flattened, checked against the site's policy, privatized.

    ``dp_reference``: the model every site knows (e.g. the previous global model); DP clips the
    update relative to it. Raises before anything is noised if the policy or the round's DP refuses.
    """
    theta = flatten(spec, tensors)
    dp = submission_dp(status, local_dp, weight)
    plain = hashlib.sha256(theta.tobytes() + np.float64(weight).tobytes()).hexdigest()
    if policy is not None:
        policy.check(status, key_id, local_dp=local_dp, update=plain)
    if dp is not None and dp.unit == "row":
        from secagg.privacy.statistics import RowSums

        if not isinstance(tensors, RowSums) or tensors.clip_norm > dp.clip_norm:
            raise PrivacyError(
                f"round {status.round_id!r} is a row-level DP round (clip norm {dp.clip_norm:g} per row): submit "
                "statistics built by secagg.privacy.statistics.second_moments with at most that clip norm; anything "
                "else would get noise without its rows being clipped")
    if dp is not None:
        reference = None if dp_reference is None else flatten(spec, dp_reference)
        # Clamping to the round's value bound after the noise is post-processing: it costs no
        # privacy and keeps a large noise draw from overflowing the encrypted sum.
        theta = np.clip(privatize(theta, dp, reference, rng), -status.value_bound, status.value_bound)
    return Plaintext(theta, float(weight), dp, plain)
