"""Train the covrl learner on trajectories you sampled yourself (a custom rollout client).

    # a learner (and, to receive the new weights, a rollout server) running somewhere:
    python -m covrl.services learner --config services/learner/config.example.yaml --port 50053 &
    python -m covrl.services rollout --config services/rollout/config.example.yaml --port 50051 &
    python examples/custom_trajectories.py --learner 127.0.0.1:50053 --push-to 127.0.0.1:50051

What it does, in the order a client must do it:

1. Ask the learner what it trains (``GetInfo``): the model, its tokenizer and chat template.
   Tokenize with exactly that template, or the learner trains on other token ids than the
   ones you sampled.
2. Render each prompt with the chat template (``add_generation_prompt=True``) to token ids.
3. Sample ``--n`` completions per prompt with your own sampler (here: transformers'
   ``generate`` on the same model) and keep the **behaviour log-prob** of every sampled
   token, ``log_softmax(logits / T)`` at the sampled id. Placeholder zeros are rejected:
   PPO's ratio and KL-Cov would be computed against them.
4. Score each completion with your reward (here: exact match of the number).
5. Submit the trajectories; the samples of one prompt share a ``group_id`` (GRPO's group
   baseline: a group of one gets advantage 0, and the learner warns).
6. Train one step; read the metrics (the TrainResult and the GetMetrics stream).
7. The learner pushes the new weights to every registered rollout server
   (``--push-to``; or pull them yourself with ``get_weights``).

Exit code 0 when every step trained and every push was acknowledged.
"""

from __future__ import annotations

import argparse
import re
import sys

import torch


def render_prompt(tokenizer, question: str) -> list[int]:
    """The prompt's token ids, rendered with the learner's chat template."""
    messages = [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


@torch.no_grad()
def sample(model, tokenizer, prompt_ids: list[int], n: int, max_new_tokens: int, temperature: float, seed: int):
    """``n`` completions of one prompt: [(token ids, behaviour log-probs, finish_reason, text)]."""
    torch.manual_seed(seed)
    inp = torch.tensor([prompt_ids])
    out = model.generate(inp, attention_mask=torch.ones_like(inp), do_sample=True, temperature=temperature,
                         top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, num_return_sequences=n,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    logits = torch.stack(out.logits, dim=1).float()  # [n, T, V]
    logp = torch.log_softmax(logits / temperature, dim=-1)
    gen = out.sequences[:, inp.shape[1]:]  # [n, T]
    samples = []
    for i in range(n):
        ids, lps = [], []
        for t, tok in enumerate(gen[i].tolist()):
            ids.append(tok)
            lps.append(float(logp[i, t, tok]))
            if tok == tokenizer.eos_token_id:
                break
        finish = "stop" if ids and ids[-1] == tokenizer.eos_token_id else "length"
        samples.append((ids, lps, finish, tokenizer.decode(ids, skip_special_tokens=True)))
    return samples


def reward(text: str, answer: int) -> float:
    """1.0 when the last number in the completion is the answer."""
    nums = re.findall(r"-?\d+", text)
    return 1.0 if nums and int(nums[-1]) == answer else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--learner", required=True, help="host:port of the learner service")
    ap.add_argument("--push-to", default="", help="host:port of a rollout server to receive the new weights")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=2, help="prompts per step")
    ap.add_argument("--n", type=int, default=4, help="samples per prompt (the GRPO group)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0, help="must match the learner's temperature")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from covrl.client import LearnerClient, Trajectory

    learner = LearnerClient(args.learner)
    # 1. what the learner trains
    info = learner.get_info(timeout_s=60)
    print(f"learner trains {info.model} (tokenizer {info.tokenizer or '?'}, vocab {info.vocab_size}, "
          f"weight version {info.weight_version})")
    tokenizer = AutoTokenizer.from_pretrained(info.tokenizer or info.model)
    if (tokenizer.chat_template or "") != info.chat_template:
        print("error: this tokenizer's chat template differs from the learner's", file=sys.stderr)
        return 1
    if abs(info.config.get("temperature", 1.0) - args.temperature) > 1e-9:
        print(f"error: the learner computes log-probs at temperature {info.config['temperature']}, "
              f"sampling uses {args.temperature}", file=sys.stderr)
        return 1
    model = AutoModelForCausalLM.from_pretrained(info.model).eval()  # the sampler: the same weights here

    if args.push_to:  # 7. the learner pushes after every Train step to the servers it knows
        reg = learner.register_rollout_server(args.push_to, push_now=False, timeout_s=60)
        print(f"registered rollout server {args.push_to} ({reg.num_servers} in all)")

    ok = True
    for step in range(args.steps):
        trajectories = []
        for p in range(args.prompts):
            a, b = 2 + step + p, 3 + p
            prompt_ids = render_prompt(tokenizer, f"What is {a} + {b}? Answer with just the number.")  # 2.
            for ids, lps, finish, text in sample(model, tokenizer, prompt_ids, args.n, args.max_new_tokens,
                                                 args.temperature, seed=1000 * step + p):  # 3.
                trajectories.append(Trajectory(
                    prompt_token_ids=prompt_ids, completion_token_ids=ids, behavior_logprobs=lps,
                    reward=reward(text, a + b),  # 4.
                    weight_version=info.weight_version, group_id=f"step{step}-prompt{p}",  # 5. one group per prompt
                    finish_reason=finish))
        sub = learner.submit_rollouts(trajectories, timeout_s=60)
        res = learner.train(timeout_s=600)  # 6.
        print(f"step {res.step}: {sub.accepted} trajectories in {sub.buffered_groups} groups, loss {res.loss:.4f}, "
              f"entropy {res.entropy:.3f}, Cov(log pi, A) {res.cov_logp_adv:.3g}, grad_norm {res.grad_norm:.3g}, "
              f"reward {res.reward_mean:.3f}, weight version {res.weight_version}")
        for push in res.pushes:
            print(f"  pushed to {push.address}: {'ok' if push.ok else push.error} ({push.elapsed_s:.2f}s)")
            ok = ok and push.ok
        info.weight_version = res.weight_version
        # keep the sampler on the learner's policy: pull the new weights (a real client would
        # sample from the rollout server that just received them)
        _, tensors = learner.get_weights(timeout_s=120)
        model.load_state_dict(tensors, strict=False)
    events = learner.metrics(include_history=True, timeout_s=10)
    first = next(iter(events))
    print(f"GetMetrics replays step {first.step}: {len(first.metrics)} metrics, e.g. "
          f"actor entropy {first.metrics.get('entropy', float('nan')):.3f}")
    learner.close()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
