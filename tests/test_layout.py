"""The layout's promises: no import cycles inside covrl, small files, public import paths kept."""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "covrl"
MAX_LINES = 520  # the house style's "under ~500 lines"; generated code (covrl/_proto) aside


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py") if "_proto" not in p.parts}


def _is_type_checking(node: ast.AST) -> bool:
    t = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING")
        or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"))


def _runtime_nodes(tree: ast.AST):
    """Every node that can run: ``if TYPE_CHECKING:`` bodies are left out."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """covrl modules that ``name`` imports anywhere it runs (function-level imports too)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                if sub in known:
                    out.add(sub)  # ``from pkg import submodule``
                elif mod in known:
                    out.add(mod)
    out.discard(name)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_covrl():
    mods = _modules()
    known = set(mods)
    graph = {name: _imports(name, path, known) for name, path in mods.items()}
    assert _cycles(graph) == []


@pytest.mark.parametrize("top", ["covrl", "csrc", "services", "benchmarks"])
def test_files_are_small(top):
    exts = {".py", ".cu", ".cuh", ".cpp", ".h", ".sh"}
    big = []
    for p in (ROOT / top).rglob("*"):
        if p.suffix in exts and "_proto" not in p.parts and p.is_file():
            n = len(p.read_text().splitlines())
            if n > MAX_LINES:
                big.append(f"{p.relative_to(ROOT)}: {n} lines")
    assert big == []


PUBLIC = {
    "covrl": ["policy_loss", "policy_loss_selected", "compute_selection", "logprob_entropy",
              "fused_policy_loss", "Selection", "kernel_info"],
    "covrl.ops": ["policy_loss", "policy_loss_selected", "compute_selection", "logprob_entropy",
                  "fused_policy_loss", "Selection", "METRIC_NAMES"],
    "covrl.learner": ["LearnerConfig", "LearnerCore", "Trajectory", "NonFiniteLossError",
                      "NothingToTrainError", "validate_trajectory"],
    "covrl.client": ["RolloutClient", "RewardClient", "LearnerClient", "ClientError", "SamplingParams",
                     "ScoreItem", "Trajectory", "TrainResult", "PushResult", "SubmitResult"],
    "covrl.trainer": ["Trainer", "train", "evaluate_checkpoint", "format_summary", "summarize",
                      "pass_at_k", "free_port", "LocalServices", "wait_ready", "service_configs"],
    "covrl.experiments.entropy": ["main", "Config", "run_all", "analyse"],
    "covrl.services.launch": ["serve", "start", "load_config", "SERVICES"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_import_paths(module):
    m = importlib.import_module(module)
    missing = [n for n in PUBLIC[module] if not hasattr(m, n)]
    assert missing == []
