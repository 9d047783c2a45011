import math

import numpy as np
import pytest
import torch

from covrl.diagnostics import (
    EntropyController,
    entropy_drops,
    fit_reward_entropy,
    fit_step_size,
    forecast_ceiling,
    pearson,
    predicted_entropy_change,
    same_batch_metrics,
    same_batch_record,
)

# ----------------------------------------------------------------------------- R–H fit


def test_fit_recovers_a_and_b_exactly_without_noise():
    h = np.linspace(2.0, 0.05, 50)
    fit = fit_reward_entropy(h, -0.3 * np.exp(h) + 1.1)
    assert fit.a == pytest.approx(0.3, abs=1e-10)
    assert fit.b == pytest.approx(1.1, abs=1e-10)
    assert fit.ceiling == pytest.approx(0.8, abs=1e-10)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.n == 50
    assert fit.predict(0.0) == pytest.approx(0.8)
    np.testing.assert_allclose(fit.predict(h), -0.3 * np.exp(h) + 1.1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_a_and_b_from_noisy_data(seed):
    rng = np.random.default_rng(seed)
    h = np.sort(rng.uniform(0.02, 1.5, 300))[::-1]  # entropy falling over a run
    r = -0.25 * np.exp(h) + 0.95 + rng.normal(0.0, 0.02, h.size)
    fit = fit_reward_entropy(h, r)
    assert fit.a == pytest.approx(0.25, abs=0.01)
    assert fit.b == pytest.approx(0.95, abs=0.015)
    assert fit.ceiling == pytest.approx(0.70, abs=0.01)
    assert 0.9 < fit.r2 < 1.0
    d = fit.to_dict()
    assert set(d) == {"a", "b", "r2", "n", "ceiling"}


def test_fit_accepts_torch_and_lists():
    h = [1.0, 0.5, 0.1, 0.05]
    r = [float(-0.5 * math.exp(x) + 2.0) for x in h]
    f1 = fit_reward_entropy(h, r)
    f2 = fit_reward_entropy(torch.tensor(h), torch.tensor(r, dtype=torch.float64))
    assert f1.a == pytest.approx(f2.a) and f1.b == pytest.approx(f2.b)


def test_fit_r2_is_low_when_reward_does_not_follow_entropy():
    rng = np.random.default_rng(0)
    h = np.linspace(1.5, 0.1, 200)
    r = rng.normal(0.5, 0.1, h.size)
    assert fit_reward_entropy(h, r).r2 < 0.1


@pytest.mark.parametrize(
    "h, r, match",
    [
        ([1.0, 0.5], [0.1, 0.2], "at least 3"),
        ([1.0, 0.5, 0.2, 0.1], [0.1, 0.2, 0.3], "same length"),
        ([1.0, float("nan"), 0.2], [0.1, 0.2, 0.3], r"entropy\[1\]"),
        ([1.0, 0.5, 0.2], [0.1, float("inf"), 0.3], r"reward\[1\]"),
        ([0.7, 0.7, 0.7], [0.1, 0.2, 0.3], "must vary"),
        ([[1.0, 0.5, 0.2]], [0.1, 0.2, 0.3], "1-D"),
    ],
)
def test_fit_rejects_bad_input_with_field_name(h, r, match):
    with pytest.raises(ValueError, match=match):
        fit_reward_entropy(h, r)


def test_forecast_uses_only_the_first_fraction():
    h = np.linspace(2.0, 0.0, 100)
    r = -0.3 * np.exp(h) + 1.0
    r_bad = r.copy()
    r_bad[20:] = 5.0  # anything after the first 20% must not matter
    f = forecast_ceiling(h, r_bad, fraction=0.2)
    assert f.n == 20
    assert f.ceiling == pytest.approx(0.7, abs=1e-9)
    full = fit_reward_entropy(h, r_bad)
    assert abs(full.ceiling - 0.7) > 0.1
    with pytest.raises(ValueError, match="fraction"):
        forecast_ceiling(h, r, fraction=20)
    assert forecast_ceiling(h[:5], r[:5], fraction=0.2).n == 3  # floor of 3 points


# ----------------------------------------------------------------------------- covariance


def test_pearson_matches_numpy_and_edge_cases():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = 0.5 * x + rng.normal(size=50)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert pearson(x, 3 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    assert math.isnan(pearson(x, np.ones_like(x)))
    with pytest.raises(ValueError, match="same length"):
        pearson([1, 2, 3], [1, 2])


def test_step_size_fit_and_prediction():
    rng = np.random.default_rng(0)
    cov = rng.uniform(0.0, 0.5, 200)
    dh = -0.08 * cov + rng.normal(0, 0.002, 200)
    eta = fit_step_size(cov, dh)
    assert eta == pytest.approx(0.08, rel=0.03)
    assert predicted_entropy_change(0.25, eta) == pytest.approx(-0.25 * eta)
    np.testing.assert_allclose(predicted_entropy_change(cov, eta), -eta * cov)
    assert pearson(cov, -dh) > 0.9
    with pytest.raises(ValueError, match="all zero"):
        fit_step_size([0.0, 0.0], [0.1, 0.2])
    with pytest.raises(ValueError, match="cov must be finite"):
        predicted_entropy_change(float("nan"), 0.1)
    with pytest.raises(ValueError, match="step_size"):
        predicted_entropy_change(0.1, float("inf"))


def test_entropy_drops():
    np.testing.assert_allclose(entropy_drops([1.0, 0.8, 0.9]), [0.2, -0.1])


# ----------------------------------------------------------------------------- controller


@pytest.mark.parametrize("knob", ["kl_coef", "kl_cov_fraction", "clip_cov_fraction"])
def test_controller_direction_and_bounds_on_scripted_trace(knob):
    ctl = EntropyController(target=1.0, tolerance=0.2, knob=knob)
    v0 = ctl.value
    # Entropy well below target: regularisation must strengthen, step after step, up to `upper`.
    low = [ctl.update(0.3)[knob] for _ in range(40)]
    assert low[0] > v0
    assert all(b >= a for a, b in zip(low, low[1:], strict=False))
    assert low[-1] == pytest.approx(ctl.upper)
    assert max(low) <= ctl.upper
    # Now well above target: it must weaken, down to `lower` and no further.
    high = [ctl.update(3.0)[knob] for _ in range(60)]
    assert high[0] < low[-1]
    assert all(b <= a for a, b in zip(high, high[1:], strict=False))
    assert high[-1] == pytest.approx(ctl.lower)
    assert min(high) >= ctl.lower
    assert len(ctl.history) == 100
    assert ctl.history[0][knob] == low[0]
    assert ctl.history[0]["in_band"] == 0.0


def test_controller_step_sizes_follow_the_error():
    # One step from init=1 with error e = log(H / target): knob = exp(-(gain_i + gain_p) * e).
    ctl = EntropyController(target=1.0, knob="kl_coef", init=1.0, gain_p=1.0, gain_i=0.2)
    assert ctl.update(0.9)["kl_coef"] == pytest.approx(math.exp(-1.2 * math.log(0.9)))
    ctl2 = EntropyController(target=1.0, knob="kl_coef", init=1.0, gain_p=1.0, gain_i=0.2)
    assert ctl2.update(0.5)["kl_coef"] > ctl.value > 1.0  # further below target: stronger
    assert ctl.history[-1]["in_band"] == 1.0 and ctl2.history[-1]["in_band"] == 0.0
    ctl3 = EntropyController(target=1.0, knob="kl_coef", init=1.0)
    assert ctl3.update(1.0)["kl_coef"] == pytest.approx(1.0)  # on target: no move
    # The integral keeps pushing while the error persists (removes a steady offset).
    vals = [ctl.update(0.9)["kl_coef"] for _ in range(5)]
    assert all(b > a for a, b in zip(vals, vals[1:], strict=False))


def test_controller_covariance_feed_forward():
    # Same entropy (on target), but a large positive covariance predicts a drop: protect now.
    a = EntropyController(target=1.0, knob="kl_coef", init=1.0, step_size=1.0, horizon=1)
    b = EntropyController(target=1.0, knob="kl_coef", init=1.0, step_size=1.0, horizon=1)
    assert a.update(1.0, cov=0.5)["kl_coef"] > b.update(1.0, cov=0.0)["kl_coef"]
    assert a.history[-1]["predicted_entropy"] == pytest.approx(0.5)
    # The look-ahead horizon scales the predicted change.
    h = EntropyController(target=1.0, knob="kl_coef", init=1.0, step_size=0.1, horizon=5)
    h.update(1.0, cov=1.0)
    assert h.history[-1]["predicted_entropy"] == pytest.approx(0.5)
    # Without a known step size, the feed-forward waits for enough history to fit one.
    c = EntropyController(target=1.0, knob="kl_coef", min_fit_points=3, horizon=1)
    for i in range(4):
        c.update(1.0 - 0.1 * i, cov=1.0)  # dH = -0.1 per unit cov -> eta = 0.1
    assert c.history[-1]["step_size"] is None  # 3 entries = 2 pairs: not enough yet
    c.update(0.6, cov=1.0)
    assert c.history[-1]["step_size"] == pytest.approx(0.1)
    assert c.history[-1]["predicted_entropy"] == pytest.approx(0.5)


def test_controller_fits_eta_on_the_same_batch_series():
    # Same-batch dH = -0.2 * cov every step, while the entropy level (next-batch differences) is
    # resampling noise that says nothing about eta: the controller must use the same-batch pairs.
    c = EntropyController(target=1.0, knob="kl_coef", min_fit_points=3, horizon=1)
    rng = np.random.default_rng(0)
    covs = [0.5, 1.0, 2.0, 1.5]
    for i, cov in enumerate(covs):
        c.update(1.0 + 0.3 * rng.standard_normal(), cov=cov, observed_delta=-0.2 * cov)
        if i < 2:
            assert c.history[-1]["step_size"] is None  # fewer than 3 pairs, this one included
    assert c.history[-1]["step_size"] == pytest.approx(0.2)
    assert c.history[-1]["observed_delta"] == pytest.approx(-0.3)
    with pytest.raises(ValueError, match="observed_delta"):
        c.update(1.0, cov=1.0, observed_delta=float("nan"))


def test_same_batch_metrics_names_and_trailing_pearson():
    hist = []
    rng = np.random.default_rng(1)
    for t in range(30):
        dh = float(rng.standard_normal())
        learner = {"entropy_delta": dh, "entropy_delta_lemma1": dh + 0.01 * float(rng.standard_normal()),
                   "entropy_delta_cov": (-dh if t >= 25 else dh), "entropy_step_size": 0.5, "unrelated": 1.0}
        hist.append({"step": t, "H": 1.0, "cov": 0.1, **same_batch_record(learner)})
    m = same_batch_metrics(hist, window=5)
    assert set(m) == {"entropy/observed_delta", "entropy/predicted_delta_lemma1", "entropy/predicted_delta_cov",
                      "entropy/step_size", "entropy/pearson_lemma1", "entropy/pearson_cov"}
    assert m["entropy/observed_delta"] == hist[-1]["dH_same"]
    assert m["entropy/pearson_lemma1"] > 0.99
    assert m["entropy/pearson_cov"] == pytest.approx(-1.0)  # only the last 5 steps count
    assert same_batch_metrics(hist, window=30)["entropy/pearson_cov"] > -0.9
    # the learner's diagnostic off: no same-batch keys, no Pearson, nothing invented
    assert same_batch_metrics([{"step": 0, "H": 1.0, "cov": 0.1, **same_batch_record({"entropy": 1.0})}]) == {}
    assert same_batch_record({"entropy_delta": float("nan")}) == {}
    with pytest.raises(ValueError, match="window"):
        same_batch_metrics(hist, window=2)


def test_controller_state_dict_round_trip():
    trace = [1.5, 1.2, 0.9, 0.6, 0.7, 0.8, 1.1]
    a = EntropyController(target=1.0, knob="kl_cov_fraction")
    for h in trace[:4]:
        a.update(h, cov=0.1)
    b = EntropyController(target=1.0, knob="kl_cov_fraction")
    b.load_state_dict(a.state_dict())
    for h in trace[4:]:
        assert a.update(h, cov=0.1) == b.update(h, cov=0.1)
    assert a.history == b.history
    with pytest.raises(ValueError, match="knob"):
        EntropyController(target=1.0, knob="kl_coef").load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target": 0.0}, "target"),
        ({"target": 1.0, "knob": "entropy_coef"}, "knob"),
        ({"target": 1.0, "tolerance": 20}, "tolerance"),
        ({"target": 1.0, "lower": 2.0, "upper": 1.0}, "lower"),
        ({"target": 1.0, "knob": "kl_cov_fraction", "upper": 2.0}, "upper"),
        ({"target": 1.0, "init": 1e3}, "init"),
        ({"target": 1.0, "gain_i": -1}, "gain_i"),
        ({"target": 1.0, "horizon": float("nan")}, "horizon"),
    ],
)
def test_controller_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EntropyController(**kwargs)


def test_controller_rejects_bad_measurements():
    ctl = EntropyController(target=1.0)
    with pytest.raises(ValueError, match="entropy"):
        ctl.update(float("nan"))
    with pytest.raises(ValueError, match="entropy"):
        ctl.update(-0.1)
    with pytest.raises(ValueError, match="cov"):
        ctl.update(1.0, cov=float("inf"))
    assert ctl.history == []  # a rejected measurement changes nothing
    assert ctl.update(0.0)["kl_coef"] <= ctl.upper  # zero entropy is legal: floored, no log(0)
