"""FSDP2 scale-out: 2 CPU processes (gloo) make the same update as 1 process on the same batch."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from covrl.learner import LearnerConfig, LearnerCore
from covrl.models import tiny_causal_lm

# adam_eps=1 makes Adam's first step ~ lr * g / (|g| + 1), smooth in g, so comparing the
# post-step weights compares the gradients (a plain Adam step is ~ lr * sign(g)).
CFG = dict(lr=1.0, adam_eps=1.0, micro_batch_size=2, mini_batch_size=6, loss_mode="kl_cov",
           kl_cov_fraction=0.1, entropy_coef=0.01, recompute_old_logprobs=True, shuffle=True)


def _worker(rank, init_file, batch, out_path):
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # A file rendezvous: no TCP port to race other processes for. LearnerCore sees the
    # initialised group and shards the model with FSDP2.
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    core = LearnerCore(LearnerConfig(**CFG), model=tiny_causal_lm())
    try:
        if rank == 0:
            core.submit(batch)
            metrics = core.train_step()
            state = {k: v.clone() for k, v in core.named_tensors()}
            core.stop_workers()
            torch.save({"metrics": metrics, "state": state}, out_path)
        else:
            core.serve_workers()
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path, make_batch):
    batch = make_batch(n=12)
    out = tmp_path / "fsdp.pt"
    mp.start_processes(_worker, args=(str(tmp_path / "rdzv"), batch, str(out)), nprocs=2, start_method="spawn")
    got = torch.load(out, weights_only=False)
    assert got["metrics"]["weight_version"] == 1 and got["metrics"]["n_updates"] == 2

    one = LearnerCore(LearnerConfig(**CFG), model=tiny_causal_lm())
    one.submit(batch)
    ref = one.train_step()
    for k in ("loss", "entropy", "cov", "approx_kl", "selected_frac", "grad_norm"):
        assert got["metrics"][k] == pytest.approx(ref[k], rel=1e-4, abs=1e-5), k
    for k, v in one.named_tensors():
        torch.testing.assert_close(got["state"][k], v, atol=5e-6, rtol=1e-5)
