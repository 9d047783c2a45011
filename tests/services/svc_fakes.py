"""Test doubles for service tests (a uniquely named module: every tests/*/conftest.py imports as `conftest`)."""

from __future__ import annotations


class FakeVerifier:
    """The covrl.rewards.Verifier contract: .version, .score(items) -> results, .close()."""

    version = "fake/1"

    def __init__(self):
        self.closed = False
        self.calls = 0

    def score(self, items):
        from types import SimpleNamespace

        self.calls += 1
        out = []
        for it in items:
            if it.task not in ("exact",):
                out.append(SimpleNamespace(reward=0.0, status="unknown_task", detail=f"no task {it.task}", cached=False))
            else:
                ok = it.completion.strip() == it.ground_truth
                out.append(SimpleNamespace(reward=float(ok), status="ok", detail=repr(it.metadata), cached=False))
        return out

    def close(self):
        self.closed = True
