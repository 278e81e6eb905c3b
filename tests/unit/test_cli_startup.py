"""The CLI starts without the model stack: ``agman --help`` and the commands that need no model
(``agman db ...``) do not pay for importing torch."""

from __future__ import annotations

import subprocess
import sys


def test_the_cli_imports_no_torch() -> None:
    code = ("import sys\nimport agman_milvus.app.cli\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'cv2')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
