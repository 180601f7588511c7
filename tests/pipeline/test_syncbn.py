"""PlainBatchNorm: BatchNorm's training pass in plain tensor ops, first and second derivatives included; the groups
that SyncBatchNorm runs over end with their threads."""
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from pipeline.heads import build_head
from pipeline.models import DenseLayer
from pipeline.syncbn import PlainBatchNorm

ROOT = Path(__file__).parents[2]


def _pair(momentum: float | None, dims: int) -> tuple[nn.Module, PlainBatchNorm]:
    torch.manual_seed(0)
    reference = (nn.BatchNorm1d if dims == 2 else nn.BatchNorm2d)(6, momentum=momentum)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    plain = PlainBatchNorm(6, momentum=momentum)
    plain.load_state_dict(reference.state_dict())
    return reference, plain


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dims", [2, 4])
def test_the_training_pass_and_running_statistics_equal_torch_batchnorm(momentum, dims):
    reference, plain = _pair(momentum, dims)
    assert plain.state_dict().keys() == reference.state_dict().keys()  # checkpoints load either way
    shape = (16, 6) if dims == 2 else (8, 6, 3, 3)
    for step in range(3):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(step)) * 3 + 1
        torch.testing.assert_close(plain(x), reference(x), rtol=1e-5, atol=1e-5)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    plain.load_state_dict(reference.state_dict())
    plain.eval(), reference.eval()
    x = torch.randn(*shape)
    assert torch.equal(plain(x), reference(x))  # evaluation is BatchNorm's own, on the running statistics


def test_its_double_backward_equals_torch_batchnorms():
    """What SGR takes through every BatchNorm: the gradient of an input-gradient's norm w.r.t. the weights."""
    grads = []
    for bn in _pair(0.1, 2):
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
        (dx,) = torch.autograd.grad(bn(x).pow(3).sum(), x, create_graph=True)
        grads.append(torch.autograd.grad(dx.pow(2).sum(), [bn.weight, bn.bias]))
    for mine, theirs in zip(*grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=2e-4)  # the weights' are ~1e3, the biases' ~0


def test_a_bf16_input_is_normalised_in_fp32_and_returned_in_bf16():
    _, plain = _pair(0.1, 2)
    x = torch.randn(16, 6) * 100 + 1000  # bf16 statistics of such a column would round the mean away
    out = plain(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), plain.train()(x.bfloat16().float()), rtol=1e-2, atol=1e-2)


def test_an_fp64_input_keeps_fp64_statistics():
    reference, plain = _pair(0.1, 2)
    reference.double(), plain.double()
    x = torch.randn(16, 6, dtype=torch.float64)
    torch.testing.assert_close(plain(x), reference(x))
    assert plain(x).dtype == plain.running_var.dtype == torch.float64


def test_the_layers_that_normalise_features_use_plain_batchnorm():
    """The projector head and the MLP's DenseLayer: BatchNorm on (N, C) features, where the fused kernel's double
    backward was measured not to repeat on a GPU."""
    for layer, count in ((build_head("projector", 8, 10, width=16), 2), (DenseLayer(8, 16), 1)):
        norms = [m for m in layer.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert len(norms) == count and all(isinstance(m, PlainBatchNorm) for m in norms)


def test_one_row_in_training_is_refused_as_batchnorm_refuses_it():
    reference, plain = _pair(0.1, 2)
    for bn in (reference, plain):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            bn(torch.randn(1, 6))
    plain.eval()
    assert plain(torch.randn(1, 6)).shape == (1, 6)  # evaluation uses the running statistics: one row is fine



def gloo_threads(wait_s: float = 2.0) -> list[str]:
    """The names of this process's threads that gloo started (Linux), once none are left or after `wait_s`: a
    joined thread can stay listed in /proc for a moment after its join returned."""
    deadline = time.monotonic() + wait_s
    while True:
        names = []
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(FileNotFoundError):  # a thread that ended since the listing
                names.append(Path(f"/proc/self/task/{task}/comm").read_text().strip())
        gloo = [name for name in names if "gloo" in name]
        if not gloo or time.monotonic() > deadline:
            return gloo
        time.sleep(0.05)


def test_a_destroyed_group_leaves_no_gloo_thread_when_torch_imports_dynamo_while_it_lives():
    # in a fresh interpreter: this one imported torch._dynamo long ago
    script = """
import sys
import torch
import torch.distributed as dist
from pipeline.syncbn import single_process_group
from tests.pipeline.test_syncbn import gloo_threads
assert "torch._dynamo" not in sys.modules, "the case under test needs torch._dynamo imported while the group lives"
with single_process_group():
    dist.all_reduce(torch.ones(1))
    assert gloo_threads(wait_s=0)
    torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)  # imports torch._dynamo (torch.distributed.nn with it)
print(gloo_threads())
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # the group's threads ended with it, not at interpreter exit
