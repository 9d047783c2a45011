import math

import pytest
import torch

import covrl
from covrl.learner import LearnerConfig, LearnerCore, NonFiniteLossError, NothingToTrainError
from covrl.models import tiny_causal_lm

METRIC_KEYS = {"loss", "entropy", "cov", "clip_frac", "selected_frac", "approx_kl", "abs_delta_logp",
               "grad_norm", "n_tokens", "n_trajectories", "reward_mean", "response_len_mean",
               "weight_version", "time_s", "skipped_minibatches"}


def core(**kw):
    kw.setdefault("lr", 1e-3)
    return LearnerCore(LearnerConfig(**kw), model=tiny_causal_lm())


def weights(c):
    return {k: v.clone() for k, v in c.named_tensors()}


def assert_same_step(a, ma, b, mb):
    """Two learners' steps agree: the step's metrics and the weights after it."""
    for key in ("loss", "entropy", "cov", "selected_frac", "entropy_delta"):
        assert ma[key] == pytest.approx(mb[key], rel=1e-4, abs=1e-6), key
    wa, wb = weights(a), weights(b)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-4)


def single_logprobs(model, t, temperature):
    ids = torch.tensor([t["prompt_ids"] + t["completion_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float() / temperature
    p = len(t["prompt_ids"])
    logp = torch.log_softmax(logits[p - 1:-1], -1)
    lp = logp.gather(-1, torch.tensor(t["completion_ids"])[:, None])[:, 0]
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


def test_logprobs_padding_invariant_and_exact(batch):
    c = core(temperature=0.7, micro_batch_size=3)
    lps, ents = c.logprobs(batch)
    for t, lp, ent in zip(batch, lps, ents, strict=True):
        ref_lp, ref_ent = single_logprobs(c.policy, t, 0.7)
        torch.testing.assert_close(torch.tensor(lp), ref_lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(ent), ref_ent, atol=1e-5, rtol=0)


def test_logprobs_match_hf_sampling_within_1e4():
    """The log-probs HF ``generate`` samples with (temperature-processed scores) match ours."""
    model = tiny_causal_lm()
    c = LearnerCore(LearnerConfig(temperature=0.8), model=tiny_causal_lm())
    prompt = torch.tensor([[5, 17, 33, 42, 9]])
    torch.manual_seed(3)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=0.8,
                         top_p=1.0, top_k=0, max_new_tokens=12,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    comp = out.sequences[0, prompt.shape[1]:]
    eng = torch.stack([torch.log_softmax(s[0].float(), -1)[tok] for s, tok in zip(out.scores, comp, strict=True)])
    lps, _ = c.logprobs([dict(prompt_ids=prompt[0].tolist(), completion_ids=comp.tolist())])
    assert (torch.tensor(lps[0]) - eng).abs().max() < 1e-4


def test_train_step_metrics_and_version(batch):
    c = core(loss_mode="kl_cov", kl_cov_fraction=0.1)
    w0 = weights(c)
    c.submit(batch)
    m = c.train_step()
    assert METRIC_KEYS <= set(m)
    assert all(math.isfinite(v) for v in m.values())
    assert m["weight_version"] == 1 and c.weight_version == 1
    assert m["n_trajectories"] == 8 and m["n_tokens"] == sum(len(t["completion_ids"]) for t in batch)
    assert m["selected_frac"] > 0
    assert any(not torch.equal(w0[k], v) for k, v in c.named_tensors())
    with pytest.raises(NothingToTrainError):
        c.train_step()


def test_entropy_and_cov_metrics_are_exact(batch):
    c = core(recompute_old_logprobs=True)
    lps, ents = c.logprobs(batch)
    from covrl.advantages import compute_advantages

    adv = compute_advantages("grpo", [t["reward"] for t in batch], [t["group_id"] for t in batch])
    flat_lp = torch.tensor([x for row in lps for x in row], dtype=torch.float64)
    flat_ent = torch.tensor([x for row in ents for x in row], dtype=torch.float64)
    flat_a = torch.cat([adv[i].double().repeat(len(r)) for i, r in enumerate(lps)])
    cov = ((flat_lp - flat_lp.mean()) * (flat_a - flat_a.mean())).mean()
    c.submit(batch)
    m = c.train_step()
    assert m["entropy"] == pytest.approx(float(flat_ent.mean()), abs=1e-5)
    assert m["cov"] == pytest.approx(float(cov), abs=1e-5)
    assert m["approx_kl"] == pytest.approx(float((-4.6 - flat_lp).mean()), abs=1e-4)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batching_does_not_change_the_update(batch, agg):
    # adam_eps=1 makes Adam's first step ~ lr * g / (|g| + 1): smooth in g, so comparable.
    kw = dict(loss_mode="ppo", agg=agg, adam_eps=1.0, lr=1.0, shuffle=False, entropy_coef=0.01)
    a, b = core(micro_batch_size=1, **kw), core(micro_batch_size=8, **kw)
    for c in (a, b):
        c.submit(batch)
    ma, mb = a.train_step(), b.train_step()
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5, abs=1e-6)
    wa, wb = weights(a), weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-6, rtol=1e-5)


@pytest.mark.skipif(not hasattr(covrl, "compute_selection"), reason="needs covrl.compute_selection (loss branch)")
@pytest.mark.parametrize("mode,recompute", [("kl_cov", True), ("clip_cov", True), ("kl_cov", False)])
def test_global_selection_is_micro_batch_invariant(batch, mode, recompute):
    # One micro-batch selects locally (which is global); 1-row micro-batches use compute_selection
    # on the scoring pass's log-probs (recompute) or on an extra no-grad forward.
    kw = dict(loss_mode=mode, kl_cov_fraction=0.1, clip_cov_fraction=0.1, clip_cov_lb=-10.0, clip_cov_ub=10.0,
              adam_eps=1.0, lr=1.0, shuffle=False, recompute_old_logprobs=recompute, kl_coef=5.0)
    a, b = core(micro_batch_size=1, **kw), core(micro_batch_size=8, **kw)
    for c in (a, b):
        c.submit(batch)
    ma, mb = a.train_step(), b.train_step()
    assert mb["selected_frac"] > 0
    for k in ("loss", "selected_frac", "clip_frac"):
        assert ma[k] == pytest.approx(mb[k], rel=1e-5, abs=1e-6), k
    wa, wb = weights(a), weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-6, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_update(batch):
    kw = dict(loss_mode="ppo", adam_eps=1.0, lr=1.0)
    a, b = core(**kw), core(gradient_checkpointing=True, **kw)
    for c in (a, b):
        c.submit(batch)
    ma, mb = a.train_step(), b.train_step()
    assert ma["entropy"] == pytest.approx(mb["entropy"], abs=1e-6)
    wa, wb = weights(a), weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-6, rtol=1e-5)


def test_deterministic_given_seed(batch):
    kw = dict(loss_mode="clip_cov", clip_cov_fraction=0.2, clip_cov_lb=-10.0, mini_batch_size=4,
              ppo_epochs=2, micro_batch_size=2)
    a, b = core(**kw), core(**kw)
    for c in (a, b):
        c.submit(batch)
    assert a.train_step() | {"time_s": 0} == b.train_step() | {"time_s": 0}
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_positive_advantage_raises_its_logprob():
    t_good = dict(prompt_ids=[5, 6, 7], completion_ids=[10, 11, 12], logprobs=[-4.6] * 3, reward=1.0, group_id="a")
    t_bad = dict(prompt_ids=[5, 6, 7], completion_ids=[20, 21, 22], logprobs=[-4.6] * 3, reward=0.0, group_id="a")
    c = core(loss_mode="ppo", recompute_old_logprobs=True, lr=1e-2)
    before, _ = c.logprobs([t_good, t_bad])
    c.submit([t_good, t_bad])
    c.train_step()
    after, _ = c.logprobs([t_good, t_bad])
    assert sum(after[0]) > sum(before[0]) and sum(after[1]) < sum(before[1])


def test_loss_overrides_apply_to_one_step(batch):
    kw = dict(loss_mode="kl_cov", kl_cov_fraction=0.5, recompute_old_logprobs=True, mini_batch_size=4, ppo_epochs=2)
    a, b = core(**kw), core(**kw)
    for c in (a, b):
        c.submit(batch)
    ma = a.train_step()
    mb = b.train_step(loss_overrides={"kl_coef": 50.0})
    assert mb["loss"] != pytest.approx(ma["loss"], rel=1e-3)
    assert b.config.kl_coef == 1.0  # not persisted
    b.submit(batch)
    with pytest.raises(ValueError, match="cannot be overridden"):
        b.train_step(loss_overrides={"lr": 1.0})
    with pytest.raises(ValueError, match="kl_cov_fraction"):
        b.train_step(loss_overrides={"kl_cov_fraction": 20.0})
    with pytest.raises(ValueError, match="tis_cap"):
        b.train_step(loss_overrides={"tis_cap": 2.0}, recompute_old_logprobs=False)
    assert b.n_pending == 8  # rejected steps keep the batch


def test_high_entropy_tokens_only(batch):
    c = core(entropy_top_quantile=0.2)
    c.submit(batch)
    m = c.train_step()
    assert m["n_train_tokens"] == math.ceil(0.2 * m["n_tokens"])  # entropies of a random model: no ties


def test_tis_and_all_modes_run(batch):
    for mode in ("ppo", "clip_cov", "kl_cov"):
        c = core(loss_mode=mode, recompute_old_logprobs=True, tis_cap=2.0, clip_high=0.28)
        c.submit(batch)
        m = c.train_step()
        assert math.isfinite(m["loss"]) and m["skipped_minibatches"] == 0


def test_nonfinite_loss_is_skipped_or_raised(batch):
    c = core()
    with torch.no_grad():
        next(c.policy.parameters()).fill_(float("nan"))
    c.submit(batch)
    m = c.train_step()
    assert m["skipped_minibatches"] == 1 and m["n_updates"] == 0 and c.weight_version == 0
    assert math.isnan(m["entropy"])  # divergence is visible in the metrics, not hidden as 0
    c1 = core(recompute_old_logprobs=True)
    with torch.no_grad():
        next(c1.policy.parameters()).fill_(float("nan"))
    c1.submit(batch)
    assert c1.train_step()["skipped_minibatches"] == 1
    c2 = core(on_nonfinite="raise")
    with torch.no_grad():
        next(c2.policy.parameters()).fill_(float("nan"))
    c2.submit(batch)
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        c2.train_step()


@pytest.mark.parametrize("field,value,match", [
    ("logprobs", [-1.0], r"trajectories\[1\]\.logprobs must have one entry"),
    ("logprobs", None, r"trajectories\[1\]\.logprobs\[0\] must be a finite"),
    ("completion_ids", None, r"trajectories\[1\]\.completion_ids\[1\] must be a token id"),
    ("prompt_ids", [], r"trajectories\[1\]\.prompt_ids must be non-empty"),
    ("reward", float("inf"), r"trajectories\[1\]\.reward must be finite"),
])
def test_submit_rejects_bad_input_atomically(batch, field, value, match):
    c = core()
    bad = dict(batch[1])
    if field == "logprobs" and value is None:
        value = [float("nan")] + bad["logprobs"][1:]
    if field == "completion_ids" and value is None:
        value = [5, 10**6] + bad["completion_ids"][2:]
    bad[field] = value
    with pytest.raises(ValueError, match=match):
        c.submit([batch[0], bad])
    assert c.n_pending == 0


def test_submit_rejects_unknown_keys(batch):
    c = core()
    with pytest.raises(ValueError, match="unknown .'advantage'."):
        c.submit([dict(batch[0], advantage=1.0)])
    with pytest.raises(ValueError, match="missing .'reward'."):
        c.submit([{k: v for k, v in batch[0].items() if k != "reward"}])


def test_submit_limits_pending(batch):
    c = core(max_pending_trajectories=10)
    c.submit(batch)
    with pytest.raises(OverflowError, match="max_pending_trajectories"):
        c.submit(batch)
    assert c.n_pending == 8


@pytest.mark.parametrize("kw,match", [
    (dict(kl_cov_fraction=20.0), "kl_cov_fraction"),
    (dict(entropy_top_quantile=20), "entropy_top_quantile"),
    (dict(tis_cap=2.0), "tis_cap"),
    (dict(loss_mode="grpo"), "loss_mode"),
    (dict(advantage="gae"), "advantage"),
])
def test_config_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        LearnerConfig(**kw)
    with pytest.raises(ValueError, match="unknown learner config"):
        LearnerConfig.from_dict({"lr": 1e-3, "learning_rate": 1})


def test_checkpoint_roundtrip_and_resume_equality(tmp_path, batch, make_batch):
    from transformers import AutoModelForCausalLM

    b2 = make_batch(seed=1)
    a = core(mini_batch_size=4)
    a.submit(batch)
    a.train_step()
    a.save_checkpoint(str(tmp_path / "ck"))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ck"))
    wa = weights(a)
    for k, v in hf.state_dict().items():
        torch.testing.assert_close(v, wa[k], atol=0, rtol=0)
    a.submit(b2)
    m_a = a.train_step()
    r = core(mini_batch_size=4)
    r.load_checkpoint(str(tmp_path / "ck"))
    assert r.weight_version == 1
    r.submit(b2)
    m_r = r.train_step()
    assert m_a | {"time_s": 0} == m_r | {"time_s": 0}
    wr = weights(r)
    assert all(torch.equal(wa2, wr[k]) for k, wa2 in weights(a).items())


@pytest.mark.parametrize("mode,micro", [("kl_cov", 8), ("clip_cov", 2), ("ppo", 3)])
def test_one_update_per_step_takes_the_old_logprobs_from_its_own_forward(batch, monkeypatch, mode, micro):
    # recompute_old_logprobs with one update per step: no scoring pass, and the same update as with one
    from covrl.learner import policy, step

    kw = dict(loss_mode=mode, kl_cov_fraction=0.1, clip_cov_fraction=0.1, clip_cov_lb=-10.0, clip_cov_ub=10.0,
              recompute_old_logprobs=True, micro_batch_size=micro, adam_eps=1.0, lr=1.0, shuffle=False)
    calls = []
    real_pass, real_off = policy.scoring_pass, step.old_from_forward
    monkeypatch.setattr(step, "scoring_pass", lambda *a: calls.append(1) or real_pass(*a))
    a = core(measure_entropy_change=False, **kw)
    a.submit(batch)
    ma = a.train_step()
    assert calls == []  # no extra forward
    monkeypatch.setattr(step, "old_from_forward", lambda cfg, split: False)  # the scoring pass, as before
    b = core(measure_entropy_change=False, **kw)
    b.submit(batch)
    mb = b.train_step()
    assert calls == [1]
    assert ma["clip_frac"] == mb["clip_frac"] == 0.0 and ma["abs_delta_logp"] == pytest.approx(0.0, abs=1e-6)
    for key in ("loss", "entropy", "cov", "selected_frac", "approx_kl"):
        assert ma[key] == pytest.approx(mb[key], rel=1e-5, abs=1e-6), key
    wa, wb = weights(a), weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-6, rtol=1e-5)
    # two epochs or several mini-batches update before the last forward: the scoring pass runs
    for extra in ({"ppo_epochs": 2}, {"mini_batch_size": 4}):
        calls.clear()
        monkeypatch.setattr(step, "old_from_forward", real_off)
        c = core(measure_entropy_change=False, **{**kw, **extra})
        c.submit(batch)
        c.train_step()
        assert calls == [1], extra


def test_padding_free_forwards_are_exact_and_train_the_same(batch):
    c = core(temperature=0.7, micro_batch_size=8, padding_free=True)
    lps, ents = c.logprobs(batch)  # the rows concatenated into one sequence, no padding
    for t, lp, ent in zip(batch, lps, ents, strict=True):
        ref_lp, ref_ent = single_logprobs(c.policy, t, 0.7)
        torch.testing.assert_close(torch.tensor(lp), ref_lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(ent), ref_ent, atol=1e-5, rtol=0)
    kw = dict(loss_mode="kl_cov", kl_cov_fraction=0.1, adam_eps=1.0, lr=1.0, shuffle=False, entropy_coef=0.01,
              micro_batch_size=3, recompute_old_logprobs=True)
    a, b = core(padding_free=True, **kw), core(**kw)
    for x in (a, b):
        x.submit(batch)
    assert_same_step(a, a.train_step(), b, b.train_step())


def test_padding_free_is_refused_for_a_model_whose_packed_rows_would_see_each_other(monkeypatch):
    import transformers.masking_utils as mu

    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)  # as if unsupported
    with pytest.raises(ValueError, match="learner.padding_free: .* does not keep packed sequences apart"):
        core(padding_free=True)


def test_lm_head_runs_only_on_positions_that_predict_a_completion_token(batch, monkeypatch):
    """``head_on_rows``: the head's input is the K = sum(len(completion)) predicting positions, not
    B x C; log-probs, entropies and the whole update equal those of the head on every position."""
    import contextlib

    from covrl.learner import policy

    kw = dict(loss_mode="kl_cov", kl_cov_fraction=0.1, adam_eps=1.0, lr=1.0, shuffle=False, entropy_coef=0.01,
              micro_batch_size=8, recompute_old_logprobs=True)
    a, b = core(**kw), core(**kw)
    rows_seen = []
    a.policy.get_output_embeddings().register_forward_hook(  # runs after every pre-hook: what the head computed
        lambda m, args, out: rows_seen.append(tuple(out.shape[:-1])))
    lps, ents = a.logprobs(batch)
    k = sum(len(t["completion_ids"]) for t in batch)
    c_max = max(len(t["completion_ids"]) for t in batch)
    assert rows_seen == [(1, k)] and k < len(batch) * c_max
    monkeypatch.setattr(policy, "head_on_rows", lambda model, keep: contextlib.nullcontext(False))
    full_lps, full_ents = b.logprobs(batch)
    for x, y in zip(lps + ents, full_lps + full_ents, strict=True):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=1e-5, rtol=0)
    monkeypatch.undo()
    a.submit(batch)
    ma = a.train_step()
    monkeypatch.setattr(policy, "head_on_rows", lambda model, keep: contextlib.nullcontext(False))
    b.submit(batch)
    assert_same_step(a, ma, b, b.train_step())


def test_head_on_rows_names_the_shape_it_expected(batch):
    from covrl.learner import policy

    c = core()
    keep = torch.ones(2, 3, dtype=torch.bool)
    with policy.head_on_rows(c.policy, keep), pytest.raises(RuntimeError, match=r"expected \[2, 4, H\]"):
        c.policy(input_ids=torch.ones(2, 6, dtype=torch.long))  # every position reaches the head


def test_single_process_adamw_is_fused_and_updates_as_foreach(batch):
    a, b = core(lr=1e-2), core(lr=1e-2)
    assert a.optimizer.defaults["fused"] is True
    # torch's default (foreach) path with the learner's other settings (weight_decay 0, not torch's 0.01)
    b.optimizer = torch.optim.AdamW(b.policy.parameters(), lr=1e-2, weight_decay=0.0, foreach=True)
    for x in (a, b):
        x.submit(batch)
        x.train_step()
    wa, wb = weights(a), weights(b)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-7, rtol=1e-6)


def test_a_failing_entropy_diagnostic_still_counts_the_applied_update(batch, monkeypatch):
    from covrl.learner import step

    c = core(lr=1e-2)
    before = weights(c)
    c.submit(batch)
    monkeypatch.setattr(step, "entropy_change", lambda core, s: (_ for _ in ()).throw(RuntimeError("diag")))
    with pytest.raises(RuntimeError, match="diag"):
        c.train_step()
    assert c.weight_version == 1  # the weights changed: the version says so
    assert any(not torch.equal(before[k], v) for k, v in weights(c).items())
