"""Clients of a Milvus Lite on this machine left idle for two minutes stay connected and quiet.

pymilvus pings its server every 10 s, with or without a call in flight; Milvus Lite's gRPC server
(in the process that opened it, or ``agman milvus-serve``) answers an idle client's pings, after
about 90 s, by closing the connection (GOAWAY "too_many_pings"), and gRPC writes an error line to
the client's stderr: a user's terminal while a screening job's children work, a notebook, an idle
worker. Real Milvus Lite, a real second process; two minutes of wall time, almost no CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

IDLE_SECONDS = 120

_PROCESS = textwrap.dedent("""
    import json, subprocess, sys, time
    from agman_milvus.core.config import Settings
    from agman_milvus.services.store.vectors import lite_server_uri, open_milvus

    idle, data_dir = float(sys.argv[1]), sys.argv[2]
    settings = Settings(data_dir=data_dir) if len(sys.argv) < 4 else Settings(milvus_uri=sys.argv[3])
    client = open_milvus(settings)
    child = None
    if len(sys.argv) < 4:  # the process that opened Milvus Lite: a second one searches it too
        client.create_collection("idle", dimension=4)
        client.insert("idle", [{"id": 1, "vector": [0.1, 0.2, 0.3, 0.4]}])
        child = subprocess.Popen([sys.executable, __file__, *sys.argv[1:3], lite_server_uri(settings)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(idle)
    hits = client.search("idle", data=[[0.1, 0.2, 0.3, 0.4]], limit=1)
    print(json.dumps({"found": len(hits[0])}), flush=True)
    if child is not None:
        out, err = child.communicate(timeout=120)
        print(json.dumps({"child_code": child.returncode, "child_out": out, "child_err": err}), flush=True)
""")


def test_idle_clients_of_milvus_lite_keep_their_connection_and_stay_quiet(tmp_path: Path) -> None:
    script = tmp_path / "idle.py"
    script.write_text(_PROCESS, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script), str(IDLE_SECONDS), str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=IDLE_SECONDS + 240)
    assert done.returncode == 0, done.stderr[-2000:]
    found, child = (json.loads(line) for line in done.stdout.splitlines())
    assert found == {"found": 1}
    assert child["child_code"] == 0 and json.loads(child["child_out"]) == {"found": 1}, child
    for err in (done.stderr, child["child_err"]):
        assert "too_many_pings" not in err and "GOAWAY" not in err, err[-2000:]
