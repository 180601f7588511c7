import pytest

from pipeline.registry import build_network
from pipeline.splits import SplitError, module_ranges, resolve_cuts

RESNET32 = build_network("resnet32", 3, 10, 32).resolution  # stem + 3 stages x 5 blocks = 16 units


def test_paper_splits_of_resnet32():
    # K=2: the last resolution stage (8x8, 5 blocks) alone, everything before it the other module
    assert module_ranges(resolve_cuts(RESNET32, 2, None), 16) == [range(0, 11), range(11, 16)]
    # K=3: cut at the resolution changes; the stem goes with the first stage
    assert module_ranges(resolve_cuts(RESNET32, 3, None), 16) == [range(0, 6), range(6, 11), range(11, 16)]
    # K=16: the stem is a module, each block a module
    assert module_ranges(resolve_cuts(RESNET32, 16, None), 16) == [range(i, i + 1) for i in range(16)]


def test_named_and_explicit_splits():
    assert resolve_cuts(RESNET32, None, "per_block") == list(range(1, 16))
    assert resolve_cuts(RESNET32, None, "resolution") == [6, 11]
    assert resolve_cuts(RESNET32, None, "last_stage") == [11]
    assert resolve_cuts(RESNET32, 4, None) == [4, 8, 12]  # no paper split for K=4: even
    assert resolve_cuts(RESNET32, 3, [3, 9]) == [3, 9]
    assert resolve_cuts(RESNET32, 1, None) == []


@pytest.mark.parametrize(
    "stages,split,message",
    [
        (17, None, "stages=17 is out of range: this model has 16 units"),
        (None, [0, 5], "out of range"),
        (None, [5, 16], "out of range"),
        (None, [9, 3], "strictly increasing"),
        (2, [3, 9], "gives 3 modules but stages=2"),
        (None, "halves", "unknown split 'halves'"),
    ],
)
def test_bad_splits_are_clear_errors(stages, split, message):
    with pytest.raises(SplitError, match=message):
        resolve_cuts(RESNET32, stages, split)
