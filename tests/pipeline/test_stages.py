import pytest

from pipeline.config import Config
from pipeline.stages import build_local_modules, cuts_of, split_cuts


@pytest.mark.parametrize("method, stages, split", [("sgr", 3, None), ("sgr", 2, None), ("layerwise", 4, "even"),
                                                   ("bp", 1, None)])
def test_the_cuts_of_built_modules_are_the_configs_cuts(method, stages, split):
    cfg = Config(model="resnet14", method=method, stages=stages, split=split)
    local = build_local_modules(cfg, 3, 10, 32)
    assert cuts_of(local) == split_cuts(cfg, 3, 10, 32) and len(cuts_of(local)) == len(local) - 1
