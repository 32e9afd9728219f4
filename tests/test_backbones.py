from pathlib import Path

import pytest
import torch

from ktl.catalog import live
from ktl.clients import ClientModel, available_backbones, build_backbone
from ktl.clients.backbones import BACKBONES, MODEL_GROUPS, expand_models, register_model_group
from ktl.config import build_config

REQUIRED = {"cnn4", "resnet-s", "resnet-m", "mobilenetv2", "vit-small", "convnext"}


def test_zoo_has_the_required_families() -> None:
    assert set(available_backbones()) >= REQUIRED


@pytest.mark.parametrize(
    "name",
    # the GPU-sized ones (ResNet-34 … -152, GoogLeNet, full MobileNetV2) take seconds each to build
    [pytest.param(n, marks=pytest.mark.slow) if BACKBONES[n].large else n for n in sorted(BACKBONES)],
)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_backbone_gives_one_feature_vector_per_image(name: str, channels: int, size: int) -> None:
    backbone = build_backbone(name, num_channels=channels, image_size=size)
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.randn(3, channels, size, size))
    assert out.shape == (3, backbone.feature_dim)
    assert torch.isfinite(out).all()


def test_unknown_backbone_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="available: .*cnn4"):
        build_backbone("resnet-999", num_channels=1, image_size=28)


def test_client_model_saves_hf_style(tmp_path: Path) -> None:
    model = ClientModel.build("resnet-s", num_channels=1, image_size=28, proto_dim=10)
    model.backbone.model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    reloaded = type(model.backbone.model).from_pretrained(tmp_path)
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(pixel_values=x).pooler_output, model.backbone.model(pixel_values=x).pooler_output
        )


def test_a_model_group_stands_for_its_members_in_order() -> None:
    htfe8 = [
        "cnn4",
        "googlenet",
        "mobilenetv2-1.0",
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
    ]
    assert expand_models(["htfe8"]) == htfe8
    assert expand_models(["resnet-s", "htfe2"]) == ["resnet-s", "cnn4", "resnet18"]
    assert build_config(preset="smoke", overrides={"models": ["htfe8"]}).models == htfe8
    with pytest.raises(ValueError, match="groups: .*htfe8"):
        expand_models(["htfe99"])
    with pytest.raises(ValueError, match="twice"):
        register_model_group("htfe8", ["cnn4"], "again")
    # `ktl list` shows each group's members (from the catalog)
    listed = live()["model_groups"]
    assert listed["htfe8"]["members"] == htfe8 and set(listed) == set(MODEL_GROUPS)


@pytest.mark.slow
def test_googlenet_and_the_bottleneck_resnets_count_their_parameters_like_torchvision() -> None:
    """GoogLeNet without auxiliary heads and ResNet-50 have torchvision's parameter counts for 3-channel
    inputs, less the 1000-class fc each (5,599,904 and 23,508,032)."""
    counts = {
        name: sum(p.numel() for p in build_backbone(name, num_channels=3, image_size=32).parameters())
        for name in ("googlenet", "resnet50")
    }
    assert counts == {"googlenet": 5_599_904, "resnet50": 23_508_032}
