"""What the plots state: n and the fitted eta (in words when negative), both metric layouts of the
dH series (same-batch and the older next-batch), and no R-H ceiling from a poor fit."""

import json
import math

from covrl.plot import (
    RH_MIN_R2,
    delta_entropy_series,
    delta_entropy_title,
    fitted_eta,
    plot_run,
    rh_fit_summary,
)


def _rows(n=8, sign=1.0, same_batch=True):
    rows = []
    for t in range(1, n + 1):
        cov = 0.01 * t
        r = {"step": t, "actor/entropy": 1.0 + 0.01 * t, "actor/cov": cov, "reward/mean": 0.5,
             "reward/accuracy": 0.5}
        if same_batch:
            r.update({"entropy/observed_delta": -sign * 2.0 * cov, "entropy/predicted_delta_lemma1": -2.1 * cov,
                      "entropy/predicted_delta_cov": -1.9 * cov})
        else:
            r["entropy/predicted_delta"] = -2.0 * cov
        rows.append(r)
    return rows


def test_same_batch_series_and_positive_eta():
    s = delta_entropy_series(_rows())
    assert s["kind"] == "same-batch" and len(s["steps"]) == 8 and len(s["predicted"]) == 2
    assert abs(fitted_eta(s["cov"], s["observed"]) - 2.0) < 1e-9
    title = delta_entropy_title(s)
    assert "n = 8 steps" in title and "fitted eta = 2" in title and "opposite sign" not in title


def test_negative_eta_is_said_in_words():
    title = delta_entropy_title(delta_entropy_series(_rows(sign=-1.0)))
    assert "fitted eta = -2" in title and "eta < 0" in title and "opposite sign to the paper's" in title


def test_older_next_batch_metrics_still_plot():
    s = delta_entropy_series(_rows(same_batch=False))
    assert s["kind"] == "next-batch" and s["steps"] == list(range(1, 8))
    assert "n = 7 steps (next-batch dH)" in delta_entropy_title(s)


def test_no_ceiling_from_a_poor_fit():
    H = [1.0, 1.2, 0.9, 1.1, 1.05, 0.95]
    R = [0.5, 0.1, 0.2, 0.6, 0.1, 0.5]  # no relation
    fit, text, draw = rh_fit_summary(H, R)
    assert fit is not None and fit.r2 < RH_MIN_R2 and not draw
    assert f"R2 = {fit.r2:.2f}, n = 6" in text and "no ceiling forecast" in text
    H = [1.5 * math.exp(-0.2 * t) + 0.1 for t in range(10)]
    fit, text, draw = rh_fit_summary(H, [-0.3 * math.exp(h) + 1.2 for h in H])
    assert draw and "ceiling -a+b = " in text and "n = 10" in text


def test_plot_run_writes_the_same_batch_layout(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(sign=-1.0)))
    assert len(plot_run(str(tmp_path))) == 5
