"""Multi-arm comparisons: Holm on hand-worked sets and against a plain loop, pairwise comparisons on
paired scores with known differences, mean ranks with ties, and the significance matrix and map."""

import math
from dataclasses import replace

import numpy as np
import pytest

from swinssl.workflows.comparison import (
    Comparison, compare_arms, holm, holm_across, mean_ranks, plot_significance_map, rank_table_markdown,
    setting_ranks, significance_figure, significance_matrix)
from swinssl.workflows.verdict import paired_verdict


def holm_reference(p_values):
    """Holm step by step: walk the p-values in ascending order, multiply the k-th (from 0) by m - k, cap at 1,
    and never let an adjusted value drop below the one before it."""
    m = len(p_values)
    adjusted = [0.0] * m
    running = 0.0
    for k, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - k) * p_values[i]))
        adjusted[i] = running
    return adjusted


def noisy_arms(offsets, n=16, noise=0.03, seed=0):
    """scores[arm][unit]: one shared base score per unit plus the arm's offset and its own noise."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.4, 0.8, n)
    units = [f"case{i}|0" for i in range(n)]
    return {arm: dict(zip(units, (base + offset + rng.normal(0, noise, n)).tolist()))
            for arm, offset in offsets.items()}


def made(p_value, low, high, family="f", first="A", second="B", alpha=0.05):
    """A comparison with only the fields Holm and the sign read set to something meaningful."""
    return Comparison(family=family, dataset="d", fraction=0.5, first=first, second=second, n=10, mean=(low + high) / 2,
                      low=low, high=high, p_value=p_value, p_holm=float("nan"), effect=0.0, effect_low=0.0,
                      effect_high=0.0, sign=0, alpha=alpha)


# --------------------------------------------------------------------------------------------------
# holm
# --------------------------------------------------------------------------------------------------


def test_holm_on_a_hand_worked_set_where_the_running_max_raises_a_value():
    # m = 4, sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04;
    # the running max lifts the last to 0.06. Back in input order (0.01, 0.04, 0.03, 0.005):
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)


def test_holm_caps_at_one():
    # m = 3: 0.3 * 3 = 0.9, 0.6 * 2 = 1.2 -> 1, 0.9 * 1 = 0.9 -> running max 1.
    assert holm([0.3, 0.6, 0.9]) == pytest.approx([0.9, 1.0, 1.0], abs=1e-15)


def test_holm_keeps_the_input_order():
    p = [0.01, 0.04, 0.03, 0.005]
    expected = dict(zip(p, [0.03, 0.06, 0.06, 0.02]))
    for shuffled in ([0.005, 0.03, 0.04, 0.01], [0.04, 0.005, 0.01, 0.03]):
        assert holm(shuffled) == pytest.approx([expected[x] for x in shuffled], abs=1e-15)


def test_holm_of_nothing_and_of_one():
    assert holm([]) == []
    assert holm([0.2]) == [0.2]


@pytest.mark.parametrize("bad", [float("nan"), -0.1, 1.5])
def test_holm_refuses_what_is_no_p_value(bad):
    with pytest.raises(ValueError, match=str(bad)):
        holm([0.01, bad, 0.3])


def test_holm_agrees_with_a_plain_loop_on_random_sets():
    rng = np.random.default_rng(7)
    for trial in range(50):
        p = rng.uniform(0, 1, rng.integers(1, 15)) ** 3  # skewed toward small p, where Holm matters
        if trial % 3 == 0:
            p = np.round(p, 2)  # ties, 0 and 1
        assert holm(p.tolist()) == pytest.approx(holm_reference(p.tolist()), abs=1e-15)


# --------------------------------------------------------------------------------------------------
# compare_arms, holm_across
# --------------------------------------------------------------------------------------------------


def test_an_arm_always_better_by_a_tenth_is_significantly_better():
    units = [f"case{i}|{seed}" for i in range(6) for seed in range(2)]  # 12 units
    b = {unit: 0.3 + 0.04 * k for k, unit in enumerate(units)}
    a = {unit: score + 0.1 for unit, score in b.items()}
    assert len({a[u] - b[u] for u in units}) > 1  # equal differences, up to rounding in the last bits
    (c,) = compare_arms({"A": a, "B": b}, family="dev:phantoms@0.5", dataset="phantoms", fraction=0.5, resamples=2000)
    assert (c.family, c.dataset, c.fraction, c.first, c.second, c.n) == (
        "dev:phantoms@0.5", "phantoms", 0.5, "A", "B", 12)
    assert c.mean == pytest.approx(0.1) and c.low == pytest.approx(0.1) and c.high == pytest.approx(0.1)
    # Exact two-sided signed-rank p with all 12 differences positive: 2 / 2**12. One pair, so Holm leaves it.
    assert c.p_value == pytest.approx(2 / 2**12) and c.p_holm == c.p_value
    assert c.sign == 1
    # Equal differences (up to the rounding of + 0.1) have no spread: d_z is NaN, not 1e15.
    assert math.isnan(c.effect) and math.isnan(c.effect_low) and math.isnan(c.effect_high)
    # From the other side (B given first) it is significantly worse.
    (r,) = compare_arms({"B": b, "A": a}, family="f", dataset="d", fraction=0.5, resamples=2000)
    assert (r.first, r.second, r.sign) == ("B", "A", -1) and r.mean == pytest.approx(-0.1)


def test_every_pair_in_order_holm_corrected_as_one_family():
    scores = noisy_arms({"scratch": 0.0, "swin_unetr": 0.05, "swinfuse": 0.02, "nnunet": 0.0})
    comparisons = compare_arms(scores, family="f", dataset="d", fraction=0.25, resamples=2000)
    assert [(c.first, c.second) for c in comparisons] == [
        ("scratch", "swin_unetr"), ("scratch", "swinfuse"), ("scratch", "nnunet"),
        ("swin_unetr", "swinfuse"), ("swin_unetr", "nnunet"), ("swinfuse", "nnunet")]
    raw = [c.p_value for c in comparisons]
    assert [c.p_holm for c in comparisons] == pytest.approx(holm(raw), abs=1e-15)
    assert all(c.p_holm >= c.p_value for c in comparisons) and any(c.p_holm > c.p_value for c in comparisons)
    # Mean, interval and raw p are paired_verdict's on the shared units.
    first = comparisons[0]
    units = sorted(scores["scratch"])
    v = paired_verdict([scores["scratch"][u] for u in units], [scores["swin_unetr"][u] for u in units], resamples=2000)
    assert (first.mean, first.low, first.high, first.p_value, first.n) == (v.mean, v.low, v.high, v.p_value, v.n)
    assert first.sign == -1 and comparisons[3].sign == 1  # swin_unetr beats both scratch and swinfuse


def test_units_of_one_arm_only_are_left_out():
    scores = noisy_arms({"A": 0.03, "B": 0.0}, n=12)
    with_extra = {"A": {**scores["A"], "only-A|0": 0.0, "only-A|1": 5.0}, "B": {"only-B|0": 1.0, **scores["B"]}}
    (c,) = compare_arms(with_extra, family="f", dataset="d", fraction=1.0, resamples=2000)
    assert c.n == 12
    assert c == compare_arms(scores, family="f", dataset="d", fraction=1.0, resamples=2000)[0]


def test_the_order_the_units_were_filled_in_does_not_matter():
    scores = noisy_arms({"A": 0.01, "B": 0.0}, n=10, noise=0.05)
    reordered = {"A": dict(reversed(scores["A"].items())), "B": dict(reversed(scores["B"].items()))}
    assert compare_arms(reordered, "f", "d", 0.5, resamples=2000) == compare_arms(scores, "f", "d", 0.5, resamples=2000)


def test_arms_sharing_fewer_than_two_units_are_refused():
    scores = {"A": {"u1": 0.5, "u2": 0.6}, "B": {"u1": 0.4, "u3": 0.7}}
    with pytest.raises(ValueError, match="'A' and 'B' share 1 unit"):
        compare_arms(scores, "f", "d", 0.5, resamples=2000)
    with pytest.raises(ValueError, match="non-finite score nan for unit 'u2'"):
        compare_arms({"A": {"u1": 0.5, "u2": float("nan")}, "B": {"u1": 0.4, "u2": 0.7}}, "f", "d", 0.5)


def test_effect_size_by_hand_and_its_interval_over_the_verdicts_resamples():
    # Differences 0.1, 0.2, 0.3, 0.4: mean 0.25, sd (ddof=1) = sqrt(0.05 / 3), d_z = 0.25 * sqrt(60).
    diff = np.array([0.1, 0.2, 0.3, 0.4])
    scores = {"A": {f"u{i}": 0.5 + d for i, d in enumerate(diff)}, "B": {f"u{i}": 0.5 for i in range(4)}}
    (c,) = compare_arms(scores, "f", "d", 0.5, resamples=2000, seed=3)
    assert c.effect == pytest.approx(0.25 * math.sqrt(60))
    # Four pairs: some resamples draw one pair four times, which has no d_z, so the interval is NaN.
    assert math.isnan(c.effect_low) and math.isnan(c.effect_high)

    scores = noisy_arms({"A": 0.02, "B": 0.0}, n=20, noise=0.04)
    (c,) = compare_arms(scores, "f", "d", 0.5, resamples=2000, seed=3)
    d = np.array([scores["A"][u] - scores["B"][u] for u in sorted(scores["A"])])
    assert c.effect == pytest.approx(d.mean() / d.std(ddof=1))
    resampled = d[np.random.default_rng(3).integers(0, 20, (2000, 20))]  # paired_verdict's draws
    dz = resampled.mean(axis=1) / resampled.std(axis=1, ddof=1)
    assert (c.effect_low, c.effect_high) == pytest.approx(tuple(np.quantile(dz, [0.025, 0.975])), abs=1e-12)


def test_identical_arms_have_no_effect():
    scores = {"A": {f"u{i}": 0.1 * i for i in range(5)}, "B": {f"u{i}": 0.1 * i for i in range(5)}}
    (c,) = compare_arms(scores, "f", "d", 0.5, resamples=2000)
    assert (c.mean, c.low, c.high, c.p_value, c.p_holm, c.effect, c.effect_low, c.effect_high, c.sign) == (
        0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0)


def test_holm_can_take_a_significant_pair_back():
    # Raw 0.02, 0.03, 0.04 are each below 0.05; Holm: 0.06, 0.06, 0.06 -> none is.
    family = [made(p, 0.01, 0.05, first=a, second=b) for p, (a, b) in zip([0.02, 0.03, 0.04], ["AB", "AC", "BC"])]
    corrected = holm_across(family)
    assert [c.p_holm for c in corrected] == pytest.approx([0.06, 0.06, 0.06])
    assert [c.sign for c in corrected] == [0, 0, 0]
    # Alone each stays significant, and at alpha = 0.1 the family does too.
    assert holm_across(family[:1])[0].sign == 1
    assert [c.sign for c in holm_across([replace(c, alpha=0.1) for c in family])] == [1, 1, 1]


def test_the_sign_needs_the_test_and_the_interval_to_agree():
    better, worse, straddling = holm_across([made(0.001, 0.02, 0.06, family="a"), made(0.001, -0.06, -0.02, family="b"),
                                             made(0.001, -0.01, 0.03, family="c")])
    assert (better.sign, worse.sign, straddling.sign) == (1, -1, 0)
    assert holm_across([made(0.05, 0.02, 0.06)])[0].sign == 0  # p = alpha is not below alpha


def test_holm_across_corrects_within_each_family_and_keeps_the_order():
    comparisons = [made(0.01, 0.1, 0.2, family="x"), made(0.02, 0.1, 0.2, family="y"),
                   made(0.03, 0.1, 0.2, family="x"), made(0.4, 0.1, 0.2, family="y"), made(0.01, 0.1, 0.2, family="z")]
    corrected = holm_across(comparisons)
    assert [c.p_value for c in corrected] == [0.01, 0.02, 0.03, 0.4, 0.01]
    assert [c.p_holm for c in corrected] == pytest.approx([0.02, 0.04, 0.03, 0.4, 0.01])
    assert [c.sign for c in corrected] == [1, 1, 1, 0, 1]
    # Two calls of one family: holm_across corrects them as one.
    scores = noisy_arms({"A": 0.02, "B": 0.0, "C": 0.0}, n=12, noise=0.03)
    one = compare_arms({"A": scores["A"], "B": scores["B"]}, "f", "d", 0.5, resamples=2000)
    two = compare_arms({"A": scores["A"], "C": scores["C"]}, "f", "d", 0.5, resamples=2000)
    joined = holm_across(one + two)
    assert [c.p_holm for c in joined] == pytest.approx(holm([one[0].p_value, two[0].p_value]), abs=1e-15)


def test_to_dict_has_every_field():
    (c,) = compare_arms(noisy_arms({"A": 0.02, "B": 0.0}, n=12), "f", "d", 0.5, resamples=2000)
    d = c.to_dict()
    assert Comparison(**d) == c and d["first"] == "A" and d["sign"] == c.sign and d["p_holm"] == c.p_holm


# --------------------------------------------------------------------------------------------------
# ranks
# --------------------------------------------------------------------------------------------------

TIED = {"s1": {"A": 0.9, "B": 0.9, "C": 0.5}, "s2": {"A": 0.2, "B": 0.8, "C": 0.8}}


def test_ranks_with_ties_share_the_average_rank():
    assert setting_ranks(TIED) == {"s1": {"A": 1.5, "B": 1.5, "C": 3.0}, "s2": {"A": 3.0, "B": 1.5, "C": 1.5}}
    ranks = mean_ranks(TIED)
    assert ranks == {"B": 1.5, "A": 2.25, "C": 2.25}
    assert list(ranks) == ["B", "A", "C"]  # best first; A and C tie and keep their order


def test_ranks_without_ties_best_first():
    ranks = mean_ranks({"s1": {"A": 0.1, "B": 0.5, "C": 0.9}, "s2": {"A": 0.2, "B": 0.7, "C": 0.6}})
    assert list(ranks.items()) == [("B", 1.5), ("C", 1.5), ("A", 3.0)]  # B 2+1, C 1+2: tied, B seen first
    assert mean_ranks({}) == {}


def test_an_arm_missing_from_a_setting_is_refused():
    with pytest.raises(ValueError, match="setting 's2' has no score for arm\\(s\\) 'C'"):
        mean_ranks({"s1": {"A": 0.9, "B": 0.8, "C": 0.5}, "s2": {"A": 0.2, "B": 0.8}})


def test_rank_table():
    table = rank_table_markdown(mean_ranks(TIED), setting_ranks(TIED))
    assert table == ("| arm | mean rank | s1 | s2 |\n"
                     "|---|---:|---:|---:|\n"
                     "| B | 1.50 | 1.5 | 1.5 |\n"
                     "| A | 2.25 | 1.5 | 3 |\n"
                     "| C | 2.25 | 3 | 1.5 |\n")
    with pytest.raises(ValueError, match="scores instead of ranks"):
        rank_table_markdown(mean_ranks(TIED), TIED)


# --------------------------------------------------------------------------------------------------
# significance matrix and map
# --------------------------------------------------------------------------------------------------

FOUR = {"scratch": 0.0, "swin_unetr": 0.05, "swinfuse": 0.02, "nnunet": 0.0}


@pytest.fixture(scope="module")
def family():
    return compare_arms(noisy_arms(FOUR), family="f", dataset="d", fraction=0.5, resamples=2000)


def test_matrix_cells_are_the_comparisons(family):
    arms = list(reversed(FOUR))  # so that the row arm is sometimes a comparison's second
    p, sign = significance_matrix(family, arms)
    assert p.shape == sign.shape == (4, 4)
    assert {c.sign for c in family} == {-1, 0, 1}
    for c in family:
        i, j = arms.index(c.first), arms.index(c.second)
        assert p[i, j] == p[j, i] == c.p_holm
        assert (sign[i, j], sign[j, i]) == (c.sign, -c.sign)
    assert np.isnan(np.diag(p)).all() and not np.diag(sign).any()
    assert np.array_equal(sign, -sign.T) and np.array_equal(p, p.T, equal_nan=True)


def test_matrix_refuses_mixed_families_and_missing_or_repeated_pairs(family):
    arms = list(FOUR)
    with pytest.raises(ValueError, match="one family"):
        significance_matrix(family[:-1] + [replace(family[-1], family="g")], arms)
    with pytest.raises(ValueError, match="no comparison of arms 'swinfuse' and 'nnunet'"):
        significance_matrix(family[:-1], arms)
    with pytest.raises(ValueError, match="more than once"):
        significance_matrix(family + [family[0]], arms)


def test_map_shows_the_matrix(family, tmp_path):
    arms = list(FOUR)
    p, sign = significance_matrix(family, arms)
    fig = significance_figure(family, arms, "dev:phantoms@0.5")
    (ax,) = fig.axes
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert texts == {(i, j): f"{p[i, j]:.2g}" for i in range(4) for j in range(4) if i != j}
    rgb = np.asarray(ax.images[0].get_array())
    for i, j in zip(*np.nonzero(sign)):  # green where the row arm is better, red where worse
        assert (rgb[i, j, 1] > rgb[i, j, 0]) == (sign[i, j] > 0)
    for i, j in zip(*np.nonzero((sign == 0) & ~np.eye(4, dtype=bool))):
        assert rgb[i, j, 0] == rgb[i, j, 1] == rgb[i, j, 2]  # grey
    assert [t.get_text() for t in ax.get_yticklabels()] == arms

    path = plot_significance_map(family, arms, tmp_path / "maps" / "f.png", "dev:phantoms@0.5")
    assert path == tmp_path / "maps" / "f.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [q.name for q in path.parent.iterdir()] == ["f.png"]
