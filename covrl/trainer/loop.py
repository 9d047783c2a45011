"""The RL trainer: drives the rollout, reward and learner services, one step at a time.

Algorithm (one step ``t``; the loop in :meth:`Trainer.train_step` reads in this order)
------------------------------------------------------------------------------------
1. **Sample prompts.** ``rollout.prompts_per_step`` prompts from the shuffled training
   split (:class:`covrl.data.PromptSampler`; its cursor is checkpointed). Prompts are
   rendered with the tokenizer's chat template *here* and sent as token ids, so every
   service sees the same ids.
2. **Generate.** The rollout service samples ``rollout.n_samples`` completions per prompt
   (seeded per step: ``seed_t = hash(seed, t)``) and returns, per token, the log-prob under
   the distribution it sampled from (the behaviour policy) and the weight version.
3. **Score.** The reward service verifies each completion against the ground truth
   (``reward.task`` or the row's ``data_source``). A non-OK status scores 0 and is counted.
4. **Advantages + update.** The trajectories (prompt ids, completion ids, behaviour
   log-probs, reward, group id = prompt) go to the learner, which computes advantages
   with the configured estimator (``covrl.advantages``: grpo / drgrpo / rloo /
   reinforce_pp) and runs ``learner.ppo_epochs`` passes of mini-batch AdamW steps on
   ``covrl.policy_loss`` (ppo, Clip-Higher = ppo with clip_high > clip_low, clip_cov,
   kl_cov), an optional entropy bonus and optional training on the top
   ``algo.entropy_top_quantile`` of tokens by entropy ("80/20").
5. **Publish.** The new weights go to every rollout server (the learner pushes them at
   the end of ``Train``; with ``max_staleness=1`` the trainer pipes ``GetWeights`` into
   ``UpdateWeights`` once the prefetched batch is done, see below).
6. **Control + log.** With ``algo.entropy_target`` set, the :class:`EntropyController`
   turns one knob (the selection fraction or ``kl_coef``) from the measured entropy and
   covariance; its output is logged and sent with the next ``Train``. Metrics per step:
   reward mean / accuracy, response length, exact policy entropy (token mean over
   response tokens, from the learner's logits), token-mean centred Cov(log pi, A), the
   same-batch entropy change of the update and its Lemma-1 and ``-eta * Cov`` predictions
   (``entropy/*``, ``covrl.learner.diagnostics``), clip / selection fractions,
   KL to the behaviour policy, and the time split generate / score / train / sync.

Off-policy (``algo.max_staleness``): 0 is synchronous. With 1, the batch for step t+1 is
generated (with the weights of step t-1) while step t trains, so every trained sample is
one version old. The learner then recomputes PPO's old log-probs with its current
weights and weights each token by the truncated importance ratio
``min(pi_old / pi_behaviour, algo.tis_cap)``. A trajectory whose version lags the
learner by more than ``max_staleness`` (e.g. from a remote rollout server that missed a
push) is dropped and counted (``staleness/dropped``).

Services: ``services.rollout / reward / learner`` give addresses. Each one left empty is
started as a subprocess on loopback (``python -m covrl.services NAME``) on a free port
(:mod:`covrl.trainer.local_services`), and is then used through exactly the same gRPC
client path as a remote one.

Failures (``failover.*``, docs/trainer.md): a failed rollout server's shard is re-sent
to the healthy ones within the step; it is re-admitted once it holds the current weights,
which the trainer pushes after each update (:mod:`covrl.trainer.fleet`). A lost reward
or learner service is restarted (local; the learner from the latest checkpoint) or
waited for (remote); the steps since the learner's weight version are redone
(:mod:`covrl.trainer.recovery`). SIGINT / SIGTERM stop the run and its local services.

Deviations from the paper (Cui et al. 2025) and its verl recipe
----------------------------------------------------------------
* Sampling, scoring and learning are separate services; with ``max_staleness=1`` the
  update is one version off-policy (verl is synchronous).
* Advantages are computed by the learner from the rewards of the submitted groups (same
  estimators as verl; no critic, no reference-model KL term, as in the paper's runs).
* The entropy controller (beyond the paper) is off unless ``algo.entropy_target`` is set.
* Clip-Cov / KL-Cov select their tokens over each learner mini-batch (the whole batch
  when ``learner.mini_batch_size=0``, the default), see ``covrl.learner``.
* The demo runs a 135M model for tens of steps on CPU, far from the paper's 7B-32B runs.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor

from covrl.client.channel import ClientError
from covrl.config import ConfigError, TrainConfig, save_config
from covrl.data import Example, PromptSampler, build_dataset, encode_prompt
from covrl.logging_utils import MetricsLogger
from covrl.trainer.checkpoint import load_resume_state, restore, save_checkpoint
from covrl.trainer.evaluation import evaluate
from covrl.trainer.fleet import RolloutFleet, Server
from covrl.trainer.local_services import (
    SERVICE_NAMES,
    Clients,
    LocalServices,
    _log,
    service_configs,
    wait_for_services,
)
from covrl.trainer.recovery import (
    RunStopped,
    StopSignals,
    admit,
    learner_version,
    lost_learner,
    recover_learner,
    retry_lost,
    stop_run,
    take_snapshot,
)
from covrl.trainer.relay import WeightRelay
from covrl.trainer.remote import check_remote_learner
from covrl.trainer.rollouts import Batch, Rollout, step_seed
from covrl.trainer.summary import summarize


def resolve_model_path(cfg: TrainConfig, run_dir: str) -> str:
    """``model.path``: a directory as is; ``demo``: fetch/cache SmolLM2; ``tiny``: write the tiny model."""
    p = cfg.model.path
    if p == "demo":
        from covrl.demo_model import ensure_demo_model

        return ensure_demo_model(cfg.model.cache_dir)
    if p == "tiny":
        from covrl.models import save_tiny_model

        path = os.path.join(run_dir, "tiny-model")
        if not os.path.exists(os.path.join(path, "config.json")):
            save_tiny_model(path, seed=cfg.seed)
        return os.path.abspath(path)
    if not os.path.isdir(p):
        raise ConfigError(f"model.path: {p!r} is not a directory (use an HF model directory, 'demo' or 'tiny')")
    return os.path.abspath(p)


# ---------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """``Trainer(cfg).run()``; ``Trainer(cfg, resume_dir=RUN_DIR)`` continues a run."""

    def __init__(self, cfg: TrainConfig, *, resume_dir: str | None = None):
        self.cfg = cfg
        self.run_dir = os.path.abspath(resume_dir or cfg.logging.run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        self.start_step = 0
        self.resume_state: dict | None = None
        self.resume_checkpoint = ""
        if resume_dir:
            self.resume_state, self.resume_checkpoint = load_resume_state(self.run_dir, resume_dir)
            self.start_step = int(self.resume_state["step"])
        save_config(cfg, os.path.join(self.run_dir, "config.yaml"))

        from transformers import AutoTokenizer

        self.model_path = resolve_model_path(cfg, self.run_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.dataset = build_dataset(cfg.data, cfg.reward_task())
        if self.dataset.skipped:
            _log(f"data: skipped {self.dataset.skipped} bad row(s) (data.on_bad_row=skip); first: "
                 f"{self.dataset.skipped_reasons[0]}")
        self.sampler = PromptSampler(self.dataset.train, cfg.seed)
        self.controller = self._make_controller()
        # entropy / covariance history for the predicted-vs-observed dH diagnostics
        self.history: list[dict] = []
        self.empty_rollouts = 0  # completions with no token (not trainable), per step
        self.pending: Future | None = None
        self._pending_batch: Batch | None = None
        self.local: LocalServices | None = None
        self.ch: Clients | None = None
        self.learner_version = 0
        self.fleet: RolloutFleet | None = None
        # failure handling (covrl.trainer.recovery): counters, the state a step can be redone from
        self.recoveries, self.redone_steps, self.recovery_s = 0, 0, []
        self.completed_step = self.checkpointed_step = self.start_step
        self._stage, self._snapshot, self.initial = "between", None, None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="covrl-prefetch")
        self._loss_overrides: dict[str, float] = {}
        if self.resume_state:
            restore(self, self.resume_state)

    # -- setup -----------------------------------------------------------------------------

    def _make_controller(self):
        a = self.cfg.algo
        if a.entropy_target is None:
            return None
        from covrl.diagnostics import EntropyController

        if a.controller_knob == "kl_coef":
            knob = "kl_coef"
        elif a.loss_mode in ("kl_cov", "clip_cov"):
            knob = f"{a.loss_mode}_fraction"
        else:
            raise ConfigError(f"algo.entropy_target needs algo.loss_mode clip_cov or kl_cov (the controller "
                              f"turns their selection fraction or kl_coef), got loss_mode={a.loss_mode}")
        if knob == "kl_coef" and a.loss_mode != "kl_cov":
            raise ConfigError("algo.controller_knob=kl_coef needs algo.loss_mode=kl_cov")
        init = a.kl_coef if knob == "kl_coef" else getattr(a, knob)
        return EntropyController(a.entropy_target, a.entropy_tolerance, knob=knob, init=init,
                                 lower=min(init, 2e-4 if knob != "kl_coef" else 1e-2))

    def _prompt_ids(self, ex: Example) -> list[int]:
        return encode_prompt(ex, self.tokenizer, self.cfg.data)

    def start_services(self, *, with_learner: bool = True) -> None:
        s = self.cfg.services
        names = SERVICE_NAMES if with_learner else ("rollout", "reward")
        missing = [n for n in names if not (s.rollout if n == "rollout" else getattr(s, n))]
        addresses: dict = {"rollout": list(s.rollout), "reward": s.reward, "learner": s.learner}
        local_rollout: dict[str, str] = {}  # address -> local instance name
        if missing:
            configs = service_configs(self.cfg, self.model_path, self.run_dir, self.resume_checkpoint)
            self.local = LocalServices(self.cfg, self.run_dir, missing, configs)
            for n, addr in self.local.start().items():
                kind = LocalServices.kind(n)
                if kind == "rollout":
                    addresses["rollout"].append(addr)
                    local_rollout[addr] = n
                else:
                    addresses[kind] = addr
        if not with_learner:
            addresses["learner"] = ""
        self.ch = Clients(self.cfg, addresses)
        wait_for_services(self.ch, self.local, local_rollout, s)
        if with_learner and not (self.local is not None and "learner" in self.local.procs):
            # a learner given by address trains with its own config: name each setting that differs
            check_remote_learner(self.cfg, self.ch.learner, service_configs(self.cfg, self.model_path, self.run_dir)
                                 ["learner"]["learner"], self.tokenizer, _log)
        self.fleet = RolloutFleet([Server(i, c, local_rollout.get(c.address)) for i, c in enumerate(self.ch.rollout)],
                                  admit=lambda srv, target: admit(self, srv, target),
                                  grace_s=self.cfg.failover.rollout_grace_s, report=_log)
        if with_learner:
            # Admission pushes the learner's weights when they are not the initial ones (a
            # resumed run): the rollout servers must sample from the learner's policy.
            self.learner_version = learner_version(self)
            self.fleet.set_target(self.learner_version)
        self.fleet.wait_for_a_server()
        self.fleet.readmissions = 0

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> dict:
        cfg = self.cfg
        logger = MetricsLogger(self.run_dir, cfg.steps, start_step=self.start_step,
                               tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
                               print_every=cfg.logging.print_every)
        self.logger = logger
        logger.watch(lambda: self._stage)  # a line every 30 s while one phase runs long
        signals = StopSignals()
        try:
            with signals:
                try:
                    self.start_services()
                    self.initial = take_snapshot(self, self.start_step + 1)
                    step = self.start_step + 1
                    while step <= cfg.steps:
                        step = self._step_with_recovery(step)
                    if cfg.eval.final and self.start_step < cfg.steps:
                        self._stage = "eval"
                        logger.log_eval(cfg.steps, self.evaluate(cfg.steps))
                except RunStopped as e:
                    stop_run(self, e)
                    raise SystemExit(128 + e.signum) from None
        finally:
            logger.close()
            self.close()
            signals.restore()
        return summarize(self.run_dir)

    def _step_with_recovery(self, step: int) -> int:
        """Step ``step`` and what follows it (log, eval, checkpoint); returns the next step to run.

        A lost learner is brought back and the trainer returns to the state of its weight
        version (:func:`covrl.trainer.recovery.recover_learner`): that step is redone.
        """
        cfg = self.cfg
        if self.pending is not None:  # max_staleness=1: the prefetched batch is part of the snapshot
            self._pending_batch, self.pending = self.pending.result(), None
        snap = self._snapshot = take_snapshot(self, step)
        logged = False
        try:
            metrics = self.train_step(step)
            self.logger.log(step, metrics)
            logged, self.completed_step, self._stage = True, step, "eval"
            if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.steps:
                self.logger.log_eval(step, self.evaluate(step))
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or (
                    step == cfg.steps and cfg.checkpoint.final):
                self._stage = "checkpoint"
                self.save_checkpoint(step)
                self.checkpointed_step = step
            self._stage = "between"
            return step + 1
        except ClientError as e:
            if not lost_learner(e):
                raise
            self._stage = "recover"
            return recover_learner(self, e, step, snap, logged)

    def close(self) -> None:
        if self.fleet is not None:
            self.fleet.close()
        if self.pending is not None:
            try:
                self.pending.result(timeout=self.cfg.failover.stop_timeout_s)
            except Exception:  # noqa: BLE001 - shutting down
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.ch is not None:
            self.ch.close()
        if self.local is not None:
            self.local.stop(timeout_s=self.cfg.failover.stop_timeout_s)

    def train_step(self, step: int) -> dict:
        """One step, in the order of the module docstring; returns its metrics."""
        t_step = time.monotonic()
        self._stage = "generate"
        batch, generate_wait_s = self._take_batch(step)  # 1-2. sample prompts -> rollouts
        self._prefetch(step)  # max_staleness=1: the next batch generates while this one trains
        self._stage = "score"
        t0 = time.monotonic()
        self.score(batch.rollouts)  # 3. score
        score_s = time.monotonic() - t0
        self._stage = "train"
        kept, dropped = self._filter_stale(batch.rollouts)  # 4. advantages + update on the learner
        resp, train_s = self._update(kept)
        self._stage = "publish"
        overlap_s, sync_s = self._publish()  # 5. publish
        m = self._metrics(step, batch, kept, dropped, resp)  # 6. control + log
        self._control(m)
        m.update({"time/generate_s": batch.generate_s if self.cfg.algo.max_staleness == 0 else generate_wait_s,
                  "time/generate_bg_s": batch.generate_s, "time/score_s": score_s, "time/train_s": train_s,
                  "time/sync_s": sync_s, "time/wait_prefetch_s": overlap_s,
                  "time/step_s": time.monotonic() - t_step})
        m.update(self._fleet_metrics())
        return m

    # -- the stages ------------------------------------------------------------------------

    def _take_batch(self, step: int) -> tuple[Batch, float]:
        """This step's rollouts (with max_staleness=1: the batch prefetched during the last step)
        and the seconds spent waiting for them."""
        t0 = time.monotonic()
        if self.pending is not None:
            batch = self.pending.result()
            self.pending = None
        elif self._pending_batch is not None:  # restored from a checkpoint
            batch, self._pending_batch = self._pending_batch, None
        else:
            batch = self.generate(self.sampler.next_batch(self.cfg.rollout.prompts_per_step), step)
        return batch, time.monotonic() - t0

    def _prefetch(self, step: int) -> None:
        """With max_staleness >= 1, start generating step ``step + 1``'s batch in the background."""
        cfg = self.cfg
        if cfg.algo.max_staleness >= 1 and step < cfg.steps:
            examples = self.sampler.next_batch(cfg.rollout.prompts_per_step)
            self.pending = self._executor.submit(self.generate, examples, step + 1)

    def _update(self, kept: list[Rollout]) -> tuple[object, float]:
        """Advantages + update on the learner; returns its response and the seconds it took."""
        t0 = time.monotonic()
        resp = self.learn(kept)
        return resp, time.monotonic() - t0

    def _publish(self) -> tuple[float, float]:
        """The healthy rollout servers take the new weights (pipelined mode: once the prefetch is
        done); returns the seconds waited for the prefetch and the seconds the push took."""
        t0 = time.monotonic()
        if self.pending is not None:
            self.pending.result()
        overlap_s = time.monotonic() - t0
        t0 = time.monotonic()
        self.push_weights()
        return overlap_s, time.monotonic() - t0

    def _fleet_metrics(self) -> dict:
        return {**self.fleet.metrics(), "failover/recoveries": self.recoveries,
                "failover/redone_steps": self.redone_steps}

    def _control(self, m: dict) -> None:
        """The entropy controller turns its knob from this step's metrics (sent with the next Train)."""
        if self.controller is not None:
            self._loss_overrides = self.controller.update(m["actor/entropy"], m.get("actor/cov"),
                                                          m.get("entropy/observed_delta"))
            for k, v in self.controller.history[-1].items():
                if v is not None and k != "step":
                    m[f"controller/{k}"] = float(v)

    # -- the pieces ------------------------------------------------------------------------

    def generate(self, examples: list[Example], step: int, *, n: int | None = None,
                 temperature: float | None = None, salt: int = 0) -> Batch:
        """Sample ``n`` completions for each example (prompts spread over the rollout servers)."""
        from covrl.client import SamplingParams

        r = self.cfg.rollout
        n = n or r.n_samples
        t0 = time.monotonic()
        ids = [self._prompt_ids(e) for e in examples]

        def params(si: int) -> SamplingParams:  # shard si's seed, whichever server runs it
            return SamplingParams(n=n, temperature=temperature or r.temperature, top_p=r.top_p, top_k=r.top_k,
                                  max_new_tokens=r.max_new_tokens, stop=tuple(r.stop),
                                  seed=step_seed(self.cfg.seed, step, salt * 1000 + si))

        results = self.fleet.generate(ids, params, timeout_s=r.timeout_s)
        groups: list[list[Rollout]] = [[] for _ in examples]
        for idx, prompt_results in results:
            for res in prompt_results:
                i = idx[res.prompt_index]
                for smp in res.samples:
                    groups[i].append(Rollout(
                        group_id=f"{step}-{salt}-{i}", example=examples[i],
                        prompt_ids=list(res.prompt_token_ids) or ids[i], completion_ids=list(smp.token_ids),
                        logprobs=list(smp.logprobs), text=smp.text, finish_reason=smp.finish_reason,
                        weight_version=int(res.weight_version)))
        return Batch(step=step, rollouts=[x for g in groups for x in g], generate_s=time.monotonic() - t0)

    def score(self, rollouts: list[Rollout]) -> None:
        """Fill ``reward`` / ``reward_status`` of each rollout from the reward service."""
        from covrl.client import ScoreItem

        rc = self.cfg.reward
        items = [ScoreItem(task=ro.example.task, prompt=ro.example.text(), completion=ro.text,
                           ground_truth=ro.example.ground_truth, metadata=ro.example.reward_meta,
                           deadline_s=rc.item_timeout_s, item_id=str(i))
                 for i, ro in enumerate(rollouts)]
        # lost: restarted (local) or waited for (remote), then the same request again
        resp = retry_lost(self, "reward", lambda: self.ch.reward.score(items, timeout_s=rc.timeout_s))
        if len(resp.results) != len(items):
            raise RuntimeError(f"the reward service returned {len(resp.results)} results for {len(items)} items")
        for ro, res in zip(rollouts, resp.results, strict=True):
            ro.reward_status = res.status
            r = float(res.reward)
            ro.reward = r if (res.status == "ok" and math.isfinite(r)) else 0.0

    def _filter_stale(self, rollouts: list[Rollout]) -> tuple[list[Rollout], int]:
        bound = self.cfg.algo.max_staleness
        kept = [ro for ro in rollouts if self.learner_version - ro.weight_version <= bound]
        return kept, len(rollouts) - len(kept)

    def learn(self, rollouts: list[Rollout]):
        from covrl.client import Trajectory

        if not rollouts:
            raise RuntimeError("every rollout of this step was dropped as stale; is a rollout server not "
                               "receiving weight pushes?")
        trajs = [Trajectory(prompt_token_ids=ro.prompt_ids, completion_token_ids=ro.completion_ids,
                            behavior_logprobs=ro.logprobs, reward=ro.reward, weight_version=ro.weight_version,
                            group_id=ro.group_id, finish_reason=ro.finish_reason)
                 for ro in rollouts if ro.completion_ids]
        self.empty_rollouts = len(rollouts) - len(trajs)
        if not trajs:
            raise RuntimeError(f"all {len(rollouts)} completions of this step are empty (0 tokens); check "
                               f"rollout.max_new_tokens and the rollout service's log")
        sub = self.ch.learner.submit_rollouts(trajs, timeout_s=120)
        if sub.buffered_trajectories > len(trajs):
            raise RuntimeError(f"the learner holds {sub.buffered_trajectories - len(trajs)} trajectories of an "
                               f"interrupted step besides this step's {len(trajs)}; restart it (from the run's "
                               f"latest checkpoint) so that the step is not trained twice")
        recompute = bool(self.cfg.learner.recompute_old_logprobs or self.cfg.algo.max_staleness > 0)
        resp = self.ch.learner.train(recompute_old_logprobs=recompute, skip_push=True,
                                     loss_overrides=self._loss_overrides or None,
                                     timeout_s=self.cfg.learner.timeout_s)
        self.learner_version = int(resp.weight_version)
        return resp

    def push_weights(self) -> None:
        """Relay the learner's weights into every healthy rollout server as they stream (one that
        fails is marked down); ``covrl.trainer.relay``."""
        fo = self.cfg.failover
        source = self.ch.learner.stream_weights(dtype=self.fleet.push_dtype(fo.probe_timeout_s), timeout_s=600)
        self.fleet.publish_relayed(WeightRelay(), source, timeout_s=fo.push_timeout_s,
                                   probe_timeout_s=fo.probe_timeout_s)

    def _metrics(self, step: int, batch: Batch, kept: list[Rollout], dropped: int, resp) -> dict:
        rs = batch.rollouts
        n = max(len(rs), 1)
        lengths = [len(ro.completion_ids) for ro in rs]
        m = {
            "reward/mean": sum(ro.reward for ro in rs) / n,
            "reward/accuracy": sum(ro.reward >= 0.999 for ro in rs) / n,
            "reward/not_ok": sum(ro.reward_status != "ok" for ro in rs),
            "response/length_mean": sum(lengths) / n,
            "response/length_max": max(lengths) if lengths else 0,
            "response/truncated_frac": sum(ro.finish_reason == "length" for ro in rs) / n,
            "staleness/dropped": dropped,
            "rollout/empty_dropped": self.empty_rollouts,
            "staleness/mean_lag": sum(self.learner_version - 1 - ro.weight_version for ro in kept) / max(len(kept), 1),
            "actor/loss": resp.loss,
            "actor/entropy": resp.entropy,
            "actor/cov": resp.cov_logp_adv,
            "actor/clip_frac": resp.clip_frac,
            "actor/approx_kl": resp.approx_kl,
            "actor/grad_norm": resp.grad_norm,
            "actor/lr": resp.learning_rate,
            "actor/num_tokens": resp.num_tokens,
            "weight_version": resp.weight_version,
            "data/epoch": self.sampler.epoch,
        }
        for k, v in resp.metrics.items():
            m.setdefault(f"actor/{k}", v)
        # Same-batch dH observed by the learner (its extra forward after the update) and its two
        # predictions, with their trailing Pearson (covrl.diagnostics.same_batch_metrics); the
        # next-batch difference is kept under its own name (mostly resampling noise).
        from covrl.diagnostics import same_batch_metrics, same_batch_record

        H, cov = float(resp.entropy), float(resp.cov_logp_adv)
        if self.history:
            m["entropy/next_batch_delta"] = H - self.history[-1]["H"]
        self.history.append({"step": step, "H": H, "cov": cov, **same_batch_record(resp.metrics)})
        m.update(same_batch_metrics(self.history))
        return m

    # -- evaluation, checkpoint / resume (covrl.trainer.evaluation, covrl.trainer.checkpoint) --

    def evaluate(self, step: int) -> dict:
        """pass@1 and pass@k on the held-out split (k samples per prompt at eval.temperature)."""
        return evaluate(self, step)

    def save_checkpoint(self, step: int) -> str:
        """RUN_DIR/checkpoints/step_N/{learner/ (HF safetensors + optimizer), trainer_state.json}."""
        return save_checkpoint(self, step)
