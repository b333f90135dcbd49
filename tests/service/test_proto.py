"""The generated gRPC code in src/ftserve/v1 matches proto/ftserve/v1/ftserve.proto (run `make proto`)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools is in the test extra")
    args = ["protoc", f"-I{ROOT / 'proto'}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}", str(ROOT / "proto/ftserve/v1/ftserve.proto")]  # fmt: skip
    assert protoc.main(args) == 0
    for name in ("ftserve_pb2.py", "ftserve_pb2.pyi", "ftserve_pb2_grpc.py"):
        fresh = (tmp_path / "ftserve/v1" / name).read_text()
        assert fresh == (ROOT / "src/ftserve/v1" / name).read_text(), f"src/ftserve/v1/{name} is stale: make proto"
