"""Ray Serve's ``serve.autoscaling_policy``: the default policy as a function of an
``AutoscalingContext``, for custom policies that build on it.

serval's controller does not call this function: it runs its own implementation of the same
rule (``_private/controller/autoscaling.py``) for every deployment without a custom policy.
A custom policy returns the *raw* number of replicas it wants; ``upscaling_factor``,
``downscaling_factor``, ``min_replicas``/``max_replicas`` and the delays are applied on top,
as for the built-in policy.
"""

from __future__ import annotations

import math
from typing import Any

from serval.config import AutoscalingConfig, AutoscalingContext

__all__ = ["default_autoscaling_policy", "replica_queue_length_autoscaling_policy"]


def replica_queue_length_autoscaling_policy(
    ctx: AutoscalingContext,
) -> tuple[int | float, dict[str, Any]]:
    """Enough replicas for ``target_ongoing_requests`` each: total requests / target.

    With no replica running and requests waiting: at least one (more with an
    ``upscaling_factor`` above 1), at once.
    """
    config = ctx.config if isinstance(ctx.config, AutoscalingConfig) else AutoscalingConfig()
    if ctx.current_num_replicas == 0:
        if ctx.total_num_requests > 0:
            factor = config.upscaling_factor or 1.0
            return max(math.ceil(factor), ctx.target_num_replicas), {}
        return ctx.target_num_replicas, {}
    return ctx.total_num_requests / config.target_ongoing_requests, {}


default_autoscaling_policy = replica_queue_length_autoscaling_policy
