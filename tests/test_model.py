import pytest
import torch

from unet_pipeline.errors import ConfigError
from unet_pipeline.model import UNet, UNetConfig, count_conv_layers


def test_paper_geometry_572_to_388():
    cfg = UNetConfig()
    assert cfg.input_size(388) == 572
    assert cfg.output_size(572) == 388
    assert cfg.context_margin == 92


def test_paper_network_has_23_conv_layers():
    assert count_conv_layers(UNet(UNetConfig())) == 23


def test_forward_shape_matches_geometry():
    cfg = UNetConfig(base_channels=4)
    out = UNet(cfg)(torch.zeros(1, 1, cfg.input_size(20), cfg.input_size(20)))
    assert out.shape == (1, 2, 20, 20)


def test_valid_output_sizes_are_4_plus_16k():
    cfg = UNetConfig()
    valid = [n for n in range(1, 200) if cfg.is_valid_output_size(n)]
    assert valid == list(range(4, 200, 16))


def test_invalid_tile_size_names_nearest_valid_sizes():
    with pytest.raises(ConfigError, match="nearest valid sizes: 372 and 388"):
        UNetConfig().input_size(380)


def test_he_initialisation_std():
    model = UNet(UNetConfig(base_channels=64))
    conv = model.down[2][0]  # 3x3 conv on 128 channels
    expected = (2.0 / (128 * 9)) ** 0.5
    assert abs(conv.weight.std().item() - expected) / expected < 0.02


def test_same_padding_keeps_size_inside_halo():
    cfg = UNetConfig(base_channels=4, padding="same", same_halo_px=8, batch_norm=True)
    out = UNet(cfg)(torch.zeros(1, 1, 32 + 16, 32 + 16))
    assert out.shape[-2:] == (32, 32)


def test_bad_model_config_is_rejected():
    with pytest.raises(ConfigError, match="model.padding"):
        UNetConfig(padding="reflect")


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_the_size_formula_is_the_networks_own(depth):
    # geometry's closed form (margin 6 * 2**d - 4, outputs 4 + k * 2**d) against a forward pass
    cfg = UNetConfig(base_channels=1, depth=depth)
    for out in [n for n in range(1, 80) if cfg.is_valid_output_size(n)][:3]:
        size = cfg.input_size(out)
        assert UNet(cfg)(torch.zeros(1, 1, size, size)).shape[-1] == out
    # a size the formula calls invalid does not come out of the network (a pooling floors an odd size)
    bad = cfg.min_output_size + 1
    size = bad + 2 * cfg.context_margin
    assert not cfg.is_valid_output_size(bad) and UNet(cfg)(torch.zeros(1, 1, size, size)).shape[-1] != bad
