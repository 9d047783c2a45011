"""The policy model: loading (device, dtype, dropout off) and its forward passes to per-token
log-probs and entropies of the completion tokens, including the no-grad scoring pass."""

from __future__ import annotations

import contextlib
import os

import torch

import covrl
from covrl.learner.batch import Packed, pack
from covrl.learner.config import LearnerConfig
from covrl.learner.distributed import allreduce_sum, rank_chunks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def disable_dropout(model) -> None:
    """Zero every dropout probability (modules and ``*dropout`` config floats)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for key, value in list(vars(model.config).items()):
        if "dropout" in key and isinstance(value, float):
            setattr(model.config, key, 0.0)


def build_policy(config: LearnerConfig, model, device: torch.device):
    """``model`` (else ``config.model`` loaded by path) on ``device`` in ``config.dtype``, dropout
    off, in train mode only for gradient checkpointing."""
    if model is None:
        if not config.model:
            raise ValueError("learner config model must name an HF model directory when no model object is given")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=DTYPES[config.dtype])
    model = model.to(device=device, dtype=DTYPES[config.dtype])
    disable_dropout(model)  # log-probs must match the rollout engine's
    if config.autocast_dtype != "none":
        keep_head_float32(model)
        if device.type == "cpu":
            float32_cpu_attention(model)
    if config.gradient_checkpointing:
        # The current API: non-reentrant checkpointing named explicitly (torch's reentrant default
        # is deprecated) and no KV cache in training (else transformers warns and turns it off).
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # HF checkpoints activations only in train mode; dropout is off anyway
    else:
        model.eval()
    return model


def keep_head_float32(model) -> None:
    """Make the LM head compute in float32 even under autocast.

    Log-probs over a 50k-token vocabulary from bfloat16 logits are off by ~0.1; the head's
    matmul is a small share of the model's. The head keeps its parameters (and so its state
    dict names and any tying with the embedding): only this instance's ``forward`` changes."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"learner config autocast_dtype: {type(model).__name__} has no output embedding "
                         "(LM head) to keep in float32; set autocast_dtype: none")
    inner = head.forward

    def forward(hidden, *args, **kwargs):
        with torch.autocast(hidden.device.type, enabled=False):
            return inner(hidden.float(), *args, **kwargs)

    head.forward = forward


FLOAT32_SDPA = "covrl_sdpa_float32"


def _sdpa_float32(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(dtype), weights


def float32_cpu_attention(model) -> None:
    """Under autocast on CPU, run a model's SDPA attention in float32.

    torch's bfloat16 flash-attention backward on CPU is several times slower than its float32
    one (45 vs ~12 ms a layer on the demo's batch of 16 x ~110 tokens, 2 cores), which ate
    most of what autocast saves in the matmuls. The projections around it stay bfloat16.
    The attention is transformers' own SDPA (mask handling included), registered under
    another name; a model on any other attention implementation is left alone."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FLOAT32_SDPA, _sdpa_float32)
    AttentionMaskInterface.register(FLOAT32_SDPA, sdpa_mask)
    model.set_attn_implementation(FLOAT32_SDPA)


def autocast(core):
    """The context the policy's forwards run in: ``torch.autocast`` at ``autocast_dtype``, or none."""
    if core.config.autocast_dtype == "none":
        return contextlib.nullcontext()
    return torch.autocast(core.device.type, dtype=DTYPES[core.config.autocast_dtype])


def logits_lp_ent(core, pk: Packed):
    """Per-token ``(log_prob, entropy)`` [B, C] of the completion tokens, 0 where padded.

    The LM head runs only on the K positions that predict a completion token
    (:func:`head_on_rows`): with the demo's completions (15-64 tokens padded to 64) that is
    under half of the B x C positions, and the head with its log-prob / entropy is the
    largest single matmul of the step and the only one whose output is V wide."""
    if core.config.padding_free:
        return padding_free_lp_ent(core.policy, pk, core.config.temperature, autocast(core))
    c = pk.labels.shape[1]
    keep = pk.mask  # [B, C]
    with autocast(core), head_on_rows(core.policy, keep) as on_rows:
        out = core.policy(
            input_ids=pk.input_ids, attention_mask=pk.attention_mask, position_ids=pk.position_ids,
            logits_to_keep=c + 1, use_cache=False,
        )
    if not on_rows:  # no LM head module to hook: every position's logits
        logits = out.logits[:, :-1]  # [B, C, V]: position P-1+i predicts completion token i
        lp, ent = covrl.logprob_entropy(logits, pk.labels, temperature=core.config.temperature)
        return torch.where(keep, lp, 0.0), torch.where(keep, ent, 0.0)
    lp, ent = covrl.logprob_entropy(out.logits, pk.labels[keep][None], temperature=core.config.temperature)  # [1, K]
    zeros = torch.zeros(keep.shape, dtype=lp.dtype, device=lp.device)
    return zeros.masked_scatter(keep, lp[0]), zeros.masked_scatter(keep, ent[0])


@contextlib.contextmanager
def head_on_rows(model, keep: torch.Tensor):
    """While active, the LM head of ``model`` sees only the positions that predict a kept token.

    The head's input is the last ``C + 1`` positions [B, C + 1, H] (``logits_to_keep``);
    position ``i`` predicts completion token ``i``, so ``hidden[:, :-1][keep]`` [K, H] is
    what it needs, and the model returns logits [1, K, V] in ``keep``'s row-major order. What
    a model does to logits after its head (soft-capping, scaling) is element-wise and still
    applies. Yields False (and changes nothing) for a model without an output embedding
    module, or when ``keep`` is empty."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not bool(keep.any()):
        yield False
        return

    def pre(module, args, kwargs):
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[0] != keep.shape[0] or hidden.shape[1] != keep.shape[1] + 1:
            raise RuntimeError(f"head_on_rows: the LM head got hidden states {tuple(hidden.shape)}, expected "
                               f"[{keep.shape[0]}, {keep.shape[1] + 1}, H] (logits_to_keep = C + 1)")
        return (hidden[:, :-1][keep][None], *args[1:]), kwargs

    handle = head.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield True
    finally:
        handle.remove()


def padding_free_lp_ent(model, pk: Packed, temperature: float, context=None):
    """:func:`logits_lp_ent` without padding: the rows' real tokens concatenated into one
    sequence whose ``position_ids`` restart at 0 per row (transformers then masks attention
    block-causally, see :func:`check_padding_free`), logits only where a completion token is
    predicted. With completions of very different lengths most of a padded batch is padding
    (16 demo samples: ~45-token prompts, completions of 15-64 tokens padded to 64)."""
    b, width = pk.input_ids.shape
    real = pk.attention_mask.bool()
    ids, pos = pk.input_ids[real][None], pk.position_ids[real][None]  # [1, T]
    flat = (real.reshape(-1).cumsum(0) - 1).reshape(b, width)  # flat index of each real token
    p = width - pk.labels.shape[1]
    keep = flat[:, p - 1: width - 1][pk.mask]  # [K]: the position predicting each completion token
    with context or contextlib.nullcontext():
        out = model(input_ids=ids, position_ids=pos, logits_to_keep=keep, use_cache=False)
    lp, ent = covrl.logprob_entropy(out.logits, pk.labels[pk.mask][None], temperature=temperature)  # [1, K]
    zeros = torch.zeros(pk.mask.shape, dtype=lp.dtype, device=lp.device)
    return zeros.masked_scatter(pk.mask, lp[0]), zeros.masked_scatter(pk.mask, ent[0])


def check_padding_free(model, device) -> None:
    """Refuse ``padding_free`` for a model whose attention would let packed rows see each other.

    Two sequences of different lengths, padded and packed: their log-probs must agree. A
    model (or attention implementation) that ignores restarting ``position_ids`` fails this."""
    from covrl.learner.batch import Trajectory, pack

    g = torch.Generator().manual_seed(0)
    vocab = int(model.config.vocab_size)
    trajs = [Trajectory(torch.randint(0, vocab, (n_p,), generator=g).tolist(),
                        torch.randint(0, vocab, (n_c,), generator=g).tolist(), [0.0] * n_c, 0.0)
             for n_p, n_c in ((5, 7), (9, 3))]
    pk = pack(trajs, device)
    with torch.no_grad():
        out = model(input_ids=pk.input_ids, attention_mask=pk.attention_mask, position_ids=pk.position_ids,
                    logits_to_keep=pk.labels.shape[1] + 1, use_cache=False)
        ref, _ = covrl.logprob_entropy(out.logits[:, :-1].float(), pk.labels)
        got, _ = padding_free_lp_ent(model, pk, 1.0)
    err = float((torch.where(pk.mask, ref - got, 0.0)).abs().max())
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if not err <= tol:
        raise ValueError(
            f"learner.padding_free: {type(model).__name__} with attn_implementation="
            f"{getattr(model.config, '_attn_implementation', '?')!r} does not keep packed sequences apart "
            f"(log-probs differ from the padded batch by {err:.3g}); set padding_free: false")


def scoring_pass(core, batch, n, c_max):
    """No-grad log-probs and entropies [N, C] of every trajectory under the current weights."""
    lp_all = torch.zeros(n, c_max, dtype=torch.float32, device=core.device)
    ent_all = torch.zeros(n, c_max, dtype=torch.float32, device=core.device)
    with torch.no_grad():
        for _, chunk in rank_chunks(list(range(n)), core.config.micro_batch_size, core.world_size, core.rank):
            rows = chunk or [0]
            pk = pack([batch[r] for r in rows], core.device)
            lp, ent = logits_lp_ent(core, pk)
            if chunk:
                c = lp.shape[1]
                lp_all[rows, :c] = torch.where(pk.mask, lp, 0.0)
                ent_all[rows, :c] = torch.where(pk.mask, ent, 0.0)
    return allreduce_sum(lp_all, core.world_size), allreduce_sum(ent_all, core.world_size)
