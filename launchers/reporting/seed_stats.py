"""Confidence intervals across seeds: the statistics behind ``python -m launchers.report``.

The seeds of one config are independent draws of the run's outcome. For the mean of ``n`` such draws
the report uses the **Student-t interval** (95 %, ``n - 1`` degrees of freedom)::

    mean ± t_{0.975, n-1} * s / sqrt(n),      s = sample standard deviation (divisor n - 1)

It is exact when the outcome is normally distributed across seeds and is honest about how little a
handful of seeds says: with 3 seeds t_{0.975, 2} = 4.30, so the band is 2.2 times wider than the
normal approximation's 1.96 * s / sqrt(n) would draw it. A bootstrap is no alternative at n = 3 (ten
distinct resamples; it under-covers). Differences between two configs use **Welch's interval**
(unequal variances, Welch-Satterthwaite degrees of freedom), which does not assume that two configs
vary equally across seeds.

No scipy: the t quantile inverts the t distribution function, written with the regularized
incomplete beta function (continued fraction, modified Lentz), by bisection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean (or a difference of means) with the half-width of its confidence interval.

    ``half_width`` is NaN when the interval is undefined (fewer than 2 values on a side).
    """

    mean: float
    half_width: float
    n: int

    @property
    def defined(self) -> bool:
        return not math.isnan(self.half_width)

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0 (NaN half-width: False)."""
        return self.defined and (self.low > 0 or self.high < 0)


def _incomplete_beta_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of I_x(a, b) (converges fast for x < (a + 1) / (a + b + 2)), modified Lentz.

    I_x(a, b) = x^a (1-x)^b / (a B(a, b)) * 1 / (1 + d_1 / (1 + d_2 / (1 + ...))) with
    d_{2m+1} = -(a+m)(a+b+m) x / ((a+2m)(a+2m+1)),  d_{2m} = m (b-m) x / ((a+2m-1)(a+2m)).
    """
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 400):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) for 0 <= x <= 1, a, b > 0; uses I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction is slow."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _incomplete_beta_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _incomplete_beta_fraction(1.0 - x, b, a) / b


def t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t with ``dof`` degrees of freedom; for t >= 0 (the other side by symmetry):

    P(T <= t) = 1/2 + I_{t^2/(dof+t^2)}(1/2, dof/2) / 2 = 1 - I_{dof/(dof+t^2)}(dof/2, 1/2) / 2.

    The first (central) form is used for t^2 < dof, where it keeps full precision near t = 0 (the second
    loses it: dof / (dof + t^2) rounds to 1 for |t| below ~1e-8), the second in the tails.
    """
    t2 = t * t
    if t2 < dof:
        central = 0.5 * regularized_incomplete_beta(t2 / (dof + t2), 0.5, dof / 2)
        return 0.5 + central if t >= 0 else 0.5 - central
    tail = 0.5 * regularized_incomplete_beta(dof / (dof + t2), dof / 2, 0.5)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, dof: float) -> float:
    """The t with P(T <= t) = p (0.5 <= p < 1), by bisection on :func:`t_cdf` to 1e-12."""
    if not 0.5 <= p < 1 or not dof > 0:
        raise ValueError(f"t_quantile: needs 0.5 <= p < 1 and dof > 0 (got p={p}, dof={dof})")
    low, high = 0.0, 1.0
    while t_cdf(high, dof) < p:
        low, high = high, 2 * high
    while high - low > 1e-12 * max(1.0, high):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, dof) < p else (low, mid)
    return (low + high) / 2


def _variance(values: Sequence[float]) -> float:
    """Sample variance with divisor n - 1."""
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def mean_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean of ``values`` ± t_{(1+level)/2, n-1} * s / sqrt(n); half-width NaN when n < 2."""
    n = len(values)
    if n == 0:
        return Interval(float("nan"), float("nan"), 0)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, float("nan"), 1)
    return Interval(mean, t_quantile((1 + level) / 2, n - 1) * math.sqrt(_variance(values) / n), n)


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Interval:
    """mean(a) - mean(b) ± t_{(1+level)/2, nu} * se (Welch); half-width NaN unless both sides have 2+ values.

    se^2 = s_a^2 / n_a + s_b^2 / n_b;  nu = se^4 / ((s_a^2/n_a)^2 / (n_a - 1) + (s_b^2/n_b)^2 / (n_b - 1)).
    Both sides without any spread give a zero half-width.
    """
    diff = sum(a) / len(a) - sum(b) / len(b) if a and b else float("nan")
    if len(a) < 2 or len(b) < 2:
        return Interval(diff, float("nan"), min(len(a), len(b)))
    va, vb = _variance(a) / len(a), _variance(b) / len(b)
    if va + vb == 0:
        return Interval(diff, 0.0, min(len(a), len(b)))
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return Interval(diff, t_quantile((1 + level) / 2, dof) * math.sqrt(va + vb), min(len(a), len(b)))
