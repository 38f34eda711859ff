"""Runs one kafkajs operation through kafkajs/run.js and returns its JSON answer."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

KAFKAJS_DIR = Path(__file__).resolve().parent / "kafkajs"


def b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def kafkajs(broker, op: str, timeout: float = 90.0, **req) -> dict:
    """Returns {"ok": True, "result": ...} or {"ok": False, "error": {...}}."""
    req = {"brokers": [broker.bootstrap], "op": op, **req}
    proc = subprocess.run(["node", "run.js", json.dumps(req)], cwd=KAFKAJS_DIR, capture_output=True,
                          timeout=timeout)
    stderr = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, f"node run.js {op} exited {proc.returncode}:\n{stderr[-5000:]}"
    lines = proc.stdout.decode().strip().splitlines()
    assert lines, f"node run.js {op} printed nothing; stderr:\n{stderr[-5000:]}"
    answer = json.loads(lines[-1])
    answer["stderr"] = stderr
    return answer


def ok(broker, op: str, **req):
    answer = kafkajs(broker, op, **req)
    assert answer["ok"], f"kafkajs {op} failed: {json.dumps(answer['error'], indent=1)}\n{answer['stderr'][-5000:]}"
    return answer["result"]
