import os

import pytest
import torch

from harness.data import synthetic

# Under pytest-xdist (`nox -s tests` runs one worker per core) each worker and the processes it
# starts take one thread: two threads per worker on two cores would spin against each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def davis_root(tmp_path_factory):
    """A small generated dataset in the DAVIS 2017 layout (2 train + 2 val sequences)."""
    return synthetic.generate(tmp_path_factory.mktemp("data") / "davis", sequences=4, frames=5, size=(160, 96), seed=3)


def export_and_reload(model, method, decisions, weight_bits, act_bits, path):
    """Export a quantized embedded-default model as a packed file and load it back with its method."""
    import methods
    from harness.quant.export import export, load

    meta = {
        "model": {"name": "sam2_small", "checkpoint": None, "image_size": 128},
        "quant": {"weight_bits": weight_bits, "act_bits": act_bits},
        "method": {"name": method.name, **method.params},
    }
    export(model, path, meta, decisions)
    return load(path, methods.from_config(meta["method"]))
