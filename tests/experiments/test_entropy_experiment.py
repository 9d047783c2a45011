import json
import os

import pytest
import torch

from covrl.experiments import entropy as E

TINY = ["--steps", "4", "--sft-steps", "3", "--sft-batch", "16", "--prompts-per-step", "4", "--group-size", "4",
        "--minibatches", "2", "--micro-batches", "2", "--d-model", "16", "--n-layers", "1", "--n-heads", "2"]


def test_task_reward_and_answers():
    task = E.DigitSum(3, 5, 24)
    assert len(task.answers[5]) == 6  # 113, 131, 311, 122, 212, 221
    assert all(sum(a) == n for n, ans in task.answers.items() for a in ans)
    tok = lambda ds: [E.DIGIT0 + d for d in ds]  # noqa: E731
    resp = torch.tensor([tok([1, 1, 3]) + [E.EOS],  # right
                         tok([1, 1, 4]) + [E.EOS],  # wrong sum
                         tok([0, 2, 3]) + [E.EOS],  # 0 is not a digit 1-9
                         tok([1, 1, 3, 1])])  # no EOS
    assert task.reward(torch.tensor([5, 5, 5, 5]), resp).tolist() == [1.0, 0.0, 0.0, 0.0]
    g = torch.Generator().manual_seed(0)
    batch = task.sft_batch(32, g)
    n = (batch[:, 1] - E.DIGIT0) * 10 + batch[:, 2] - E.DIGIT0
    assert task.reward(n, batch[:, task.prompt_len:]).tolist() == [1.0] * 32


def test_sampler_masks_after_eos_and_reports_exact_entropy():
    cfg = E.Config(d_model=16, n_layers=1, n_heads=2)
    task = E.DigitSum(3, 5, 24)
    model = E.build_model(cfg, task).eval()
    g = torch.Generator().manual_seed(0)
    prompts = task.prompts(torch.tensor([5, 17, 24] * 20))
    resp, mask, lp, ent = E.sample(model, prompts, task.response_len, g)
    assert resp.shape == mask.shape == lp.shape == ent.shape == (60, 4)
    for row, m in zip(resp.tolist(), mask.tolist(), strict=True):
        first_eos = row.index(E.EOS) if E.EOS in row else len(row)
        assert m == [1.0] * (first_eos + 1) + [0.0] * (len(row) - first_eos - 1) or (
            first_eos == len(row) and m == [1.0] * len(row))
    lp2, ent2 = E.response_logprob_entropy(model, prompts, resp)
    torch.testing.assert_close(lp, lp2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent2, atol=1e-5, rtol=1e-5)
    assert float(ent.max()) <= torch.log(torch.tensor(float(E.VOCAB))) + 1e-5


def test_same_seed_same_run():
    cfg = E.Config(steps=2, sft_steps=2, sft_batch=8, prompts_per_step=2, group_size=4, minibatches=1,
                   micro_batches=2, d_model=16, n_layers=1, n_heads=2)
    task = E.DigitSum(cfg.digits, cfg.target_min, cfg.target_max)
    st = E.sft(cfg, task)
    a = E.run_method(cfg, "clip_cov", st, "micro", 0.5)["log"]
    b = E.run_method(cfg, "clip_cov", st, "micro", 0.5)["log"]
    a.pop("time_s"), b.pop("time_s")
    assert a == b


def test_short_experiment_writes_every_artefact(tmp_path):
    out = tmp_path / "study"
    assert E.main([*TINY, "--jobs", "2", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    for name in E.FIGURES:
        assert (out / name).stat().st_size > 1000, name
        assert f"]({name})" in report
    res = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in res["analysis"]["rows"]]
    assert {"grpo", "clip_higher", "clip_cov", "kl_cov", "kl_cov_ctrl"} <= set(labels)
    summary = report.split("## Summary\n\n")[1].split("\n\n")[0]  # the summary table
    for label in labels:  # one summary-table row per run
        assert sum(line.startswith(f"| {label} |") for line in summary.splitlines()) == 1
    for section in ("## Targets", "## Summary", "## R-H fit (GRPO)", "Command: `covrl experiment entropy"):
        assert section in report
    assert "Pearson" in report and "ceiling" in report and "by time scale" in report
    ctl = next(r for r in res["result"]["runs"] if r["method"] == "kl_cov_ctrl")
    assert len(ctl["log"]["knob"]) == 4 and all(v is not None for v in ctl["log"]["knob"])  # logged every step
    assert len(ctl["controller"]["history"]) == 4
    assert res["analysis"]["fit"]["n"] == 4
    if res["result"]["global_selection_supported"]:
        assert {"clip_cov (global sel.)", "kl_cov (global sel.)"} <= set(labels)
        assert "| kl_cov | global |" in report


def test_bad_config_is_a_clear_error(capsys):
    assert E.main(["--methods", "grpo,ppo2", "--out", os.devnull]) == 2
    assert "methods" in capsys.readouterr().err
    with pytest.raises(ValueError, match="group_size"):
        E.Config(group_size=1).validate()
    with pytest.raises(ValueError, match="minibatches"):
        E.Config(prompts_per_step=3, group_size=3).validate()
