import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date():
    r = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_generated_code_targets_grpcio_184_and_imports_package_relative():
    from covrl._proto.v1 import learner_pb2, learner_pb2_grpc, reward_pb2_grpc, rollout_pb2_grpc

    for mod in (learner_pb2_grpc, reward_pb2_grpc, rollout_pb2_grpc):
        assert mod.GRPC_GENERATED_VERSION == "1.84.0"
    for path in (ROOT / "covrl" / "_proto" / "v1").glob("*.py"):
        assert "from covrl.v1 import" not in path.read_text(), path
    # learner.proto reuses rollout's TensorChunk for GetWeights
    method = learner_pb2.DESCRIPTOR.services_by_name["LearnerService"].methods_by_name["GetWeights"]
    assert method.output_type.full_name == "covrl.v1.TensorChunk" and method.server_streaming


def test_every_field_is_commented():
    import re

    for proto in (ROOT / "protos" / "covrl" / "v1").glob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            field = re.match(r"\s+(optional |repeated )?[\w.<>, ]+ \w+ = \d+;", line)
            if field and not line.strip().startswith("//"):
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} field without a comment: {line}"
