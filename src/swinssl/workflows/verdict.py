"""Did pre-training pay off? A paired comparison of pre-trained and scratch models.

The two models of a pair differ only in their start weights (same cases, steps, seed), and
both are tested on the same cases; so each (test case, seed) gives one paired difference
``pretrained - scratch``. ``paired_verdict`` reports their mean, a bootstrap 95% interval of
that mean (resampling the pairs), a two-sided Wilcoxon signed-rank test (SciPy) and one
plain sentence:

- "pre-training helps: +0.06 Dice (95% CI +0.02..+0.10, p=0.01, n=12)" when the test rejects
  no difference at ``alpha`` and the interval lies above 0;
- "pre-training hurts: ..." when it rejects and the interval lies below 0;
- "no detectable difference: ..." otherwise (a few pairs never show an effect; this says so
  rather than reading a sign into noise).

The same comparison serves any two arms that differ in one thing (``subject`` names it): the
data-efficiency study's semi-supervised protocol pairs the pseudo-labelled stage with its base.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Verdict:
    mean: float  # mean paired difference, pretrained - scratch
    low: float  # bootstrap interval of the mean
    high: float
    p_value: float  # two-sided Wilcoxon signed-rank; 1 when every difference is 0
    n: int  # pairs
    sentence: str

    def to_dict(self) -> dict:
        return asdict(self)


def paired_verdict(pretrained: Sequence[float], scratch: Sequence[float], metric: str = "Dice",
                   alpha: float = 0.05, resamples: int = 10000, seed: int = 0,
                   subject: str = "pre-training") -> Verdict:
    """The verdict on paired scores (higher is better), element i of both being one (case, seed);
    ``subject`` is what the first arm adds over the second ("pre-training helps: ...")."""
    from scipy.stats import wilcoxon

    a, b = np.asarray(pretrained, dtype=np.float64), np.asarray(scratch, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"expected two equally long, non-empty lists of paired scores, got {a.shape} and {b.shape}")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    low, high = (float(q) for q in np.quantile(means, [alpha / 2, 1 - alpha / 2]))
    p = 1.0 if not np.any(diff) else float(wilcoxon(diff, zero_method="wilcox", alternative="two-sided").pvalue)
    mean = float(diff.mean())
    if p < alpha and low > 0:
        head = f"{subject} helps"
    elif p < alpha and high < 0:
        head = f"{subject} hurts"
    else:
        head = "no detectable difference"
    sentence = (f"{head}: {mean:+.3f} {metric} ({100 * (1 - alpha):.0f}% CI {low:+.3f}..{high:+.3f}, p={p:.2g}, "
                f"n={len(diff)})")
    return Verdict(mean, low, high, p, len(diff), sentence)
