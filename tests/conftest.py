"""Fixtures shared by test modules."""
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import torch

# cuBLAS reads its workspace setting once, at the process's first matrix product: on a GPU, tests that run CUDA
# products come before the in-process deterministic runs (tests/gpu), so the setting must be there from the start
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(autouse=True)
def torch_settings_restored() -> Iterator[None]:
    """A run in the test process (stages.configure_torch) changes process-wide torch switches: put them back."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    yield
    deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, \
        torch.backends.cuda.matmul.allow_tf32 = before
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture
def own_temp() -> Iterator[Path]:
    """A temp folder (TMPDIR) for one run alone, so that what the run leaves there is seen; short (not under
    tmp_path), as the run's Unix sockets go in it."""
    temp = Path(tempfile.mkdtemp(prefix="own-"))
    yield temp
    shutil.rmtree(temp, ignore_errors=True)
