"""SimulatedStep stands in for a StageStep: sleeps, passes x on, δ only where the next stage needs one."""
import time

import pytest
import torch

from pipeline.config import Config, ConfigError, validate
from pipeline.data import data_shape, load_data
from pipeline.stages import build_local_modules, build_stage_steps
from workers.launcher import run_spawned
from workers.simulated import SimulatedStep


def steps_for(method: str) -> list:
    cfg = Config(dataset="digits", model="resnet8", stages=3, method=method, batch_size=8, progress=False)
    local = build_local_modules(cfg, 1, 10, 8)
    return build_stage_steps(cfg, local, steps_per_epoch=4)


@pytest.mark.parametrize("method", ["sgr", "layerwise"])
def test_sleeps_and_passes_x_on_with_a_zero_delta_where_needed(method):
    steps = steps_for(method)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for k, real in enumerate(steps):
        sim = SimulatedStep(real, ms=20)
        start = time.perf_counter()
        result = sim.train_step(x, None, y)
        assert time.perf_counter() - start >= 0.02
        assert sim.optimizer is real.optimizer and "lr" in sim.optimizer.param_groups[0]
        assert result.stats.count == 8 and float(result.stats.loss) == 0.0
        if k == len(steps) - 1:
            assert result.out is None and result.delta is None
        else:
            assert torch.equal(result.out, x) and result.out.data_ptr() != x.data_ptr()  # its own copy: IPC-safe
            if method == "sgr":
                assert torch.equal(result.delta, torch.zeros_like(x))
            else:
                assert result.delta is None
        out, logits = sim.eval_forward(x)
        assert torch.equal(out, x) and out.data_ptr() != x.data_ptr() and logits.shape == (8, 1)


def test_negative_delay_is_a_config_error():
    with pytest.raises(ConfigError, match="simulate_step_ms"):
        validate(Config(simulate_step_ms=-1.0))


def test_a_simulated_pipeline_runs_and_takes_at_least_its_sleeps(tmp_path):
    cfg = Config(dataset="digits", model="resnet8", stages=2, method="sgr", epochs=1, batch_size=96, threads=1,
                 train_subset=480, eval_batch_size=400, progress=False,
                 simulate_step_ms=50.0, out=str(tmp_path / "run"))
    data = load_data(cfg.dataset, train_subset=cfg.train_subset)
    result = run_spawned(cfg, cfg.stages, data_shape(data, cfg.batch_size))
    assert result["seconds"] >= 5 * 0.05
    assert len(result["busy_fraction"]) == 2
    assert result["peak_memory_kind"] == "cpu_max_rss" and all(b > 50 * 2**20 for b in result["peak_memory_bytes"])
