"""Imported once by the verifier's fork server (never by the caller's process): loads sympy and
math-verify's LaTeX grammar there, so every worker forked from it starts warm."""

from covrl.rewards.tasks import score_one

score_one("math", "\\boxed{\\frac{1}{2}}", "0.5", {})
