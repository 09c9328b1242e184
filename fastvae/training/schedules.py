"""KL-weight schedules: pure functions of the optimizer step.

``step`` counts the optimizer steps taken before the current one (0 for the first step of a
run). Every schedule returns a weight in [0, 1] that multiplies the configured beta, except
``capacity``, which returns the KL target C of the capacity objective in nats.

- ``ramp(u, shape)``: the rise from 0 (``u <= 0``) to 1 (``u >= 1``); ``"linear"`` is ``u``,
  ``"logistic"`` is the logistic ``s(u) = 1 / (1 + exp(-k (u - 1/2)))`` with k = 10, rescaled
  to pass through 0 at u = 0 and 1 at u = 1: ``(s(u) - s(0)) / (s(1) - s(0))``.
- ``monotonic(step, steps, shape)``: one rise over ``steps`` steps, then 1 (KL warm-up,
  Bowman et al. 2016 for the logistic shape).
- ``cyclical(step, total_steps, cycles, ratio, shape)``: the cyclical schedule of Fu et al.
  (2019): the run's ``total_steps`` split into ``cycles`` periods of ``total_steps / cycles``
  steps; in each, with ``tau`` = the fraction of the period done, the weight rises as
  ``ramp(tau / ratio)`` over the first ``ratio`` of the period and stays at 1 for the rest.
- ``capacity(step, c_max, steps)``: the capacity C of Burgess et al. (2018), raised linearly
  from 0 to ``c_max`` nats over ``steps`` steps; their objective is ``nll + beta * |KL - C|``.
"""

from __future__ import annotations

import math

SHAPES = ("linear", "logistic")
LOGISTIC_STEEPNESS = 10.0


def _logistic(u: float) -> float:
    return 1.0 / (1.0 + math.exp(-LOGISTIC_STEEPNESS * (u - 0.5)))


def ramp(u: float, shape: str = "linear") -> float:
    """The rise from 0 to 1 as ``u`` goes from 0 to 1 (clamped outside), of ``shape``
    ``"linear"`` or ``"logistic"``."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    u = min(1.0, max(0.0, u))
    if shape == "linear":
        return u
    lo, hi = _logistic(0.0), _logistic(1.0)
    return (_logistic(u) - lo) / (hi - lo)


def monotonic(step: int, steps: float, shape: str = "linear") -> float:
    """``ramp(step / steps)``: 0 at step 0, 1 from step ``steps`` on (1 throughout when
    ``steps`` is 0)."""
    return ramp(step / steps, shape) if steps > 0 else 1.0


def cyclical(step: int, total_steps: float, cycles: int, ratio: float = 0.5,
             shape: str = "linear") -> float:
    """Fu et al.'s cyclical weight: ``ramp(tau / ratio)``, ``tau = (step mod P) / P`` with the
    period ``P = total_steps / cycles``."""
    if cycles < 1 or not 0 < ratio <= 1 or not total_steps > 0:
        raise ValueError(f"cyclical needs cycles >= 1, 0 < ratio <= 1 and total_steps > 0, "
                         f"got {cycles}, {ratio}, {total_steps}")
    period = total_steps / cycles
    tau = math.fmod(step, period) / period
    return ramp(tau / ratio, shape)


def capacity(step: int, c_max: float, steps: float) -> float:
    """The KL target ``C = c_max * min(1, step / steps)`` in nats (``c_max`` when ``steps`` is
    0)."""
    return c_max * min(1.0, step / steps) if steps > 0 else c_max
