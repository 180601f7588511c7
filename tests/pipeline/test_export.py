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


def test_a_project_folder_with_a_config_yaml_is_not_taken_for_a_run(tmp_path):
    run_dir, project = tmp_path / "run", tmp_path / "project"
    (run_dir / "checkpoints" / "step00000004").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("dataset: digits\n")
    (project / "checkpoints").mkdir(parents=True)
    (project / "config.yaml").write_text("anything: 1\n")  # someone's project, not a run: exporting into it is fine
    assert export_path(run_dir, str(project / "checkpoints" / "best.pt")) == project / "checkpoints" / "best.pt"
    (project / "checkpoints" / "step00000002").mkdir()  # now it holds a run's checkpoint
    with pytest.raises(ExportError, match=f"would overwrite the run {project}'s checkpoints/step00000002/stage1.pt"):
        export_path(run_dir, str(project / "checkpoints" / "step00000002" / "stage1.pt"))
