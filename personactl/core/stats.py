"""Small, dependency-free statistics for `eval`: t-intervals, least-squares slopes, Cohen's d.

No scipy: the Student t quantile comes from the regularized incomplete beta function (Lentz's
continued fraction, as in Numerical Recipes) inverted by bisection, accurate to ~1e-10.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

CI_METHOD = (
    "Student t-interval, 95%: mean ± t(0.975, n-1)·s/√n over the scored samples, clipped to the score "
    "scale 0–100 (None for n < 2)"
)


def _betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
            if aa < 0 and abs(d * c - 1.0) < eps:
                return h
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Inverse of `t_cdf` for 0 < p < 1 (bisection on a monotone function)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError("need 0 < p < 1 and df > 0")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2.0


@dataclass(frozen=True)
class MeanCI:
    mean: float | None
    low: float | None
    high: float | None
    n: int  # scored samples
    missing: int  # samples without a score (None)

    def as_dict(self, prefix: str) -> dict[str, float | int | None]:
        return {f"{prefix}_{k}": v for k, v in asdict(self).items()}


def mean_ci(
    values: Sequence[float | None], confidence: float = 0.95, bounds: tuple[float, float] | None = None
) -> MeanCI:
    """Mean and two-sided t-interval over the non-None values; None where it is undefined
    (no value: no mean; one value: no interval, since one sample says nothing about spread).
    `bounds`: the scale's ends; the interval is clipped to them (a mean of 0–100 scores cannot
    lie outside 0–100, though a t-interval from few samples reaches past them)."""
    scored = [float(v) for v in values if v is not None and not math.isnan(v)]
    n, missing = len(scored), len(values) - len(scored)
    if n == 0:
        return MeanCI(None, None, None, 0, missing)
    mean = sum(scored) / n
    if n == 1:
        return MeanCI(mean, None, None, 1, missing)
    sd = math.sqrt(sum((v - mean) ** 2 for v in scored) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(bounds[0], low), min(bounds[1], high)
    return MeanCI(mean, low, high, n, missing)


def slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Ordinary least-squares slope of y on x; None with fewer than two distinct x."""
    if len(xs) != len(ys) or len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def cohens_d(pos: Sequence[float], neg: Sequence[float]) -> float | None:
    """(mean pos − mean neg) / pooled standard deviation; None when undefined (n < 2 or no spread)."""
    if len(pos) < 2 or len(neg) < 2:
        return None
    mp, mn = sum(pos) / len(pos), sum(neg) / len(neg)
    vp = sum((v - mp) ** 2 for v in pos) / (len(pos) - 1)
    vn = sum((v - mn) ** 2 for v in neg) / (len(neg) - 1)
    pooled = math.sqrt(((len(pos) - 1) * vp + (len(neg) - 1) * vn) / (len(pos) + len(neg) - 2))
    return (mp - mn) / pooled if pooled > 0 else None


def cohens_d_interval(d: float, n_pos: int, n_neg: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Large-sample interval of Cohen's d: d ± z·SE with SE² = (n₁+n₂)/(n₁n₂) + d²/(2(n₁+n₂))
    (Hedges & Olkin 1985); None when either group has fewer than two members."""
    if n_pos < 2 or n_neg < 2:
        return None
    se = math.sqrt((n_pos + n_neg) / (n_pos * n_neg) + d * d / (2 * (n_pos + n_neg)))
    z = math.sqrt(2) * _erfinv(confidence)
    return d - z * se, d + z * se


def _erfinv(y: float) -> float:
    """Inverse error function by Newton's method on math.erf (|y| < 1)."""
    x = 0.0
    for _ in range(60):
        step = (math.erf(x) - y) / (2 / math.sqrt(math.pi) * math.exp(-x * x))
        x -= step
        if abs(step) < 1e-14:
            break
    return x
