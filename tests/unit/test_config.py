"""Settings' paths: what a user writes in the environment, as every process reads it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agman_milvus.core.config import Settings


def test_relative_and_home_paths_are_made_absolute_once(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AGMAN_DATA_DIR", "agman-data")
    monkeypatch.setenv("AGMAN_CHECKPOINT", "~/models/m.safetensors")
    settings = Settings()
    assert settings.data_dir == tmp_path / "agman-data"
    assert settings.checkpoint == tmp_path / "home" / "models" / "m.safetensors"
    os.chdir(tmp_path / "..")  # a later change of directory moves nothing
    assert settings.resolved_milvus_uri == str(tmp_path / "agman-data" / "milvus.db")
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'agman-data' / 'catalog.sqlite'}"
    assert Settings(checkpoint=None).checkpoint is None
