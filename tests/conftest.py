"""Fixtures shared by test modules."""
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest


@pytest.fixture
def own_temp() -> Iterator[Path]:
    """A temp folder (TMPDIR) for one run alone, so that what the run leaves there is seen; short (not under
    tmp_path), as the run's Unix sockets go in it."""
    temp = Path(tempfile.mkdtemp(prefix="own-"))
    yield temp
    shutil.rmtree(temp, ignore_errors=True)
