"""Plots, summaries, pass@k and the CLI's fast paths (no services needed)."""

import json
import math

import pytest

from covrl.cli import main
from covrl.plot import plot_run, predicted_vs_observed
from covrl.trainer import format_summary, pass_at_k, summarize


def _fake_run(tmp_path, n=12):
    rows = []
    for t in range(1, n + 1):
        H = 1.5 * math.exp(-0.2 * t) + 0.1
        rows.append({"step": t, "reward/mean": -0.3 * math.exp(H) + 1.2, "reward/accuracy": 0.1 * t / n,
                     "actor/entropy": H, "actor/cov": 0.05 * math.exp(-0.2 * t),
                     "entropy/predicted_delta": -0.3 * 0.05 * math.exp(-0.2 * t), "time/step_s": 1.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval.jsonl").write_text(json.dumps({"step": n, "pass@1": 0.25, "pass@4": 0.5}) + "\n")
    return rows


def test_plot_writes_every_png(tmp_path):
    _fake_run(tmp_path)
    paths = plot_run(str(tmp_path))
    names = sorted(p.rsplit("/", 1)[-1] for p in paths)
    assert names == ["covariance.png", "delta_entropy.png", "entropy.png", "reward.png", "reward_vs_entropy.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_predicted_pairs_with_the_next_steps_change(tmp_path):
    rows = _fake_run(tmp_path, n=4)
    steps, pred, obs = predicted_vs_observed(rows)
    assert steps == [1, 2, 3]
    assert obs[0] == pytest.approx(rows[1]["actor/entropy"] - rows[0]["actor/entropy"])
    assert pred[0] == rows[0]["entropy/predicted_delta"]


def test_cli_plot_and_errors(tmp_path, capsys):
    _fake_run(tmp_path)
    assert main(["plot", str(tmp_path)]) == 0
    assert "reward_vs_entropy.png" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert main(["train", "algo.kl_cov_fraction=0.3"]) == 2
    assert "looks like a percent" in capsys.readouterr().err
    assert main(["experiment", "nope"]) == 2


def test_summary_table(tmp_path):
    _fake_run(tmp_path)
    s = summarize(str(tmp_path))
    text = format_summary(s)
    assert "reward/mean" in text and "actor/entropy" in text and "pass@4=0.500" in text


def test_pass_at_k():
    assert pass_at_k([[True, False], [False, False]], 1) == pytest.approx(0.25)
    assert pass_at_k([[True, False], [False, False]], 2) == pytest.approx(0.5)
    assert pass_at_k([[False, True, False, False]], 2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least 3 samples"):
        pass_at_k([[True]], 3)
