"""Atomic result files get the permissions an ordinary new file would, not mkstemp's private 0600."""

from __future__ import annotations

import os
from pathlib import Path

from outlier_study.output.files import write_json, write_text


def test_result_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.md", "x")
        write_json(tmp_path / "b.json", {"k": 1})
    finally:
        os.umask(old)
    for name in ("a.md", "b.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "a.md").read_text() == "x"
