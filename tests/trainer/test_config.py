"""Config loading: YAML + dotted overrides, and clear errors that name the field."""

import pytest

from covrl.config import ConfigError, TrainConfig, describe, load_config


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 7\nalgo:\n  loss_mode: clip_cov\nservices:\n  rollout: [a:1]\n")
    cfg = load_config(p, ["algo.kl_cov_fraction=1e-3", "rollout.temperature=0.7", "services.rollout=h1:1,h2:2"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.steps == 7 and cfg.algo.loss_mode == "clip_cov"
    assert cfg.algo.kl_cov_fraction == pytest.approx(1e-3)
    assert cfg.rollout.temperature == pytest.approx(0.7)
    assert cfg.services.rollout == ["h1:1", "h2:2"]
    assert cfg.loss_kwargs()["mode"] == "clip_cov"


@pytest.mark.parametrize(
    "override, needle",
    [
        (["algo.kl_cov_fraction=0.2"], "algo.kl_cov_fraction=0.2 looks like a percent"),
        (["algo.clip_cov_fraction=0.5"], "pass algo.clip_cov_fraction=0.005"),
        (["algo.klcov_fraction=1e-3"], "algo.klcov_fraction (did you mean algo.kl_cov_fraction?)"),
        (["steps=ten"], "steps: expected int, got 'ten'"),
        (["rollout.temperature=0"], "rollout.temperature: expected a value > 0.0"),
        (["algo.loss_mode=grpo"], "algo.loss_mode: expected one of ppo, clip_cov, kl_cov"),
        (["rollout.n_samples=1"], "rollout.n_samples must be >= 2"),
        (["data.task=file"], "data.train_path: required"),
        (["algo.dual_clip=3"], "algo.dual_clip applies to loss_mode=ppo only"),
        (["services.tls_ca=/nonexistent.pem"], "services.tls_ca: file not found"),
        (["oops"], "expected key=value"),
    ],
)
def test_errors_name_the_field(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert needle in str(e.value)


def test_large_fraction_needs_explicit_opt_in():
    cfg = load_config(None, ["algo.kl_cov_fraction=0.2", "algo.allow_large_fraction=true"])
    assert cfg.algo.kl_cov_fraction == pytest.approx(0.2)


def test_yaml_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("algo:\n  clip_low: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: algo.clip_low: expected float"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_trainer_and_service_configs_read_yaml_alike(tmp_path):
    """One reader for both: the same file gives the same one-line reason, and an empty file is {}."""
    from covrl.services.launch import ServiceConfigError
    from covrl.services.launch import load_config as load_service_config

    broken, listed, empty = tmp_path / "broken.yaml", tmp_path / "list.yaml", tmp_path / "empty.yaml"
    broken.write_text("algo: [1,\n  2")
    listed.write_text("- 1\n- 2\n")
    empty.write_text("")
    for path, reason in [(broken, "not valid YAML: .*line 2"), (listed, "expected a YAML mapping at the top level, got list")]:
        with pytest.raises(ConfigError, match=f"{path.name}: {reason}") as trainer:
            load_config(path)
        with pytest.raises(ServiceConfigError, match=f"{path.name}: {reason}") as service:
            load_service_config(path)
        assert str(trainer.value) == str(service.value) and "\n" not in str(service.value)
    assert load_service_config(empty) == {} and load_config(empty) == TrainConfig()


def test_describe_lists_every_field_with_help():
    text = describe()
    assert "algo.kl_cov_fraction (float, default 0.0002): KL-Cov: FRACTION" in text
    assert "services.learner" in text and "eval.k" in text
