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


def test_the_command_list_reads_each_description_as_one_sentence() -> None:
    """A docstring's wrapped first paragraph is one flowing description in ``agman --help``,
    not broken where the source line ended."""
    import os

    proc = subprocess.run([sys.executable, "-m", "agman_milvus.app.cli", "--help"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "240"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train the demo model (cached), ingest, search, check copies; writes" in proc.stdout, proc.stdout


def test_screen_help_gives_the_library_default_chunk_size() -> None:
    """The CLI does not import the screening use case to start fast, so its help states the
    default chunk size as a literal: it must be the library's."""
    import os

    from agman_milvus.usecases.screening import CHUNK_SIZE

    proc = subprocess.run([sys.executable, "-m", "agman_milvus.app.cli", "screen", "--help"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "240"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"(default {CHUNK_SIZE})" in proc.stdout, proc.stdout
