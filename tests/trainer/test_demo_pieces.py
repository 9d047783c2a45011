"""The pieces `make demo` runs, on the tiny model: a short run prints where its outputs are, and
`covrl eval --compare-untrained` prints the untrained model beside the trained one."""

from __future__ import annotations

import json
import os

from covrl.cli import main


def test_train_then_compare_untrained(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", "configs/tiny.yaml", f"logging.run_dir={run}", "steps=1",
                 "logging.tensorboard=true", "logging.progress=true", "eval.final=false"]) == 0
    out = capsys.readouterr()
    assert "progress: reward = mean reward" in out.err and "t = wall seconds of the last step" in out.err
    assert "starting the rollout service at" in out.err and "Connection refused" not in out.err
    for line in ("plots:", "checkpoint:", "tensorboard:"):
        assert line in out.out, out.out
    assert os.path.isdir(run / "plots")

    assert main(["eval", "--checkpoint", str(run), "--compare-untrained"]) == 0
    text = capsys.readouterr().out
    assert "untrained" in text and "trained" in text and "pass@1" in text and "pass@2" in text
    found = sorted(run.glob("**/eval-step_*/eval.json"))
    assert len(found) == 1, list(run.glob("**/eval.json"))
    saved = json.loads(found[0].read_text())
    assert set(saved["untrained"]) >= {"pass@1", "pass@2", "n_prompts"}
    assert saved["untrained"]["n_prompts"] == saved["n_prompts"]  # the same held-out prompts
    assert saved["untrained"]["checkpoint"] != saved["checkpoint"]
