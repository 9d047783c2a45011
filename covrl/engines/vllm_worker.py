"""The worker side of :class:`~covrl.engines.vllm_engine.VLLMEngine`'s weight updates.

vLLM mixes :class:`WeightSyncExtension` into its worker class (``worker_extension_cls``),
so the engine calls these methods by name with ``LLM.collective_rpc`` and nothing callable
is pickled. Tensors never travel through the RPC: the engine writes them to one safetensors
file in RAM-backed shared memory (``/dev/shm``) and sends its path; the worker maps it and
hands the HF-named tensors to vLLM's own in-place reload (``reload_weights``), which maps
them onto its fused layers and re-runs each layer's post-load processing (the CPU
backend's oneDNN pre-pack included).

One fix on top: with tied embeddings ``lm_head`` shares ``embed_tokens``' weight but loads
nothing of its own, so vLLM never re-processes it, and on the CPU backend it keeps
multiplying by the oneDNN copy packed from the *old* embedding. :func:`retie_lm_head`
re-ties it and re-runs its processing.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def iter_safetensors(paths: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in ``paths``, memory-mapped (no copy until loaded)."""
    from safetensors import safe_open

    for path in paths:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield name, f.get_tensor(name)


def retie_lm_head(model: torch.nn.Module) -> bool:
    """Re-tie ``lm_head`` to ``embed_tokens`` and redo its post-load processing; True if tied."""
    lm_head = getattr(model, "lm_head", None)
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    config = getattr(model, "config", None)
    if lm_head is None or embed is None or not getattr(config, "tie_word_embeddings", False):
        return False
    lm_head.weight = embed.weight
    quant_method = getattr(lm_head, "quant_method", None)
    if quant_method is not None and hasattr(quant_method, "process_weights_after_loading"):
        quant_method.process_weights_after_loading(lm_head)
    return True


def abandon_layerwise_reload(model: torch.nn.Module) -> None:
    """Undo a reload that raised half way, so the next one starts clean.

    vLLM's layerwise reload moves each layer onto ``meta`` and buffers what it receives until
    the layer is complete; a failure leaves those layers half set up, and the next reload
    would replay the bad tensors. Put their previous (kernel-format) tensors back instead.
    """
    from vllm.model_executor.model_loader.reload import layerwise

    for layer in model.modules():
        info = layerwise.LAYERWISE_INFO.get(layer)
        if info is not None and info.can_load():
            layerwise._place_kernel_tensors(layer, info)
            info.reset()
    if hasattr(model, "_original_do_torchao_reload"):
        model._do_torchao_reload = model._original_do_torchao_reload


class WeightSyncExtension:
    """Methods vLLM adds to each worker (named ``covrl_*`` so none shadows a worker method)."""

    def covrl_load_weights(self, paths: list[str]) -> int:
        """Load every tensor of the safetensors files ``paths`` in place; returns how many."""
        count = 0

        def counted():
            nonlocal count
            for item in iter_safetensors(paths):
                count += 1
                yield item

        model = self.model_runner.get_model()
        try:
            self.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
        except BaseException:
            abandon_layerwise_reload(model)
            raise
        retie_lm_head(model)
        return count

    def covrl_device(self) -> str:
        """The device the model runs on (``cpu``, ``cuda``, ...)."""
        return str(next(self.model_runner.get_model().parameters()).device.type)
