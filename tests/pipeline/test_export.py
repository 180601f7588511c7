import os

import pytest

from pipeline.export import ExportError, export_path


def test_an_unwritable_run_directory_is_named_and_the_way_out_is_given(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("dataset: digits\n")
    assert export_path(run_dir, None) == run_dir / "model.pt"
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only mount (root passes every access check)
    with pytest.raises(ExportError, match=f"^the run directory {run_dir} is not writable; export elsewhere with --to"):
        export_path(run_dir, None)
    with pytest.raises(ExportError, match=f"^--to {tmp_path / 'm.pt'}: the folder {tmp_path} is not writable"):
        export_path(run_dir, str(tmp_path / "m.pt"))
