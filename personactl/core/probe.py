"""A logistic-regression probe direction per layer row, from per-example activations. No I/O.

Choices, and why:
- Features are centred per dimension and scaled by one number per row (the root mean square of the
  centred values), not z-scored per dimension: the direction is used in the raw residual stream, and
  a per-dimension scale would let near-constant dimensions dominate it. One scalar keeps the geometry,
  so the fitted weights are the raw-space direction, and makes `L2` mean the same at every row
  (stream norms differ a hundredfold between rows).
- Loss: mean binary cross-entropy + `L2`/2 · ‖w‖² (bias not penalised), float64, full batch, L-BFGS
  with a strong-Wolfe line search: convex with one minimum, no randomness, so a fit is repeatable.
  Strong regularisation tends to the mean difference, none to a max-margin direction that, with
  more hidden units than examples (the usual case), fits the noise of the few examples. `L2` = 0.1
  (in units of the average per-dimension variance) recovered planted directions best on synthetic
  data with a high-variance nuisance direction (0.03–0.3 about equal; 1e-3 and 3 clearly worse); on
  SmolLM2's responses held-out accuracy barely moved between 1e-3 and 1.
- Held-out accuracy: pairs (both members together, so a pair's twin never predicts it) are
  shuffled with a CPU generator seeded by `seed`; the first `HOLDOUT` of them (at least one, when
  there are two or more) are held out. The probe fitted on the rest classifies the held-out examples
  (logit > 0 means positive). The direction returned is then refitted on every pair, so the
  accuracy estimates the procedure, not that exact vector.
- Sign: the unit direction is signed to agree with the mean difference (pos − neg), as PCA's is.
- No direction: where every pair's two examples are equal (`prompt_end` when pos and neg share their
  prompt) or every example is, the row is NaN, as in PCA, and has no accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

L2 = 0.1  # penalty on the mean loss, features at unit average variance per dimension
HOLDOUT = 0.2  # share of pairs held out for the accuracy
MAX_ITER = 500
PROBE_RULE = (
    "logistic regression per row, pos examples 1 and neg 0: features centred and scaled by one "
    "number per row (RMS), loss mean BCE + l2/2 ||w||^2, float64 L-BFGS; unit norm, signed to agree "
    "with the mean difference; accuracy = held-out examples classified right by a probe fitted on the "
    "other pairs (split by pair, seeded), direction refitted on all pairs"
)


@dataclass
class ProbeFit:
    directions: torch.Tensor  # [R, H] float32, unit; NaN where no direction tells pos from neg
    accuracy: torch.Tensor  # [R] float64 held-out accuracy; NaN without held-out pairs
    train_pairs: int
    test_pairs: int


def split_pairs(n_pairs: int, seed: int, holdout: float = HOLDOUT) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) pair indices, each sorted: a seeded shuffle, the first `holdout` share held out
    (at least one pair when there are two or more; none for a single pair)."""
    order = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(seed))
    n_test = 0 if n_pairs < 2 else min(n_pairs - 1, max(1, round(holdout * n_pairs)))
    return order[n_test:].sort().values, order[:n_test].sort().values


@dataclass
class _Frame:
    """How a fit standardised its features: per row the mean [R, 1, H] and one scale [R, 1, 1]."""

    mean: torch.Tensor
    scale: torch.Tensor
    flat: torch.Tensor  # [R] rows where every example is the same (scale 1 there, features all zero)

    @classmethod
    def of(cls, x: torch.Tensor) -> _Frame:
        mean = x.mean(1, keepdim=True)
        rms = (x - mean).square().mean((1, 2), keepdim=True).sqrt()
        flat = rms == 0
        return cls(mean, torch.where(flat, torch.ones_like(rms), rms), flat.flatten())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


def fit_logistic(
    z: torch.Tensor, labels: torch.Tensor, l2: float = L2, max_iter: int = MAX_ITER
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [R, H] and biases [R] minimising, for every row at once, mean BCE + l2/2 ‖w‖² on
    standardised features `z` [R, M, H] (float64) with `labels` [M] in {0, 1}. Rows are independent,
    so one L-BFGS over their summed losses reaches each row's own minimum."""
    y = labels.to(z.dtype)
    w = torch.zeros(z.shape[0], z.shape[2], dtype=z.dtype, requires_grad=True)
    b = torch.zeros(z.shape[0], dtype=z.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = torch.einsum("rmh,rh->rm", z, w) + b[:, None]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.expand_as(logits), reduction="none")
        total = loss.mean(1).sum() + 0.5 * l2 * w.square().sum()
        total.backward()
        return total

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach(), b.detach()


def _examples(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs' activations [N, R, H] as features [R, 2N, H] float64 and labels [2N] (pos 1, neg 0)."""
    x = torch.cat([pos, neg]).transpose(0, 1).double()
    return x, torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])


def _fit(x: torch.Tensor, labels: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor, _Frame]:
    """Fit on features `x` [R, M, H]: weights [R, H] (on features scaled by one number per row, so
    their direction is the raw-space direction), bias [R] and the standardisation."""
    frame = _Frame.of(x.double())
    w, b = fit_logistic(frame.apply(x.double()), labels, l2)
    return w, b, frame


def direction(x: torch.Tensor, labels: torch.Tensor, l2: float = L2) -> torch.Tensor:
    """The probe direction [R, H] float32 of examples `x` [R, M, H] labelled 1 (positive) or 0:
    unit norm, signed to agree with the positives' mean minus the negatives'; NaN at rows where
    every example is the same or the fit found nothing (weights exactly zero)."""
    w, _, frame = _fit(x, labels, l2)
    positive = labels.bool()
    reference = x[:, positive].double().mean(1) - x[:, ~positive].double().mean(1)
    sign = torch.sign((w * reference).sum(-1, keepdim=True))
    sign[sign == 0] = 1
    out = w * sign / torch.linalg.vector_norm(w, dim=-1, keepdim=True).clamp(min=1e-300)
    out[frame.flat | (w == 0).all(-1)] = float("nan")
    return out.float()


def fit_probe(pos: torch.Tensor, neg: torch.Tensor, *, seed: int, l2: float = L2, holdout: float = HOLDOUT) -> ProbeFit:
    """The probe direction and held-out accuracy per row, from the pairs' activations `pos` and
    `neg` [N, R, H] (example i of each is pair i)."""
    if pos.shape != neg.shape or pos.ndim != 3 or len(pos) == 0:
        raise ValueError(f"pos and neg must be [N, R, H] alike, got {list(pos.shape)} and {list(neg.shape)}")
    train, test = split_pairs(len(pos), seed, holdout)
    accuracy = torch.full((pos.shape[1],), float("nan"), dtype=torch.float64)
    if len(test):
        w, b, frame = _fit(*_examples(pos[train], neg[train]), l2)
        x, labels = _examples(pos[test], neg[test])
        logits = torch.einsum("rmh,rh->rm", frame.apply(x), w) + b[:, None]
        accuracy = ((logits > 0) == labels.bool()).double().mean(1)  # logit > 0: called positive
    directions = direction(*_examples(pos, neg), l2)
    directions[(pos == neg).all(2).all(0)] = float("nan")  # every pair the same on both sides, as PCA says
    accuracy[directions.isnan().any(-1)] = float("nan")
    return ProbeFit(directions, accuracy, len(train), len(test))
