"""A masked round's settings: threshold, neighbour degree, stage timeout (part of every contribution's terms)."""

from __future__ import annotations

import dataclasses

from secagg.errors import MaskingError
from secagg.masking import graph

#: Seconds each stage waits for the sites before it goes on without the missing ones (or fails).
DEFAULT_STAGE_SECONDS = 300.0


@dataclasses.dataclass(frozen=True)
class MaskSettings:
    """``threshold``/``degree`` 0: the defaults for the cohort (:mod:`secagg.masking.graph`)."""

    threshold: int = 0
    degree: int = 0
    stage_seconds: float = DEFAULT_STAGE_SECONDS

    def degree_for(self, n: int) -> int:
        return min(self.degree, n - 1) if self.degree else graph.default_degree(n)

    def threshold_for(self, n: int) -> int:
        return self.threshold or graph.default_threshold(n, self.degree_for(n))

    def validate(self, n: int) -> None:
        """For a cohort of ``n``: a threshold of at least a majority of the share holders, at most all of them."""
        if not self.stage_seconds > 0:
            raise MaskingError(f"--stage-timeout must be a positive number of seconds, got {self.stage_seconds}")
        d = self.degree_for(n)
        if self.degree and d < n - 1 and (d < 2 or d % 2):
            raise MaskingError(f"--mask-degree {self.degree}: use an even number of at least 2 (or leave it out)")
        holders = graph.holders_count(n, d)
        low = graph.default_threshold(n, d)
        if self.threshold and not low <= self.threshold <= holders:
            raise MaskingError(
                f"--mask-threshold {self.threshold} for {holders} share holders per site: it must be between {low} (a "
                f"majority: fewer would let {self.threshold} colluding sites with the aggregator unmask a site) and "
                f"{holders}")
        if n < 3:
            raise MaskingError(f"a masked round needs at least 3 sites, got {n}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MaskSettings":
        try:
            return cls(int(d.get("threshold", 0)), int(d.get("degree", 0)),
                       float(d.get("stage_seconds", DEFAULT_STAGE_SECONDS)))
        except (TypeError, ValueError, AttributeError) as exc:
            raise MaskingError(f"malformed masking settings ({exc})") from None
