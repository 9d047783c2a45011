"""Same-batch entropy diagnostics of the learner step (covrl.learner.diagnostics)."""

import math

import pytest
import torch

from covrl.learner import LearnerConfig, LearnerCore
from covrl.learner.diagnostics import same_batch_metrics
from covrl.models import tiny_causal_lm

KEYS = ("entropy_after", "entropy_delta", "entropy_delta_lemma1", "entropy_step_size", "entropy_delta_cov")


def core(**kw):
    kw.setdefault("lr", 1e-3)
    return LearnerCore(LearnerConfig(**kw), model=tiny_causal_lm())


def flat(rows):
    return torch.tensor([x for r in rows for x in r], dtype=torch.float64)


@pytest.mark.parametrize("mini_batch_size", [0, 4])
def test_observed_delta_is_the_same_batch_change(batch, mini_batch_size):
    c = core(loss_mode="ppo", mini_batch_size=mini_batch_size)
    lp0, ent0 = c.logprobs(batch)  # pre-update, exact
    c.submit(batch)
    m = c.train_step()
    lp1, ent1 = c.logprobs(batch)  # post-update, same sequences
    assert set(KEYS) <= set(m)
    # with 2 mini-batches the entropy is still the pre-update policy's (a scoring pass ran first)
    assert m["entropy"] == pytest.approx(float(flat(ent0).mean()), abs=1e-5)
    assert m["entropy_after"] == pytest.approx(float(flat(ent1).mean()), abs=1e-5)
    assert m["entropy_delta"] == pytest.approx(float(flat(ent1).mean() - flat(ent0).mean()), abs=1e-5)
    assert m["entropy_delta"] != 0.0
    lemma1 = -float(((flat(lp0) + flat(ent0)) * (flat(lp1) - flat(lp0))).mean())
    assert m["entropy_delta_lemma1"] == pytest.approx(lemma1, rel=1e-3, abs=1e-7)


def test_off_means_no_extra_forward_and_no_keys(batch, monkeypatch):
    import covrl.learner.diagnostics as D

    calls = []
    monkeypatch.setattr(D, "scoring_pass", lambda *a: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    c = core(measure_entropy_change=False, mini_batch_size=4)
    c.submit(batch)
    m = c.train_step()
    assert not calls and not set(KEYS) & set(m)


def _softmax_states(n_states=400, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_states, k, generator=g, dtype=torch.float64) * 1.5
    return z, g


def test_lemma1_estimator_matches_the_exact_entropy_change_on_a_softmax():
    # A tabular softmax: sample one action per state, move the logits a small step; the one-sample
    # Lemma-1 estimate, averaged over many states, equals the exact dH to first order.
    z, g = _softmax_states(20000)
    dz = 0.02 * (z + torch.randn(z.shape, generator=g, dtype=torch.float64))  # mostly sharpening
    logp0, logp1 = torch.log_softmax(z, -1), torch.log_softmax(z + dz, -1)
    h0, h1 = -(logp0.exp() * logp0).sum(-1), -(logp1.exp() * logp1).sum(-1)
    a = torch.multinomial(logp0.exp(), 1, generator=g)  # [S, 1]
    lp0, lp1 = logp0.gather(1, a), logp1.gather(1, a)
    mask = torch.ones_like(lp0, dtype=torch.bool)
    m = same_batch_metrics(lp0, h0[:, None], lp1, h1[:, None], torch.zeros(len(z)), mask)
    exact_lemma1 = -float(((logp0 + h0[:, None]) * (dz - (logp0.exp() * dz).sum(-1, keepdim=True))
                           * logp0.exp()).sum(-1).mean())
    assert m["entropy_delta"] == pytest.approx(float((h1 - h0).mean()), rel=1e-9)
    assert exact_lemma1 == pytest.approx(m["entropy_delta"], rel=0.05)  # Lemma 1 itself, first order
    sd = float((((lp0 + h0[:, None]) * (lp1 - lp0))).std()) / math.sqrt(len(z))
    assert abs(m["entropy_delta_lemma1"] - exact_lemma1) < 4 * sd  # unbiased one-sample estimate


def test_step_size_is_the_natural_pg_step_and_cov_prediction_its_theorem():
    # Natural PG on a tabular softmax: z += eta * A. Measured step = eta; -eta*Cov tracks dH.
    z, g = _softmax_states(5000, k=5)
    eta = 0.02
    p0 = torch.softmax(z, -1)
    a = torch.multinomial(p0, 1, generator=g)  # [S, 1]
    adv = torch.randn(z.shape, generator=g, dtype=torch.float64)
    adv = adv - (p0 * adv).sum(-1, keepdim=True)  # E_pi A = 0 per state
    logp0, logp1 = torch.log_softmax(z, -1), torch.log_softmax(z + eta * adv, -1)
    h0, h1 = -(logp0.exp() * logp0).sum(-1), -(logp1.exp() * logp1).sum(-1)
    mask = torch.ones(len(z), 1, dtype=torch.bool)
    m = same_batch_metrics(logp0.gather(1, a), h0[:, None], logp1.gather(1, a), h1[:, None], adv.gather(1, a), mask)
    assert m["entropy_step_size"] == pytest.approx(eta, rel=0.05)
    assert math.copysign(1, m["entropy_delta_cov"]) == math.copysign(1, m["entropy_delta"])
