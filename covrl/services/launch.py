"""Start a covrl service from a config: ``serve("rollout", host, port, "cfg.yaml")``.

A config is a YAML mapping with a ``server:`` section (:class:`~covrl.services.common.ServerConfig`)
plus the service's own sections:

- rollout: ``engine:`` (kind, model_path, device, dtype, max_batch_size, ...), ``limits:``
- reward: ``verifier:`` (``covrl.rewards.Verifier`` keyword arguments), ``limits:``
- learner: whatever ``covrl.services.learner.LearnerServicer(config)`` reads (it gets the
  whole mapping)

``--host`` / ``--port`` on the command line override ``server.host`` / ``server.port``.

:func:`check_config` checks every key of every section before anything is built (a typo
is one line naming the key and the closest valid one, not a ``TypeError`` from a
constructor), and a model path that is not there is reported as a missing path.
``model_path: demo`` (rollout) / ``model: demo`` (learner) is the demo model
(SmolLM2-135M-Instruct, fetched once into ``.cache/``, ``covrl demo-model``).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import os
import sys

from covrl.config import read_yaml_mapping
from covrl.malloc import status as malloc_status
from covrl.services.common import RunningServer, ServerConfig, ServiceBinding, start_server

log = logging.getLogger("covrl.services")

SERVICES = ("rollout", "reward", "learner")


class ServiceConfigError(ValueError):
    """A service config names an unknown key, a bad value or a path that is not there."""


def load_config(path: str | os.PathLike | None) -> dict:
    return {} if path is None else read_yaml_mapping(path, ServiceConfigError)


def _keys(obj) -> list[str]:
    """The keyword names a dataclass or a constructor accepts."""
    if dataclasses.is_dataclass(obj):
        return [f.name for f in dataclasses.fields(obj)]
    params = inspect.signature(obj).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _check_keys(section: str, given, known: list[str]) -> None:
    if given is None:
        return
    if not isinstance(given, dict):
        raise ServiceConfigError(f"{section}: expected a mapping, got {given!r}")
    for key in given:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {section + '.' if section else ''}{close[0]}?)" if close else ""
            where = f"{section}.{key}" if section else str(key)
            raise ServiceConfigError(f"{where}: unknown key{hint}; expected one of {', '.join(known)}")


def _schema(name: str) -> dict[str, list[str]]:
    """Section -> accepted keys of service ``name`` ("" is the top level)."""
    if name == "rollout":
        from covrl.services.rollout import RolloutLimits

        return {"": ["server", "engine", "limits"], "limits": _keys(RolloutLimits)}
    if name == "reward":
        from covrl.rewards import Verifier
        from covrl.services.reward import RewardLimits

        return {"": ["server", "verifier", "limits"], "verifier": _keys(Verifier), "limits": _keys(RewardLimits)}
    from covrl.learner import LearnerConfig
    from covrl.services.learner import _SERVICE_KEYS

    return {"": sorted(_SERVICE_KEYS), "learner": _keys(LearnerConfig)}


def _engine_keys(kind: str) -> list[str]:
    if kind == "vllm":
        from covrl.engines.vllm_engine import VLLMEngine

        return ["kind", *_keys(VLLMEngine)]
    from covrl.engines.transformers_engine import TransformersEngine

    return ["kind", *[k for k in _keys(TransformersEngine) if k not in ("model", "tokenizer")]]


def resolve_model(where: str, value) -> str:
    """``demo`` -> the cached demo model; a path that is not there -> ServiceConfigError."""
    if not isinstance(value, str) or not value:
        raise ServiceConfigError(f"{where}: required: an HF model directory or 'demo', got {value!r}")
    if value == "demo":
        from covrl.demo_model import ensure_demo_model

        return ensure_demo_model()
    looks_like_path = os.path.isabs(value) or value.startswith((".", "~")) or os.sep in value.rstrip(os.sep)
    path = os.path.expanduser(value)
    if os.path.isdir(path):
        return path
    if looks_like_path and not _in_hub_cache(value):
        raise ServiceConfigError(f"{where}: no such directory: {value} (an HF model directory with config.json, "
                                 f"or 'demo' for the demo model)")
    return value


def _in_hub_cache(repo_id: str) -> bool:
    """Whether ``repo_id`` (namespace/name) is already in the local Hugging Face cache."""
    if repo_id.startswith(("/", ".", "~")) or repo_id.count("/") != 1:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - no hub library or a malformed id: not cached
        return False


def check_config(name: str, config: dict) -> dict:
    """Check every key of ``config`` for service ``name``; return it with model paths resolved."""
    if name not in SERVICES:
        raise ServiceConfigError(f"service: expected one of {SERVICES}, got {name!r}")
    config = dict(config)
    schema = _schema(name)
    _check_keys("", config, schema[""])
    _check_keys("server", config.get("server"), _keys(ServerConfig))
    for section, known in schema.items():
        if section:
            _check_keys(section, config.get(section), known)
    if name == "rollout":
        engine = config.get("engine")
        if not isinstance(engine, dict):
            raise ServiceConfigError("engine: section required (kind, model_path, device, dtype, max_batch_size)")
        kind = engine.get("kind", "transformers")
        if kind not in ("transformers", "vllm"):
            raise ServiceConfigError(f"engine.kind: expected 'transformers' or 'vllm', got {kind!r}")
        _check_keys("engine", engine, _engine_keys(kind))
        config["engine"] = {**engine, "model_path": resolve_model("engine.model_path", engine.get("model_path"))}
    if name == "learner":
        learner = config.get("learner")
        if not isinstance(learner, dict):
            raise ServiceConfigError("learner: section required (at least model: an HF model directory or 'demo')")
        config["learner"] = {**learner, "model": resolve_model("learner.model", learner.get("model"))}
        for i, spec in enumerate(config.get("rollout_servers") or []):
            if not isinstance(spec, str):
                _check_keys(f"rollout_servers[{i}]", spec, ["address", "use_tls", "root_certificates_path", "token"])
    return config


def build_bindings(name: str, config: dict) -> list[ServiceBinding]:
    if name == "rollout":
        from covrl.services.rollout import build_rollout

        return build_rollout(config)
    if name == "reward":
        from covrl.services.reward import build_reward

        return build_reward(config)
    if name == "learner":
        from covrl.services.learner import build_learner

        return build_learner(config)
    raise ValueError(f"service: expected one of {SERVICES}, got {name!r}")


def start(name: str, config: dict | None = None, host: str | None = None, port: int | None = None,
          insecure: bool = False, token_env: str | None = None) -> RunningServer:
    """Build service ``name`` from ``config`` and start it (non-blocking).

    ``host`` / ``port`` / ``token_env`` (``--token-env``) override the config's ``server:`` keys."""
    config = dict(config or {})
    server_cfg = dict(config.get("server") or {})
    if host is not None:
        server_cfg["host"] = host
    if port is not None:
        server_cfg["port"] = port
    if token_env:
        server_cfg["token_env"] = token_env
    if insecure:  # --insecure: a non-loopback host without TLS or a token (warned at start)
        server_cfg["insecure"] = True
    server = ServerConfig.from_dict(server_cfg)
    return start_server(build_bindings(name, config), server)


def serve(name: str, host: str | None = None, port: int | None = None, config_path: str | None = None,
          insecure: bool = False, token_env: str | None = None) -> None:
    """Start service ``name`` and block until SIGTERM / SIGINT, then stop gracefully.

    Under ``torchrun`` (``RANK`` > 0) the learner's other ranks serve nothing: they follow
    rank 0's commands (FSDP2) until it stops.
    """
    try:
        config = check_config(name, load_config(config_path))
        if name == "learner" and int(os.environ.get("RANK", "0")) > 0:
            from covrl.services.learner import serve_worker_rank

            serve_worker_rank(config)
            return
        running = start(name, config, host, port, insecure, token_env)
    except ValueError as e:  # a config mistake (ServiceConfigError, or a value a constructor rejected)
        where = f"{config_path}: " if config_path and str(config_path) not in str(e) else ""
        print(f"covrl {name}: config error: {where}{' '.join(str(e).split())}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except OSError as e:  # a model that cannot be loaded, a port that cannot be bound
        print(f"covrl {name}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    print(f"covrl {name} serving on {running.address}", flush=True)
    log.info(malloc_status())
    running.serve_until_signal()
