"""The model of llama-server that stands in for the processes: pure arithmetic.

A request's work is counted in seconds on its device running it alone: prefill (prompt
tokens at the model's prefill speed) then decode (completion tokens at its decode speed),
both scaled by the device's speed. A device shares its throughput equally among the
requests it runs at once (processor sharing), whether they are parallel slots of one
model or requests for co-resident models: k requests each progress at 1/k speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

from rolemesh.simulate.cluster import OutputTokens, SimDevice, SimModel

_NORMAL = NormalDist()


@dataclass(frozen=True, slots=True)
class Work:
    prefill_s: float  # seconds alone until the first token
    decode_s: float  # seconds alone from the first token to the last

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s


def output_tokens(dist: OutputTokens, u: float) -> int:
    """The completion length at quantile `u` (0 < u < 1) of a lognormal with that mean."""
    if dist.sigma == 0:
        return min(dist.max, max(1, round(dist.mean)))
    mu = math.log(dist.mean) - dist.sigma ** 2 / 2
    u = min(max(u, 1e-9), 1 - 1e-9)
    value = math.exp(mu + dist.sigma * _NORMAL.inv_cdf(u))
    return min(dist.max, max(1, round(value)))


def work_of(model: SimModel, device: SimDevice, prompt_tokens: int,
            completion_tokens: int) -> Work:
    speed = device.speed
    return Work(prefill_s=prompt_tokens / model.prefill_tokens_per_s / speed,
                decode_s=completion_tokens / model.tokens_per_s / speed)


def fits(need_mb: int, total_mb: int | None, margin: float) -> bool:
    """The decision's test: a need fits when need <= total x margin (unknown total fits)."""
    return total_mb is None or need_mb <= total_mb * margin


def usable_mb(total_mb: int | None, margin: float) -> float:
    return math.inf if total_mb is None else total_mb * margin
