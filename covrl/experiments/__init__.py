"""Reproducible experiments behind covrl's claims (``covrl experiment NAME``).

- :mod:`covrl.experiments.entropy`: the entropy-mechanism study (GRPO vs Clip-Higher vs
  Clip-Cov vs KL-Cov, the R–H law, covariance vs entropy change, entropy control).
"""

EXPERIMENTS = {"entropy": "covrl.experiments.entropy"}
