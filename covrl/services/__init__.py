"""covrl's gRPC services: rollout (generation), reward (verification) and learner (training).

Contracts: ``protos/covrl/v1/*.proto`` (generated code in :mod:`covrl._proto.v1`).
Launch one with ``python -m covrl.services <rollout|reward|learner> --config cfg.yaml``
or from Python with :func:`covrl.services.launch.serve` / :func:`covrl.services.launch.start`.

- ``common.py``   what every server shares: config, errors -> status codes, TLS, token, health, reflection
- ``tensors.py``  named tensors <-> TensorChunk streams (weight sync)
- ``rollout.py``  RolloutService over an engine (generation, weight updates)
- ``reward.py``   RewardService over :class:`covrl.rewards.Verifier`
- ``learner.py``  LearnerService over :class:`covrl.learner.LearnerCore`; pushes weights to rollout servers
- ``launch.py``   build and start a service from its YAML config (``serve`` / ``start``)
- ``__main__.py`` ``python -m covrl.services NAME`` (also under ``torchrun`` for the learner)

Imports go one way: ``common`` <- ``tensors`` <- rollout / reward / learner <- ``launch`` <- ``__main__``.
"""
