"""The paired verdict on synthetic result tables with a known effect, none, and a negative one."""

import numpy as np
import pytest

from swinssl.workflows.verdict import paired_verdict


def pairs(effect: float, n: int = 24, noise: float = 0.05, seed: int = 0):
    rng = np.random.default_rng(seed)
    scratch = rng.uniform(0.4, 0.8, n)
    return scratch + effect + rng.normal(0, noise, n), scratch


def test_a_real_gain_is_reported_as_help_with_an_interval_above_zero():
    v = paired_verdict(*pairs(+0.06))
    assert v.sentence.startswith("pre-training helps: +0.0") and v.low > 0 and v.p_value < 0.01 and v.n == 24
    assert v.low < 0.06 < v.high
    assert f"(95% CI {v.low:+.3f}..{v.high:+.3f}, p=" in v.sentence and v.sentence.endswith("n=24)")


def test_a_real_loss_is_reported_as_hurt():
    v = paired_verdict(*pairs(-0.06))
    assert v.sentence.startswith("pre-training hurts: -0.0") and v.high < 0 and v.p_value < 0.01


def test_no_effect_is_no_detectable_difference():
    v = paired_verdict(*pairs(0.0))
    assert v.sentence.startswith("no detectable difference") and v.low < 0 < v.high and v.p_value > 0.05


def test_few_pairs_with_a_sign_are_not_called_an_effect():
    # Three pairs all favouring pre-training: the smallest two-sided Wilcoxon p with n=3 is 0.25.
    v = paired_verdict([0.9, 0.8, 0.7], [0.8, 0.7, 0.6])
    assert v.sentence.startswith("no detectable difference") and v.p_value == pytest.approx(0.25)


def test_identical_models_and_the_interval_is_the_bootstrap_of_the_mean():
    v = paired_verdict([0.5, 0.6], [0.5, 0.6])
    assert (v.mean, v.low, v.high, v.p_value) == (0.0, 0.0, 0.0, 1.0)
    diff = np.array([0.1, -0.2, 0.3, 0.05])
    v = paired_verdict(diff + 1, np.ones(4), resamples=20000, seed=1)
    rng = np.random.default_rng(1)
    means = diff[rng.integers(0, 4, (20000, 4))].mean(axis=1)
    assert (v.low, v.high) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])), abs=1e-12)
    assert paired_verdict(diff + 1, np.ones(4), seed=1) == paired_verdict(diff + 1, np.ones(4), seed=1)  # seeded


def test_unpaired_input_is_refused():
    with pytest.raises(ValueError, match="equally long"):
        paired_verdict([0.1, 0.2], [0.1])


def test_rank_test_and_interval_disagreeing_is_no_verdict():
    # Twenty small gains and one large loss: the signed ranks say "helps", the mean says "hurts".
    diff = np.array([0.01] * 20 + [-0.5])
    v = paired_verdict(diff + 0.5, np.full(21, 0.5))
    assert v.p_value < 0.05 and v.low < 0 < v.high
    assert v.sentence.startswith("no detectable difference: -0.014 Dice")
