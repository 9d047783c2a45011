"""The newcomer's mistakes with `covrl train` / `covrl eval`: one line naming the key, exit code 2;
renamed keys still work for one release with a DeprecationWarning; a service that does not
come up is reported as "starting", then fails naming its address and its log's tail."""

from __future__ import annotations

import warnings

import grpc
import pytest

from covrl.cli import main
from covrl.config import RENAMED, ConfigError, load_config
from covrl.trainer.local_services import free_port, wait_ready

DEMO = "configs/demo.yaml"


def _one_line_error(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("covrl train: no")]
    assert len(err) == 1, err
    return err[0]


def test_override_typo_is_blamed_on_the_command_line(capsys):
    assert main(["train", "--config", DEMO, "learner.lrr=1e-5"]) == 2
    line = _one_line_error(capsys)
    assert line.startswith("covrl train: config error: command-line override: ")
    assert "learner.lrr (did you mean learner.lr?)" in line
    assert DEMO not in line


def test_yaml_typo_is_blamed_on_the_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learner:\n  lrr: 1.0e-5\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert f"{cfg}: unknown config key(s): learner.lrr (did you mean learner.lr?)" in _one_line_error(capsys)


def test_train_path_without_task_file_is_an_error():
    with pytest.raises(ConfigError, match=r"data\.train_path is set but data\.task=arithmetic"):
        load_config(None, ["data.train_path=/nonexistent.jsonl"])
    with pytest.raises(ConfigError, match=r"data\.train_path: file not found"):  # now it is read
        load_config(None, ["data.task=file", "data.train_path=/nonexistent.jsonl"])


def test_missing_data_file_is_one_line_exit_2(capsys):
    assert main(["train", "--config", "configs/tiny.yaml", "data.task=file", "data.train_path=/nonexistent.jsonl",
                 "logging.run_dir=/tmp/covrl-test-missing-data"]) == 2
    assert _one_line_error(capsys) == ("covrl train: config error: command-line override: data.train_path: "
                                       "file not found: /nonexistent.jsonl")


def test_missing_data_file_from_the_api_is_a_data_error():
    from covrl.config import DataConfig
    from covrl.data import DataError, build_dataset

    with pytest.raises(DataError, match=r"^data\.eval_path: file not found: /nonexistent-eval\.jsonl"):
        build_dataset(DataConfig(task="file", train_path=DEMO, eval_path="/nonexistent-eval.jsonl"), "math")


def test_bare_train_says_what_it_does(capsys):
    assert main(["train", "algo.kl_cov_fraction=0.3"]) == 2  # stops at the config error, after the notice
    err = capsys.readouterr().err
    assert "no --config given: training with the built-in defaults" in err and "runs/default" in err


@pytest.mark.parametrize("old, new", sorted(RENAMED.items()))
def test_old_names_still_work_with_a_deprecation_warning(old, new):
    section, key = new.split(".")
    value = {"learner.ppo_epochs": 3}.get(new, 0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(None, [f"{old}={value}"])
    assert getattr(getattr(cfg, section), key) == value
    msgs = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any(old in m and new in m for m in msgs), msgs
    with pytest.raises(ConfigError, match="both given"):
        load_config(None, [f"{old}={value}", f"{new}={value}"])


def test_trainer_and_learner_share_names():
    """One name per concept: each trainer learner.* / algo.* key the learner also has is spelled the same."""
    import dataclasses

    from covrl.config import AlgoConfig, LearnerConfig
    from covrl.learner import LearnerConfig as LearnerServiceConfig

    learner = {f.name for f in dataclasses.fields(LearnerServiceConfig)}
    for cls in (AlgoConfig, LearnerConfig):
        names = {f.name for f in dataclasses.fields(cls)}
        for old, new in RENAMED.items():
            assert old.split(".")[1] not in names
            if new.split(".")[0] == ("algo" if cls is AlgoConfig else "learner"):
                assert new.split(".")[1] in names and new.split(".")[1] in learner


def test_wait_ready_says_starting_then_fails_with_the_log_tail(tmp_path):
    log = tmp_path / "rollout.log"
    log.write_text("loading model\nOSError: no such model\n")
    addr = f"127.0.0.1:{free_port()}"
    said: list[str] = []
    with grpc.insecure_channel(addr) as ch, pytest.raises(TimeoutError) as exc:
        wait_ready(ch, "rollout", addr, 1.5, alive=lambda: None, report=said.append, log_path=str(log))
    msg = str(exc.value)
    assert addr in msg and "services.start_timeout_s" in msg and "OSError: no such model" in msg
    assert said and said[0].startswith("starting the rollout service at " + addr)
    assert not any("refused" in s.lower() or "UNAVAILABLE" in s for s in said), said


def test_wait_ready_remote_names_the_address(tmp_path):
    addr = f"127.0.0.1:{free_port()}"
    said: list[str] = []
    with grpc.insecure_channel(addr) as ch, pytest.raises(TimeoutError, match="services.connect_timeout_s"):
        wait_ready(ch, "reward", addr, 1.0, report=said.append)
    assert said[0] == f"connecting to the reward service at {addr} ..."


def test_long_phase_is_named(tmp_path, capsys):
    import time

    from covrl.logging_utils import MetricsLogger

    logger = MetricsLogger(str(tmp_path), 3, tensorboard=False, progress=False)
    logger.watch(lambda: "generate", every_s=0.2)
    deadline = time.monotonic() + 30
    while "generate running" not in (err := capsys.readouterr().err) and time.monotonic() < deadline:
        time.sleep(0.1)
    logger.close()
    assert "step 1/3: generate running" in err and "the first step also warms up the model" in err


def test_the_cli_prints_every_threads_stack_on_sigusr1():
    import subprocess
    import sys

    code = ("import os, signal, time\n"
            "from covrl.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\ntime.sleep(0.5)\nprint('still running')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "still running" in p.stdout, p.stderr
    assert "Current thread" in p.stderr and "<module>" in p.stderr, p.stderr


def test_stack_dumps_fall_back_to_the_processs_stderr_when_output_is_captured(monkeypatch):
    import io
    import sys

    from covrl.logging_utils import enable_stack_dumps

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # like pytest's capsys or a notebook: no fileno
    assert enable_stack_dumps()
    monkeypatch.setattr(sys, "__stderr__", None)
    assert not enable_stack_dumps()
