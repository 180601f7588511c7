"""BP-free runs through the multi-process pipeline: DRTP (and BP-free SGR) to the bit; FA, DFA and PEPITA refused in one
line."""
from pathlib import Path

import pytest

import launch
from tests.workers.test_pipeline import assert_bit_identical, pipeline_states, reference, run_pipeline, small_config

BPFREE = dict(model="mlp3", model_args={"width": 32}, stages=3, split="per_block", head="etf", last_head="etf")


@pytest.mark.parametrize("method", ["drtp", "sgr"])
def test_bpfree_pipeline_equals_the_sequential_reference_to_the_bit(tmp_path, method):
    cfg = small_config(tmp_path, method=method, epochs=1, **BPFREE)
    result = run_pipeline(cfg)
    trainer, expected = reference(cfg, tmp_path)
    assert_bit_identical(trainer, pipeline_states(Path(cfg.out), 3))
    assert result["test_acc"] == expected["test_acc"]


@pytest.mark.parametrize("method", ["fa", "dfa", "pepita"])
def test_fa_dfa_and_pepita_refuse_the_pipeline_in_one_line(tmp_path, capsys, method):
    argv = ["--dataset", "digits", "--model", "mlp3", "--method", method, "--no-progress", "--out", str(tmp_path / "r"),
            "--set", "stages=null", "--set", "split=per_block", "--set", "head=etf", "--set", "last_head=etf"]
    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"error: method {method} updates every layer from the output error of the same batch, which a "
                   "pipeline stage does not have yet; run it with --schedule sequential\n")
    assert not (tmp_path / "r").exists()  # refused before anything ran


def test_fa_on_conv_layers_is_refused_in_one_line(tmp_path, capsys):
    argv = ["--dataset", "digits", "--model", "plainconv3", "--method", "fa", "--schedule", "sequential", "--no-progress",
            "--out", str(tmp_path / "r"), "--set", "stages=null", "--set", "split=per_block", "--set", "head=etf",
            "--set", "last_head=etf"]
    assert launch.main(argv) == 2
    assert capsys.readouterr().err == ("error: method fa feeds the error back through fixed matrices in place of linear "
                                       "weights: use an mlp<depth> model\n")
