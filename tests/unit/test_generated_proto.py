"""The committed protobuf/gRPC modules are what ``scripts/gen_proto.py`` generates now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_proto_code_is_fresh() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 0, (
        "generated code under src/azolla/adapters/grpc/pb is stale; run "
        f"`python scripts/gen_proto.py` and commit the result.\n{proc.stdout}{proc.stderr}"
    )
