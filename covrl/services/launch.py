"""Start a covrl service from a config: ``serve("rollout", host, port, "cfg.yaml")``.

A config is a YAML mapping with a ``server:`` section (:class:`~covrl.services.common.ServerConfig`)
plus the service's own sections:

- rollout: ``engine:`` (kind, model_path, device, dtype, max_batch_size, ...), ``limits:``
- reward: ``verifier:`` (``covrl.rewards.Verifier`` keyword arguments), ``limits:``
- learner: whatever ``covrl.services.learner.LearnerServicer(config)`` reads (it gets the
  whole mapping)

``--host`` / ``--port`` on the command line override ``server.host`` / ``server.port``.
"""

from __future__ import annotations

import os

from covrl.services.common import RunningServer, ServerConfig, ServiceBinding, start_server

SERVICES = ("rollout", "reward", "learner")


def load_config(path: str | os.PathLike | None) -> dict:
    if path is None:
        return {}
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level")
    return cfg


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


def start(name: str, config: dict | None = None, host: str | None = None, port: int | None = None) -> RunningServer:
    """Build service ``name`` from ``config`` and start it (non-blocking)."""
    config = dict(config or {})
    server_cfg = dict(config.get("server") or {})
    if host is not None:
        server_cfg["host"] = host
    if port is not None:
        server_cfg["port"] = port
    server = ServerConfig.from_dict(server_cfg)
    return start_server(build_bindings(name, config), server)


def serve(name: str, host: str | None = None, port: int | None = None, config_path: str | None = None) -> None:
    """Start service ``name`` and block until SIGTERM / SIGINT, then stop gracefully.

    Under ``torchrun`` (``RANK`` > 0) the learner's other ranks serve nothing: they follow
    rank 0's commands (FSDP2) until it stops.
    """
    config = load_config(config_path)
    if name == "learner" and int(os.environ.get("RANK", "0")) > 0:
        from covrl.services.learner import serve_worker_rank

        serve_worker_rank(config)
        return
    running = start(name, config, host, port)
    print(f"covrl {name} serving on {running.address}", flush=True)
    running.serve_until_signal()
