import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs every run (docs/testing.md, "Inputs and outputs"); the seed is printed on
    failure to reproduce."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed {seed}")  # shown with a failing test's captured output
    yield seed
