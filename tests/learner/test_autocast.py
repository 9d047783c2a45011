"""learner.autocast_dtype: bf16 autocast forwards/backwards, float32 LM head, weights and AdamW state."""

import pytest
import torch

from covrl.learner import LearnerConfig, LearnerCore
from covrl.models import tiny_causal_lm


def core(**kw):
    kw.setdefault("lr", 1e-3)
    return LearnerCore(LearnerConfig(**kw), model=tiny_causal_lm())


def manual_logprobs(model, t, head_float32: bool):
    """Log-probs of ``t``'s completion with the body under bf16 autocast; the head in float32 or not."""
    ids = torch.tensor([t["prompt_ids"] + t["completion_ids"]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.model(input_ids=ids).last_hidden_state[0]
        if head_float32:
            with torch.autocast("cpu", enabled=False):
                logits = hidden.float() @ model.lm_head.weight.float().T
        else:
            logits = torch.nn.functional.linear(hidden, model.lm_head.weight).float()  # bf16 under autocast
    p = len(t["prompt_ids"])
    logp = torch.log_softmax(logits[p - 1:-1], -1)
    return logp.gather(-1, torch.tensor(t["completion_ids"])[:, None])[:, 0]


def test_autocast_logprobs_are_bf16_body_float32_head(batch):
    c = core(autocast_dtype="bfloat16", micro_batch_size=3)
    fp32 = core(micro_batch_size=3)
    lps, _ = c.logprobs(batch)
    ref, _ = fp32.logprobs(batch)
    moved = max(abs(a - b) for x, y in zip(lps, ref, strict=True) for a, b in zip(x, y, strict=True))
    assert 1e-5 < moved < 0.1  # autocast is really on, and close to float32
    for t, lp in zip(batch, lps, strict=True):
        got = torch.tensor(lp)
        torch.testing.assert_close(got, manual_logprobs(c.policy, t, head_float32=True), atol=2e-5, rtol=0)
    # and a bf16 head would have given other numbers: the head really runs in float32
    bf16_head = [(torch.tensor(lp) - manual_logprobs(c.policy, t, head_float32=False)).abs().max()
                 for t, lp in zip(batch, lps, strict=True)]
    assert max(bf16_head) > 1e-4


def test_autocast_trains_float32_weights_and_state_like_float32(batch):
    kw = dict(loss_mode="kl_cov", kl_cov_fraction=0.1, lr=1e-2, shuffle=False, micro_batch_size=3,
              recompute_old_logprobs=True)
    a, b = core(autocast_dtype="bfloat16", **kw), core(**kw)
    names = [k for k, _ in b.named_tensors()]
    assert [k for k, _ in a.named_tensors()] == names  # the head keeps its parameters and names
    before = {k: v.clone() for k, v in a.named_tensors()}
    for x in (a, b):
        x.submit(batch)
    ma, mb = a.train_step(), b.train_step()
    assert ma["loss"] == pytest.approx(mb["loss"], abs=0.05) and ma["entropy"] == pytest.approx(mb["entropy"], rel=0.02)
    assert all(p.dtype == torch.float32 for p in a.policy.parameters())
    assert all(v.dtype == torch.float32 for s in a.optimizer.state.values() for v in s.values() if v.dim())
    da = torch.cat([(v - before[k]).flatten() for k, v in a.named_tensors()])
    db = torch.cat([(v - before[k]).flatten() for k, v in b.named_tensors()])
    assert da.abs().max() > 0
    assert torch.nn.functional.cosine_similarity(da, db, dim=0) > 0.9  # the same update, in other numerics


@pytest.mark.parametrize(("kw", "match"), [
    (dict(autocast_dtype="float16"), "autocast_dtype must be none | bfloat16"),
    (dict(autocast_dtype="bfloat16", dtype="bfloat16"), "autocast_dtype must be none when dtype is not float32"),
])
def test_autocast_bad_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        LearnerConfig(**kw)


def test_trainer_config_passes_autocast_and_refuses_a_half_model(tmp_path):
    from covrl.config import ConfigError, load_config
    from covrl.trainer.local_services import service_configs

    cfg = load_config(None, ["learner.autocast_dtype=bfloat16", "learner.recompute_old_logprobs=true"])
    assert service_configs(cfg, "m", str(tmp_path))["learner"]["learner"]["autocast_dtype"] == "bfloat16"
    with pytest.raises(ConfigError, match="learner.autocast_dtype=bfloat16 needs model.dtype=float32"):
        load_config(None, ["learner.autocast_dtype=bfloat16", "model.dtype=bfloat16"])
    with pytest.raises(ConfigError, match="learner.autocast_dtype: expected one of none, bfloat16"):
        load_config(None, ["learner.autocast_dtype=fp16"])


def test_cpu_autocast_runs_attention_in_float32_and_padding_free_still_exact(batch, monkeypatch):
    import transformers.integrations.sdpa_attention as sa

    seen, inner = [], sa.sdpa_attention_forward

    def spy(module, q, k, v, mask, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return inner(module, q, k, v, mask, **kw)

    monkeypatch.setattr(sa, "sdpa_attention_forward", spy)
    padded = core(autocast_dtype="bfloat16", micro_batch_size=8)
    assert padded.policy.config._attn_implementation == "covrl_sdpa_float32"
    lp_padded, _ = padded.logprobs(batch)
    assert seen and set(seen) == {(torch.float32,) * 3}
    packed = core(autocast_dtype="bfloat16", micro_batch_size=8, padding_free=True)  # its start check passes
    lp_packed, _ = packed.logprobs(batch)
    for a, b in zip(lp_padded, lp_packed, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=0.03, rtol=0)  # bf16 projections
