"""Fixtures for trainer tests: tiny-model configs and in-process services on port 0."""

from __future__ import annotations

import pytest
from trainer_helpers import in_process_services, tiny_cfg  # noqa: F401  (re-exported for fixtures)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from covrl.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)
