"""The cost model's weights, as an operator sets them (`cost_model:` in the dispatcher's,
the node agent's and `rolemesh simulate`'s cluster file).

The decision (`rolemesh.decision`) prices every candidate in expected seconds: the wait
behind its queue, a weighted load, the regret of what it evicts. These weights say what a
load is worth against waiting, which is the operator's call: a cluster whose loads come
from a slow disk, or whose GPUs are shared, wants fewer loads and accepts longer queues;
one that loads from page cache wants copies as soon as a queue forms. `rolemesh simulate
--cost-model` measures the trade on your own traffic before you change it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rolemesh.decision import Policy

_DEFAULT = Policy()  # the defaults live in one place: the decision's own Policy


class CostModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # A request's device time before the node has measured its model's.
    default_service_s: float = Field(default=_DEFAULT.default_service_s, gt=0)
    # A load counts this many times its seconds (the GPU time it takes, the churn it adds).
    load_weight: float = Field(default=_DEFAULT.load_weight, ge=0)
    # An evicted model is missed if it is wanted again within this many seconds.
    regret_horizon_s: float = Field(default=_DEFAULT.regret_horizon_s, gt=0)
    # Another copy of a running model pays this many times the regret of what it evicts:
    # it adds throughput for a while, and each sole copy it evicts must load again.
    copy_regret_weight: float = Field(default=_DEFAULT.copy_regret_weight, ge=0)
    # A load on an idle device (nothing queued, running or loading there) counts this many
    # times its seconds; unset, as any load (`load_weight`).
    idle_load_weight: float | None = Field(default=_DEFAULT.idle_load_weight, ge=0)

    def policy(self, *, memory_safety_margin: float, busy_retry_after_s: float = 1.0
               ) -> Policy:
        return Policy(memory_safety_margin=memory_safety_margin,
                      busy_retry_after_s=busy_retry_after_s,
                      default_service_s=self.default_service_s, load_weight=self.load_weight,
                      regret_horizon_s=self.regret_horizon_s,
                      copy_regret_weight=self.copy_regret_weight,
                      idle_load_weight=self.idle_load_weight)

    def overridden(self, settings: list[str]) -> CostModel:
        """These weights with `NAME=VALUE` settings applied (the CLI's), validated."""
        values = self.model_dump()
        for setting in settings:
            name, sep, value = setting.partition("=")
            name = name.strip()
            if not sep or name not in values:
                known = ", ".join(values)
                raise ValueError(f"{setting!r}: expected NAME=VALUE with NAME one of {known}")
            values[name] = value.strip()
        try:
            return CostModel.model_validate(values)
        except ValidationError as exc:
            why = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                            for e in exc.errors())
            raise ValueError(why) from None
