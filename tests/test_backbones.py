from pathlib import Path

import pytest
import torch

from ktl.clients import ClientModel, available_backbones, build_backbone
from ktl.clients.backbones import BACKBONES

REQUIRED = {"cnn4", "resnet-s", "resnet-m", "mobilenetv2", "vit-small", "convnext"}


def test_zoo_has_the_required_families() -> None:
    assert set(available_backbones()) >= REQUIRED


@pytest.mark.parametrize("name", sorted(BACKBONES))
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
