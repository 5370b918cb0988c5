"""Which arms of a multi-arm study beat which, corrected for the number of comparisons.

An arm is one way of getting a model (``scratch``, one per pre-training, ``nnunet``; or one checkpoint
of a bake-off), tested on the same units (a test case and seed, e.g. ``"case|seed"``). ``compare_arms``
compares every pair of arms on the units both have with ``paired_verdict`` (mean difference, bootstrap
interval, Wilcoxon signed-rank), adds Cohen's d_z with its bootstrap interval, and corrects the
Wilcoxon p-values with Holm's step-down method (``holm``): k arms make k(k-1)/2 comparisons, and
uncorrected some of them would come out "significant" by chance. Holm applies within a *family*, the
comparisons one claim rests on (e.g. every pair on one dataset at one label fraction); ``holm_across``
re-applies it to a family assembled from several calls.

Across settings (datasets, fractions) ``mean_ranks`` ranks the arms in each setting and averages the
ranks; ``rank_table_markdown`` shows them. ``significance_matrix`` and ``plot_significance_map`` show one
family as an arms x arms map, as the Touchstone benchmark's figures do.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from swinssl.plots import save_figure
from swinssl.workflows.verdict import paired_verdict


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order: with p_(1) <= ... <= p_(m) sorted,
    adj_(i) = max over j <= i of min(1, (m - j + 1) p_(j)). A hypothesis is rejected where adj < alpha."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"expected a flat list of p-values, got shape {p.shape}")
    bad = p[~((p >= 0) & (p <= 1))]  # NaN fails both comparisons
    if bad.size:
        raise ValueError(f"p-values must lie in [0, 1], got {float(bad[0])!r}")
    m = len(p)
    order = np.argsort(p, kind="stable")
    # The running max keeps the step-down monotone: a larger raw p never gets a smaller adjusted one.
    adjusted = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


@dataclass(frozen=True)
class Comparison:
    """Arm ``first`` against arm ``second`` on the units both have: one pair of a Holm family."""

    family: str  # the comparisons Holm corrects together, e.g. "dev:phantoms@0.5"
    dataset: str
    fraction: float  # labelled fraction of the training cases
    first: str
    second: str
    n: int  # paired units
    mean: float  # mean difference, first - second
    low: float  # bootstrap (1 - alpha) interval of the mean, 95% by default
    high: float
    p_value: float  # two-sided Wilcoxon signed-rank, uncorrected; 1 when every difference is 0
    p_holm: float  # Holm-corrected within the family
    # Cohen's d_z = mean / sd (ddof=1) of the differences; 0 when all are 0, NaN when all are equal and
    # nonzero (no spread to scale by).
    effect: float
    # Percentile bootstrap interval of d_z over the same resampled pairs as the mean's; NaN when some
    # resample has no d_z (likely below about 7 pairs, or with exactly repeated differences).
    effect_low: float
    effect_high: float
    sign: int  # +1 first significantly better (p_holm < alpha, low > 0), -1 worse (p_holm < alpha, high < 0), else 0
    alpha: float = 0.05  # level of the intervals and of ``sign``

    def to_dict(self) -> dict:
        return asdict(self)


def _significance(p_holm: float, low: float, high: float, alpha: float) -> int:
    """+1 / -1 / 0: the corrected test rejects and the interval lies above / below 0, or neither (as
    paired_verdict reads its own p and interval)."""
    if p_holm < alpha and low > 0:
        return 1
    if p_holm < alpha and high < 0:
        return -1
    return 0


def _cohen_dz(diff: np.ndarray) -> np.ndarray:
    """Cohen's d_z of paired differences along the last axis, (..., n) -> (...): mean / sd (ddof=1);
    0 where all differences are 0, NaN where all are equal and nonzero."""
    mean = diff.mean(axis=-1)
    sd = diff.std(axis=-1, ddof=1)
    # a - b for a = b + 0.1 leaves a rounding-level spread: that is equal differences, not a d_z of 1e15.
    constant = sd <= 1e-9 * np.abs(diff).max(axis=-1)
    dz = np.divide(mean, sd, out=np.full_like(mean, np.nan), where=~constant)
    return np.where(constant & (mean == 0), 0.0, dz)


def _effect_interval(diff: np.ndarray, alpha: float, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of d_z; ``diff`` (n,) paired differences."""
    # The generator and draws of paired_verdict's interval of the mean, so both intervals rest on the
    # same resampled pairs.
    rng = np.random.default_rng(seed)
    dz = _cohen_dz(diff[rng.integers(0, len(diff), (resamples, len(diff)))])
    # A resample without a d_z makes the interval NaN: dropping it would drop the most extreme
    # resamples and pull the interval toward 0.
    low, high = np.quantile(dz, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _arm_scores(scores: Mapping[str, Mapping[str, float]], arm: str, units: list[str]) -> np.ndarray:
    """(len(units),) scores of one arm, refusing a non-finite one."""
    values = np.array([scores[arm][unit] for unit in units], dtype=np.float64)
    for unit, value in zip(units, values):
        if not np.isfinite(value):
            raise ValueError(f"arm {arm!r} has a non-finite score {value} for unit {unit!r}")
    return values


def compare_arms(scores: Mapping[str, Mapping[str, float]], family: str, dataset: str, fraction: float,
                 alpha: float = 0.05, resamples: int = 10000, seed: int = 0) -> list[Comparison]:
    """Every pair of arms, in the order of ``scores`` (first = the earlier arm), compared on the units both
    have and Holm-corrected across these pairs as one family. ``scores[arm][unit]`` is a score, higher is
    better; units of one arm only are left out. Fewer than two arms give no comparisons."""
    comparisons = []
    for first, second in itertools.combinations(list(scores), 2):
        # Sorted, so that the bootstrap draws do not depend on the order the mappings were filled in.
        units = sorted(set(scores[first]) & set(scores[second]))
        if len(units) < 2:
            raise ValueError(f"arms {first!r} and {second!r} share {len(units)} unit(s); "
                             "a paired comparison needs at least 2")
        a, b = _arm_scores(scores, first, units), _arm_scores(scores, second, units)
        verdict = paired_verdict(a, b, alpha=alpha, resamples=resamples, seed=seed)
        diff = a - b
        effect_low, effect_high = _effect_interval(diff, alpha, resamples, seed)
        comparisons.append(Comparison(
            family=family, dataset=dataset, fraction=float(fraction), first=first, second=second, n=verdict.n,
            mean=verdict.mean, low=verdict.low, high=verdict.high, p_value=verdict.p_value,
            p_holm=float("nan"), effect=float(_cohen_dz(diff)), effect_low=effect_low, effect_high=effect_high,
            sign=0, alpha=alpha))  # p_holm and sign: by holm_across, once the whole family is known
    return holm_across(comparisons)


def holm_across(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """The comparisons, in their order, with ``p_holm`` and ``sign`` recomputed by Holm within each
    ``family`` (each comparison's ``sign`` at its own ``alpha``)."""
    members: dict[str, list[int]] = {}
    for i, comparison in enumerate(comparisons):
        members.setdefault(comparison.family, []).append(i)
    corrected = list(comparisons)
    for indices in members.values():
        for i, p_holm in zip(indices, holm([comparisons[i].p_value for i in indices])):
            c = comparisons[i]
            corrected[i] = replace(c, p_holm=p_holm, sign=_significance(p_holm, c.low, c.high, c.alpha))
    return corrected


def setting_ranks(scores: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """``scores[setting][arm]`` (mean score, higher is better) -> ``ranks[setting][arm]``: 1 = best, tied
    arms sharing their average rank. Every arm must appear in every setting."""
    from scipy.stats import rankdata

    arms = list(dict.fromkeys(arm for by_arm in scores.values() for arm in by_arm))
    ranks = {}
    for setting, by_arm in scores.items():
        missing = [arm for arm in arms if arm not in by_arm]
        if missing:
            raise ValueError(f"setting {setting!r} has no score for arm(s) {', '.join(map(repr, missing))}")
        values = np.array([by_arm[arm] for arm in arms], dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"setting {setting!r} has a non-finite score: {dict(zip(arms, values.tolist()))}")
        ranks[setting] = dict(zip(arms, rankdata(-values, method="average").tolist()))
    return ranks


def mean_ranks(scores: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Each arm's rank averaged over the settings, best (lowest) first; ``scores[setting][arm]`` as for
    ``setting_ranks``. Arms with equal mean ranks keep the order they first appear in."""
    per_setting = setting_ranks(scores)
    arms = next(iter(per_setting.values()), {})
    means = {arm: float(np.mean([ranks[arm] for ranks in per_setting.values()])) for arm in arms}
    return dict(sorted(means.items(), key=lambda item: item[1]))  # sorted is stable


def _markdown_cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def rank_table_markdown(ranks: dict[str, float], per_setting: Mapping[str, Mapping[str, float]]) -> str:
    """A markdown table: arm | mean rank | its rank in each setting. ``ranks`` as ``mean_ranks`` gives them
    (rows in their order), ``per_setting[setting][arm]`` ranks as ``setting_ranks`` gives them (columns in
    their order)."""
    for setting, by_arm in per_setting.items():
        missing = [arm for arm in ranks if arm not in by_arm]
        if missing:
            raise ValueError(f"setting {setting!r} has no rank for arm(s) {', '.join(map(repr, missing))}")
        # Ranks 1..A sum to A(A+1)/2 whatever the ties; scores passed by mistake almost never do.
        count = len(by_arm)
        if min(by_arm.values()) < 1 or not np.isclose(sum(by_arm.values()), count * (count + 1) / 2):
            raise ValueError(f"setting {setting!r} holds no ranks 1..{count} (scores instead of ranks?): "
                             f"{dict(by_arm)}")
    settings = list(per_setting)

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    lines = [row(["arm", "mean rank"] + [_markdown_cell(s) for s in settings]), "|---|---:|" + "---:|" * len(settings)]
    for arm, mean in ranks.items():
        lines.append(row([_markdown_cell(arm), f"{mean:.2f}"] + [f"{per_setting[s][arm]:g}" for s in settings]))
    return "\n".join(lines) + "\n"


def significance_matrix(comparisons: Sequence[Comparison], arms: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(p, sign) of one family, each (A, A) over ``arms``: p[i, j] the Holm-corrected p of arm i against arm
    j (symmetric), sign[i, j] from arm i's side (+1 i significantly better, -1 worse, 0 neither;
    antisymmetric). The diagonal is p NaN, sign 0. Comparisons of arms not in ``arms`` are not shown."""
    families = sorted({c.family for c in comparisons})
    if len(families) > 1:
        raise ValueError(f"a significance matrix shows one family, got {families}")
    if len(set(arms)) != len(arms):
        raise ValueError(f"arms repeat: {list(arms)}")
    by_pair: dict[tuple[str, str], Comparison] = {}
    for c in comparisons:
        if (c.first, c.second) in by_pair or (c.second, c.first) in by_pair:
            raise ValueError(f"arms {c.first!r} and {c.second!r} are compared more than once")
        by_pair[(c.first, c.second)] = c
    count = len(arms)
    p = np.full((count, count), np.nan)
    sign = np.zeros((count, count), dtype=int)
    for i, j in itertools.combinations(range(count), 2):
        c = by_pair.get((arms[i], arms[j])) or by_pair.get((arms[j], arms[i]))
        if c is None:
            raise ValueError(f"no comparison of arms {arms[i]!r} and {arms[j]!r}")
        p[i, j] = p[j, i] = c.p_holm
        sign[i, j] = c.sign if c.first == arms[i] else -c.sign
        sign[j, i] = -sign[i, j]
    return p, sign


def _cell_colour(p: float, sign: int) -> np.ndarray:
    """RGB of one map cell: green (row arm better) or red (worse), fading toward white as p grows; grey
    (no difference), lighter as p grows."""
    if sign == 0:
        return np.full(3, 0.55 + 0.4 * p)
    # Strength on a log scale, since corrected p spans orders of magnitude: full at p <= 1e-4.
    strength = float(np.clip(-np.log10(max(p, 1e-300)) / 4, 0.3, 1.0))
    base = np.array([0.1, 0.55, 0.2]) if sign > 0 else np.array([0.8, 0.1, 0.1])
    return (1 - strength) * np.ones(3) + strength * base


def significance_figure(comparisons: Sequence[Comparison], arms: Sequence[str], title: str):
    """The arms x arms map of one family as a ``matplotlib.figure.Figure`` (no pyplot): cell [i, j] coloured
    by arm i's sign against arm j and annotated with the corrected p (2 significant digits)."""
    from matplotlib.figure import Figure

    p, sign = significance_matrix(comparisons, arms)
    count = len(arms)
    rgb = np.ones((count, count, 3))
    fig = Figure(figsize=(1.8 + 0.75 * count, 1.6 + 0.75 * count))
    ax = fig.subplots()
    for i, j in itertools.product(range(count), repeat=2):
        if i != j:
            rgb[i, j] = _cell_colour(p[i, j], sign[i, j])
            dark = rgb[i, j].mean() < 0.5
            ax.text(j, i, f"{p[i, j]:.2g}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.imshow(rgb, interpolation="nearest")
    ax.set_xticks(range(count), labels=list(arms), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(count), labels=list(arms), fontsize=8)
    ax.set_ylabel("row arm")
    ax.set_xlabel("against column arm")
    ax.set_title(f"{title}\nrow against column, Holm-corrected p\ngreen: better, red: worse, grey: no difference",
                 fontsize=8)
    return fig


def plot_significance_map(comparisons: Sequence[Comparison], arms: Sequence[str], path: Path, title: str) -> Path:
    """Write ``significance_figure`` as a PNG at ``path`` (atomically: ``plots.save_figure``)."""
    return save_figure(Path(path), significance_figure(comparisons, arms, title), dpi=100)
