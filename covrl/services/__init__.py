"""covrl's gRPC services: rollout (generation), reward (verification) and learner (training).

Contracts: ``protos/covrl/v1/*.proto`` (generated code in :mod:`covrl._proto.v1`).
Launch one with ``python -m covrl.services <rollout|reward|learner> --config cfg.yaml``
or from Python with :func:`covrl.services.launch.serve` / :func:`covrl.services.launch.start`.

- ``errors.py``   the domain errors (each names its field) and ``status_for``, the one map to status codes
- ``addresses.py`` loopback test, ``host:port`` parsing, allow-lists (the learner's registrations)
- ``common.py``   what every server shares: config, security defaults, TLS, token, health, reflection,
  undecodable requests -> INVALID_ARGUMENT (re-exports ``errors`` and ``addresses``)
- ``tensors.py``  named tensors <-> TensorChunk streams (weight sync)
- ``rollout.py``  RolloutService over an engine (generation, weight updates)
- ``reward.py``   RewardService over :class:`covrl.rewards.Verifier`
- ``learner.py``  LearnerService over :class:`covrl.learner.LearnerCore`; pushes weights to rollout servers
- ``launch.py``   build and start a service from its YAML config (``serve`` / ``start``)
- ``__main__.py`` ``python -m covrl.services NAME`` (also under ``torchrun`` for the learner)
- ``fuzz.py``     a reflection-driven fuzzer of any covrl server; ``fuzz_targets.py`` the three
  servers with tiny models as its targets (tests/services/test_fuzz.py, benchmarks/bench_fuzz.py)

Imports go one way: ``errors`` <- ``addresses`` <- ``common`` <- ``tensors`` <- rollout / reward / learner <- ``launch`` <- ``__main__``.
"""
