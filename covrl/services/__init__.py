"""covrl's gRPC services: rollout (generation), reward (verification) and learner (training).

Contracts: ``protos/covrl/v1/*.proto`` (generated code in :mod:`covrl._proto.v1`).
Launch one with ``python -m covrl.services <rollout|reward|learner> --config cfg.yaml``
or from Python with :func:`covrl.services.launch.serve` / :func:`covrl.services.launch.start`.
Shared server plumbing (errors -> status codes, TLS, token auth, health, reflection) lives
in :mod:`covrl.services.common`.
"""
