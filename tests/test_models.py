import numpy as np
import pytest
import torch

from harness import models
from harness.errors import CheckpointError, ConfigError


def _box_mask(model, size=(96, 160)):
    predictor = models.image_predictor(model)
    image = np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)
    predictor.set_image(image)
    masks, _, _ = predictor.predict(box=np.array([20, 10, 90, 70]), multimask_output=False)
    return masks


def test_small_model_builds_with_sam2_classes():
    from sam2.modeling.sam2_base import SAM2Base

    model = models.build("sam2_small", device="cpu")
    assert isinstance(model, SAM2Base) and not model.training
    assert model.image_size == 128
    assert 2e6 < sum(p.numel() for p in model.parameters()) < 4e6
    assert _box_mask(model).shape == (1, 96, 160)


@pytest.mark.parametrize("name,size", [("sam2_small", 256), ("sam2.1_hiera_t", 256)])
def test_image_size_override(name, size):
    model = models.build(name, image_size=size, device="cpu")
    assert model.image_size == size
    attn = model.memory_attention.layers[0].self_attn
    assert attn.freqs_cis.shape[0] == (size // 16) ** 2
    # sam2's image predictor hard-codes 1024 px feature sizes; models.image_predictor fixes them.
    assert _box_mask(model).shape == (1, 96, 160)


def test_every_shipped_config_is_known():
    for name in ("sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l", "sam2_hiera_t", "sam2_small"):
        assert models.config_path(name).is_file()
    with pytest.raises(ConfigError, match="unknown model 'sam3'"):
        models.build("sam3")
    with pytest.raises(ConfigError, match="not a multiple of 32"):
        models.build("sam2_small", image_size=100)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    a = models.build("sam2_small", device="cpu")
    models.save_checkpoint(a, tmp_path / "small.pt")
    torch.manual_seed(1)
    b = models.build("sam2_small", checkpoint=tmp_path / "small.pt", device="cpu")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert np.array_equal(_box_mask(a), _box_mask(b))


def test_checkpoint_errors(tmp_path):
    model = models.build("sam2_small", device="cpu")
    sd = model.state_dict()
    with pytest.raises(CheckpointError, match="nope.pt does not exist"):
        models.build("sam2_small", checkpoint=tmp_path / "nope.pt")

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt is not a readable torch file"):
        models.build("sam2_small", checkpoint=tmp_path / "junk.pt")

    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        models.build("sam2_small", checkpoint=tmp_path / "list.pt")

    dropped = dict(sd)
    dropped.pop("obj_ptr_proj.layers.0.weight")
    dropped["extra.weight"] = torch.zeros(1)
    torch.save({"model": dropped}, tmp_path / "keys.pt")
    with pytest.raises(CheckpointError) as e:
        models.build("sam2_small", checkpoint=tmp_path / "keys.pt")
    msg = str(e.value)
    assert "keys.pt" in msg and "sam2_small.yaml" in msg and "\n" not in msg
    assert "1 missing keys: obj_ptr_proj.layers.0.weight" in msg
    assert "1 unexpected keys: extra.weight" in msg

    # A checkpoint of the small model does not fit sam2.1_hiera_t: shapes and keys differ.
    models.save_checkpoint(model, tmp_path / "small.pt")
    with pytest.raises(
        CheckpointError, match=r"small\.pt does not match config .*sam2\.1_hiera_t\.yaml.*shape mismatches"
    ):
        models.build("sam2.1_hiera_t", checkpoint=tmp_path / "small.pt")
