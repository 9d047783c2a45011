"""Rollout settings of the trainer: the dtype it fetches the weights to push in, rollout.dtype, a missing vLLM."""

from __future__ import annotations

from types import SimpleNamespace

from covrl.client.channel import ClientError
from covrl.trainer.fleet import RolloutFleet, Server


class FakeClient:
    def __init__(self, dtype: str, fail: bool = False):
        self.dtype, self.fail, self.calls, self.address = dtype, fail, 0, "127.0.0.1:1"

    def get_info(self, timeout_s: float):
        self.calls += 1
        if self.fail:
            import grpc

            raise ClientError("GetInfo", grpc.StatusCode.UNAVAILABLE, "down")
        return SimpleNamespace(dtype=self.dtype, weight_version=0)

    def close(self):
        pass


def fleet(*clients) -> RolloutFleet:
    servers = [Server(i, c, healthy=True, reason="") for i, c in enumerate(clients)]
    return RolloutFleet(servers, admit=lambda s, v: v, grace_s=1.0, report=lambda line: None)


def test_half_precision_fleets_get_half_precision_weights_and_mixed_ones_the_learners():
    bf = [FakeClient("bfloat16"), FakeClient("bfloat16")]
    f = fleet(*bf)
    try:
        assert f.push_dtype(1.0) == "bfloat16"
        assert f.push_dtype(1.0) == "bfloat16" and [c.calls for c in bf] == [1, 1]  # cached
        f.mark_down(f.servers[1], "test")  # re-asked after it comes back (it may restart with another config)
        assert f.servers[1].dtype is None
    finally:
        f.close()
    for clients in ([FakeClient("bfloat16"), FakeClient("float32")], [FakeClient("float32")],
                    [FakeClient("float16"), FakeClient("bfloat16")], [FakeClient("bfloat16", fail=True)]):
        f = fleet(*clients)
        try:
            assert f.push_dtype(1.0) == "", [c.dtype for c in clients]
        finally:
            f.close()


def test_rollout_dtype_sets_the_local_engines_apart_from_the_learners():
    import pytest

    from covrl.config import ConfigError, load_config
    from covrl.trainer.local_services import rollout_engine_config, service_configs

    cfg = load_config("configs/demo.yaml", ["rollout.dtype=bfloat16", "rollout.engine=vllm"])
    assert rollout_engine_config(cfg, "m", "cpu")["dtype"] == "bfloat16"
    assert rollout_engine_config(cfg, "m", "cpu")["enforce_eager"] is False  # vLLM's default: compiled
    eager = load_config("configs/demo.yaml", ["rollout.engine=vllm", "rollout.enforce_eager=true"])
    assert rollout_engine_config(eager, "m", "cpu")["enforce_eager"] is True
    assert service_configs(cfg, "m", "/tmp/x")["learner"]["learner"]["dtype"] == "float32"
    assert rollout_engine_config(load_config("configs/demo.yaml", ["rollout.dtype="]), "m", "cpu")["dtype"] == "float32"
    with pytest.raises(ConfigError, match="rollout.dtype"):
        load_config("configs/demo.yaml", ["rollout.dtype=bf16"])


def test_a_local_vllm_engine_without_vllm_is_a_config_error_naming_the_fallback(monkeypatch, tmp_path):
    import importlib.util

    import pytest

    from covrl.config import ConfigError, load_config
    from covrl.trainer.local_services import LocalServices

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    cfg = load_config("configs/demo.yaml", ["rollout.engine=vllm"])
    with pytest.raises(ConfigError, match=r"rollout.engine: 'vllm' needs vLLM.*rollout.engine=transformers"):
        LocalServices(cfg, str(tmp_path), ["rollout", "reward"], {})
    LocalServices(cfg, str(tmp_path), ["reward"], {})  # a remote rollout server: nothing to check here


def test_the_local_rollout_start_line_names_its_engine(tmp_path):
    from covrl.config import load_config
    from covrl.trainer.local_services import LocalServices, rollout_engine_config

    cfg = load_config("configs/demo.yaml", ["rollout.engine=transformers", "rollout.dtype=bfloat16"])
    ls = LocalServices(cfg, str(tmp_path), ["rollout", "reward"],
                       {"rollout": {"engine": rollout_engine_config(cfg, "m", "cpu")}, "reward": {}})
    assert ls._engine_words("rollout") == " (engine transformers, bfloat16; rollout.engine / rollout.dtype)"
    assert ls._engine_words("reward") == ""
    ls.configs = {"rollout": {"engine": {"kind": "fake"}}}  # a test's fake engine names no dtype
    assert ls._engine_words("rollout") == " (engine fake; rollout.engine / rollout.dtype)"


def test_demo_fallbacks_say_what_they_change(tmp_path, capsys):
    from covrl.config import load_config
    from covrl.demo_model import demo_fallbacks, native_bf16_cpu

    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse avx512f avx512_bf16\n")
    assert native_bf16_cpu(str(info))
    info.write_text("processor : 0\nflags : fpu sse avx2 avx512f\n")
    assert not native_bf16_cpu(str(info)) and not native_bf16_cpu(str(tmp_path / "missing"))
    assert demo_fallbacks(have_vllm=True, native_bf16=True) == []
    got = demo_fallbacks(have_vllm=False, native_bf16=False)
    err = capsys.readouterr().err
    assert got == ["rollout.engine=transformers", "rollout.dtype=float32", "learner.autocast_dtype=none"]
    assert "vLLM is not installed here" in err and "no native bfloat16" in err
    cfg = load_config("configs/demo.yaml", got)  # the overrides are valid for the demo's config
    assert (cfg.rollout.engine, cfg.rollout.dtype, cfg.learner.autocast_dtype) == ("transformers", "float32", "none")
