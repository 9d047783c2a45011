"""End to end over loopback: three real service processes (rollout, reward, learner).

generate -> score -> submit -> train -> push weights; the rollout server's weight version
increments and its log-probs for a fixed (seeded) completion change. Each server is started
with ``python -m covrl.services <name> --port 0`` and prints the port it bound.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from covrl.client import LearnerClient, RewardClient, RolloutClient, SamplingParams, ScoreItem, Trajectory
from covrl.models import save_tiny_model

TEMP = 1.0
STARTUP_S = 60


def _start(name, cfg, tmp_path):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "covrl.services", name, "--port", "0", "--config", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    lines: list[str] = []
    found = threading.Event()
    address = []

    def pump():  # keep draining the pipe so the child never blocks on a full buffer
        for line in proc.stdout:
            lines.append(line)
            m = re.search(rf"covrl {name} serving on (\S+)", line)
            if m and not found.is_set():
                address.append(m.group(1))
                found.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + STARTUP_S
    while not found.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{name} did not start (rc={proc.poll()}):\n" + "".join(lines[-40:]))
    return proc, address[0], lines


@pytest.fixture
def services(tmp_path):
    model = save_tiny_model(tmp_path / "tiny")
    started = []
    try:
        for name, cfg in [
            ("rollout", {"engine": {"kind": "transformers", "model_path": model, "max_batch_size": 8}}),
            ("reward", {"verifier": {"workers": 1}}),
            ("learner", {"learner": {"model": model, "lr": 1e-2, "temperature": TEMP, "entropy_coef": 0.05,
                                     "loss_mode": "kl_cov", "micro_batch_size": 8},
                         "checkpoint_dir": str(tmp_path / "ck")}),
        ]:
            started.append((name, *_start(name, cfg, tmp_path)))
        yield {name: addr for name, _, addr, _ in started}
    finally:
        for _, proc, _, _ in started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc, _, lines in started:
            try:
                rc = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise AssertionError(f"{name} ignored SIGTERM:\n" + "".join(lines[-20:])) from None
            assert rc == 0, f"{name} exited with {rc}:\n" + "".join(lines[-20:])


def test_generate_score_submit_train_push(services):
    rollout = RolloutClient(services["rollout"], timeout_s=60)
    reward = RewardClient(services["reward"], timeout_s=60)
    learner = LearnerClient(services["learner"], timeout_s=120)
    prompts = [[{"role": "user", "content": "What is 2+3?"}], [{"role": "user", "content": "What is 4*2?"}]]
    answers = ["5", "8"]
    fixed = SamplingParams(n=1, temperature=TEMP, max_new_tokens=8, seed=123)

    v0 = rollout.get_info().weight_version
    before = rollout.generate(prompts[:1], fixed)[0]

    results = rollout.generate(prompts, SamplingParams(n=3, temperature=TEMP, max_new_tokens=8, seed=1))
    items = [ScoreItem(task="arithmetic", prompt=prompts[r.prompt_index][0]["content"], completion=s.text,
                       ground_truth=answers[r.prompt_index]) for r in results for s in r.samples]
    scores = reward.score(items).results
    assert len(scores) == 6 and all(s.status in ("ok", "invalid") for s in scores), scores
    trajs, k = [], 0
    for r in results:
        for s in r.samples:
            trajs.append(Trajectory.from_sample(r, s, reward=scores[k].reward, group_id=f"p{r.prompt_index}"))
            k += 1
    assert learner.submit_rollouts(trajs).buffered_trajectories == 6
    assert learner.register_rollout_server(services["rollout"]).num_servers == 1
    res = learner.train(recompute_old_logprobs=True)

    assert [p.ok for p in res.pushes] == [True], res.pushes
    assert abs(res.metrics["approx_kl"]) < 1e-4  # rollout and learner log-probs agree
    assert res.weight_version == v0 + 1
    assert rollout.get_info().weight_version == v0 + 1
    after = rollout.generate(prompts[:1], fixed)[0]
    assert after.weight_version == v0 + 1
    b, a = before.samples[0], after.samples[0]
    assert a.token_ids != b.token_ids or abs(a.logprobs[0] - b.logprobs[0]) > 1e-4
    for c in (rollout, reward, learner):
        c.close()
