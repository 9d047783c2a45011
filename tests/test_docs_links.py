"""Every link in README.md and docs/*.md points at something that exists: markdown links and
images relative to the file, and repository paths written in backticks (`docs/x.md`; not
`benchmarks/results/*`, which names what a benchmark run writes)."""

from __future__ import annotations

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"),
                                                                          recursive=True))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# a repository path in backticks: a top-level folder of the repo, then a file with an extension
REPO_PATH = re.compile(r"`((?:docs|services|configs|examples|benchmarks|protos|covrl|tests|csrc)/[\w./-]+\.\w+)`")


def _targets(text: str):
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks show commands and output, not links
    for m in LINK.finditer(text):
        yield "link", m.group(1)
    for m in REPO_PATH.finditer(text):
        yield "path", m.group(1)


@pytest.mark.parametrize("doc", DOCS)
def test_links_resolve(doc):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        text = f.read()
    broken = []
    for kind, target in _targets(text):
        if kind == "link":
            if re.match(r"^[a-z]+://|^mailto:|^#", target):
                continue
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), target.split("#", 1)[0]))
        else:
            if any(ch in target for ch in "*<>{}") or "/step_" in target or target.startswith("benchmarks/results/"):
                continue  # a pattern, or a result file a benchmark run writes
            path = os.path.join(ROOT, target)
        if not os.path.exists(path):
            broken.append(target)
    assert not broken, f"{doc}: broken links {broken}"


def test_the_check_catches_a_broken_link(tmp_path):
    text = "see [the study](docs/entropy.md) and `docs/nope.md`"
    assert [t for _, t in _targets(text)] == ["docs/entropy.md", "docs/nope.md"]
