"""The threshold of a steering condition that maximises F1 on labelled projections (pure math).

A prompt passes when its projection is above the threshold. Candidates are the midpoints between
consecutive distinct sorted projections, so every way of splitting the sorted prompts in two is
tried once. F1 is compared exactly (as a fraction of counts); among equal F1 the wider gap between
the two neighbouring projections wins (the split least sensitive to noise), then the smaller threshold.
The threshold returned is the shortest decimal in the middle half of that gap, so `--when
…:THRESHOLD` written from it decides every fitted prompt the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from personactl.errors import InputError


@dataclass(frozen=True)
class ThresholdFit:
    """The best split of one layer's projections: threshold, its F1 and the counts behind it."""

    threshold: float
    f1: float
    precision: float
    recall: float
    below: float  # the largest projection below the threshold
    above: float  # the smallest projection above it
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def gap(self) -> float:
        return self.above - self.below


def f1_of(tp: int, fp: int, fn: int) -> Fraction:
    """F1 = 2TP / (2TP + FP + FN), exactly; 0 when nothing is right."""
    return Fraction(2 * tp, 2 * tp + fp + fn) if tp else Fraction(0)


def best_threshold(projections: Sequence[float], labels: Sequence[int]) -> ThresholdFit | None:
    """The threshold maximising F1 of `projection > threshold` against `labels` (1 = should steer);
    None when every projection is the same (no split exists)."""
    check_labels(labels)
    if len(projections) != len(labels):
        raise ValueError("one label per projection")
    pairs = sorted(zip((float(p) for p in projections), labels, strict=True))
    positives = sum(labels)
    best: tuple[Fraction, float, int] | None = None  # (F1, gap, index of the last prompt below)
    seen_positive = 0
    for i in range(len(pairs) - 1):
        seen_positive += pairs[i][1]
        lo, hi = pairs[i][0], pairs[i + 1][0]
        if not lo < hi:
            continue
        tp = positives - seen_positive
        score = f1_of(tp, (len(pairs) - i - 1) - tp, seen_positive)
        if best is None or (score, hi - lo) > best[:2]:  # strictly better: ties keep the smaller threshold
            best = (score, hi - lo, i)
    if best is None:
        return None
    i = best[2]
    tp = positives - sum(label for _, label in pairs[: i + 1])
    fp, fn = (len(pairs) - i - 1) - tp, positives - tp
    lo, hi = pairs[i][0], pairs[i + 1][0]
    return ThresholdFit(
        threshold=float(threshold_text(lo, hi)),
        f1=float(best[0]),
        precision=tp / (tp + fp) if tp + fp else 0.0,
        recall=tp / positives,
        below=lo,
        above=hi,
        tp=tp,
        fp=fp,
        fn=fn,
        tn=len(pairs) - tp - fp - fn,
    )


def check_labels(labels: Sequence[int]) -> None:
    """Labels are 0 or 1, with at least one of each (F1 of one class alone says nothing)."""
    if any(label not in (0, 1) for label in labels):
        raise InputError("labels must be 0 or 1", hint='write lines like {"text": "...", "label": 1}')
    if not 0 < sum(labels) < len(labels):
        raise InputError(
            "the labelled prompts hold only one class", hint="give prompts labelled 1 (steer) and 0 (do not)"
        )


def threshold_text(lo: float, hi: float) -> str:
    """The shortest decimal in the middle half of the gap from `lo` to `hi` (`lo < hi`): short to
    write, and at least a quarter of the gap away from either neighbour."""
    mid, quarter = lo + (hi - lo) / 2, (hi - lo) / 4
    for decimals in range(18):
        text = f"{mid:.{decimals}f}"
        if lo + quarter <= float(text) <= hi - quarter and lo < float(text) < hi:
            return text
    return repr(mid)


def baseline_f1(labels: Sequence[int]) -> float:
    """The F1 of steering every prompt (no condition): what a fitted threshold has to beat."""
    positives = sum(labels)
    return float(f1_of(positives, len(labels) - positives, 0))
