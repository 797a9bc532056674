"""Regenerate the Python protobuf/gRPC code under gen/python from proto/.

Run: python proto/generate.py   (needs grpcio-tools and mypy-protobuf from the dev extra)
The output is committed; tests/test_proto.py fails when it drifts from the .proto files.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "gen" / "python"
PROTOS = ["infermesh/decision/v1/decision.proto"]


def generate(out: Path) -> None:
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent
    args = ["protoc", f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}", f"-I{PROTO_ROOT}", f"-I{include}",
            f"--python_out={out}", f"--grpc_python_out={out}", f"--mypy_out={out}", f"--mypy_grpc_out={out}",
            *(str(PROTO_ROOT / p) for p in PROTOS)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Package markers so `infermesh.decision.v1` imports as a regular package.
    for d in (out / "infermesh", out / "infermesh" / "decision", out / "infermesh" / "decision" / "v1"):
        (d / "__init__.py").touch()
        (d / "py.typed").touch()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        target = OUT / "infermesh"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(Path(tmp) / "infermesh", target)
    print(f"generated into {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
