import json
import math
import os

import pytest
import torch

from covrl.experiments import entropy as E

TINY = ["--steps", "4", "--sft-steps", "3", "--sft-batch", "16", "--prompts-per-step", "4", "--group-size", "4",
        "--minibatches", "2", "--micro-batches", "2", "--d-model", "16", "--n-layers", "1", "--n-heads", "2",
        "--fig8-steps", "4", "--lemma-steps", "2", "--probe-depth", "1", "--rh-steps", "6", "--rh-val-every", "2",
        "--rh-sft-steps", "3", "--tabular-states", "8", "--tabular-steps", "5", "--seeds", "0,1"]


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


def test_holdout_and_max_entropy():
    task = E.DigitSum(4, 6, 34, holdout_every=4)
    assert task.heldout == [9, 13, 17, 21, 25, 29, 33] and not set(task.heldout) & set(task.targets)
    g = torch.Generator().manual_seed(0)
    n = lambda b: ((b[:, 1] - E.DIGIT0) * 10 + b[:, 2] - E.DIGIT0).tolist()  # noqa: E731
    assert not set(n(task.sft_batch(256, g))) & set(task.heldout)  # SFT never sees a held-out N
    small = E.DigitSum(3, 5, 24)
    import math

    h1 = small.max_entropy_per_token(1.0)
    assert h1 == pytest.approx(sum(math.log(len(small.answers[t])) for t in small.targets) / 20 / 4)
    assert h1 == pytest.approx(0.845, abs=1e-3)  # the number
    # less reward allows more entropy, never more than uniform over every (K+1)-token sequence
    vals = [small.max_entropy_per_token(r) for r in (1.0, 0.99, 0.5, 0.0)]
    assert vals == sorted(vals) and vals[-1] <= math.log(E.VOCAB) + 1e-9


def test_exact_accuracy_matches_sampling():
    cfg = E.Config(d_model=16, n_layers=1, n_heads=2)
    task = E.DigitSum(3, 5, 24)
    model = E.build_model(cfg, task)
    model.load_state_dict(E.sft(cfg, task, seed=0, steps=30))
    model.eval()
    acc = E.exact_accuracy(model, task, [5, 12])
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([5, 12] * 2000)
    resp, *_ = E.sample(model, task.prompts(t), task.response_len, g)
    mc = float(task.reward(t, resp).mean())
    assert 0.02 < acc < 0.98
    assert abs(mc - acc) < 4 * math.sqrt(acc * (1 - acc) / len(t))


def test_tabular_theorems_and_lemma1_are_exact_to_first_order():
    tab = E.tabular(16, 6, 20, eta_pg=0.2, eta_npg=0.02)
    for key in ("theorem1_pg", "theorem2_npg"):
        assert min(tab[key]["pearson_per_step"]) > 0.999
        assert tab[key]["h_end"] < tab[key]["h_start"]  # the updates do move the policy
    # a big natural-PG step breaks the first-order statement: the check can fail
    assert min(E.tabular(16, 6, 20, eta_npg=3.0)["theorem2_npg"]["pearson_per_step"]) < 0.99
    g = torch.Generator().manual_seed(0)
    z = torch.randn(300, 14, generator=g, dtype=torch.float64)
    dz = z + torch.randn(300, 14, generator=g, dtype=torch.float64)  # mostly sharpening: the sum does not cancel
    small = E.lemma1_states(torch.log_softmax(z, -1), torch.log_softmax(z + 1e-3 * dz, -1))
    assert small["pearson"] > 0.9999 and small["ratio"] == pytest.approx(1.0, abs=0.01)
    big = E.lemma1_states(torch.log_softmax(z, -1), torch.log_softmax(z + 1.0 * dz, -1))
    assert big["pearson"] < 0.99


def test_same_seed_same_run():
    cfg = E.Config(steps=2, sft_steps=40, sft_batch=32, prompts_per_step=4, group_size=4, minibatches=1,
                   micro_batches=2, d_model=16, n_layers=1, n_heads=2, probe_depth=1)
    task = E.DigitSum(cfg.digits, cfg.target_min, cfg.target_max)
    st = E.sft(cfg, task)
    spec = {"seed": 0, "steps": 3, "label": "x", "method": "clip_cov", "claim": "dose_clip", "probe": True}
    a = E.run_method(cfg, spec, st)["log"]
    b = E.run_method(cfg, spec, st)["log"]
    a.pop("time_s"), b.pop("time_s")
    assert json.dumps(a) == json.dumps(b)  # NaN-safe equality
    assert any(d != 0 for d in a["dH_same"])  # some step had a mixed group, so an update
    assert all(p > 0.99 for p, d in zip(a["probe_pearson"], a["dH_same"], strict=True) if d != 0)  # Lemma 1
    assert len(a["probe_pearson"]) == 3 and len(a["dH_same"]) == 3
    assert a["entropy_after"][0] - a["entropy"][0] == pytest.approx(a["dH_same"][0], abs=1e-6)


def test_run_specs_cover_every_claim_and_seed():
    specs = E.run_specs(E.Config(seeds="3,4", kl_coefs="1,3,10", clip_cov_fractions="0.005,0.02,0.08"))
    labels = [s["label"] for s in specs]
    assert len(labels) == len(set(labels))
    for seed in (3, 4):
        claims = [s["claim"] for s in specs if s["seed"] == seed]
        assert claims.count("dose_kl") == 3 and claims.count("dose_clip") == 3
        assert {"main", "fig8", "rh"} <= set(claims)
    assert {s["claim"] for s in specs if s["seed"] == 3} >= {"lemma1", "lemma1_adam", "controller"}
    assert all(s["loss"]["clip_cov_fraction"] > 0 for s in specs if s["claim"] == "dose_clip")


def test_short_experiment_writes_every_artefact(tmp_path):
    out = tmp_path / "study"
    assert E.main([*TINY, "--jobs", "2", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    for name in E.FIGURES:
        assert (out / name).stat().st_size > 1000, name
        assert f"]({name})" in report
    res = json.loads((out / "results.json").read_text())
    claims = [c["claim"][:2] for c in res["analysis"]["claims"]]
    assert claims == ["1.", "2.", "3.", "4.", "5.", "6."]
    verdicts = report.split("## Verdicts\n\n")[1].split("\n\n")[0]
    for c in res["analysis"]["claims"]:  # one verdict line per claim, computed
        assert sum(line.startswith(f"| {c['claim']} |") for line in verdicts.splitlines()) == 1
        assert isinstance(c["pass"], bool)
    labels = [r["label"] for r in res["analysis"]["rows"]]
    summary = report.split("## Runs\n\n")[1].split("\n\n")[0]
    for label in labels:
        assert sum(line.startswith(f"| {label} |") for line in summary.splitlines()) == 1
    rh = [r for r in res["result"]["runs"] if r["claim"] == "rh"]
    assert len(rh) == 2 and len(rh[0]["log"]["val"]) == 6 // 2 + 1  # every 2 steps, and after the last
    ctl = next(r for r in res["result"]["runs"] if r["claim"] == "controller")
    assert len(ctl["controller"]["history"]) == 4
    assert all(h["observed_delta"] is not None for h in ctl["controller"]["history"])  # same-batch fed
    # --reanalyse rewrites the report from the stored run, without training
    (out / "report.md").unlink()
    assert E.main(["--out", str(out), "--reanalyse"]) == 0
    again = (out / "report.md").read_text()
    assert again.split("## Verdicts")[1].split("## Runs")[0] == report.split("## Verdicts")[1].split("## Runs")[0]
    assert "--reanalyse" in again.splitlines()[2]


def test_bad_config_is_a_clear_error(capsys):
    assert E.main(["--seeds", "0,0", "--out", os.devnull]) == 2
    assert "seeds" in capsys.readouterr().err
    with pytest.raises(ValueError, match="kl_coefs"):
        E.Config(kl_coefs="1,-3").validate()
    with pytest.raises(ValueError, match="group_size"):
        E.Config(group_size=1).validate()
    with pytest.raises(ValueError, match="minibatches"):
        E.Config(prompts_per_step=3, group_size=3).validate()


def _row(claim, seed, h0, h_end, r_end, dose=None):
    return {"claim": claim, "seed": seed, "dose": dose, "h_start": h0, "h_end": h_end, "h_kept": h_end / h0,
            "r_end": r_end}


def test_collapse_and_dose_verdicts_follow_the_numbers():
    from covrl.experiments.entropy import analysis as A

    task = E.DigitSum(3, 5, 24)
    good = [_row("main", s, 1.0, 0.05, 0.95) for s in range(3)]
    good += [_row("dose_kl", s, 1.0, h, 0.95, d) for s in range(3) for d, h in ((1.0, 0.3), (3.0, 0.4), (10.0, 0.5))]
    good += [_row("dose_clip", s, 1.0, h, 0.95, d) for s in range(3) for d, h in ((0.005, 0.2), (0.02, 0.3), (0.08, 0.6))]
    assert A._claim_collapse(good, task)["pass"] and A._claim_dose(good)["pass"]
    # GRPO keeps 20%: the collapse part fails even though the others keep 6x
    weak = [dict(r, h_end=0.2, h_kept=0.2) if r["claim"] == "main" else r for r in good]
    assert not A._claim_collapse(weak, task)["pass"]
    # a non-monotone dose, or a reward below GRPO's mean - sd, fails the dose claim
    bumpy = [dict(r, h_end=0.1) if r["claim"] == "dose_kl" and r["dose"] == 3.0 else r for r in good]
    assert not A._claim_dose(bumpy)["pass"]
    costly = [dict(r, r_end=0.5) if r["claim"] == "dose_clip" and r["dose"] == 0.08 else r for r in good]
    assert not A._claim_dose(costly)["pass"]
    # the max-entropy route: under 5x GRPO's final entropy, but >= 50% of the max at the reward
    hmax = task.max_entropy_per_token(0.95)
    grpo = [_row("main", s, 10.0, 0.2, 0.95) for s in range(3)]  # loses 98%
    kept = [dict(r, h_end=0.6 * hmax) if r["dose"] in (1.0, 0.02) else r for r in good if r["claim"] != "main"]
    c = A._claim_collapse(grpo + kept, task)
    assert c["KL-Cov"]["ratio"][0] < 5 and c["KL-Cov"]["frac_of_max"][0] == pytest.approx(0.6)
    assert c["pass"]
    less = [dict(r, h_end=0.4 * hmax) if r["dose"] in (1.0, 0.02) else r for r in kept]
    assert not A._claim_collapse(grpo + less, task)["pass"]
