import pytest
import torch

from harness.data import synthetic

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def davis_root(tmp_path_factory):
    """A small generated dataset in the DAVIS 2017 layout (2 train + 2 val sequences)."""
    return synthetic.generate(tmp_path_factory.mktemp("data") / "davis", sequences=4, frames=5, size=(160, 96), seed=3)
