"""`ktl pretrain-generator`: the emoji image set, augmentation, and a tiny run that loads as a generator."""

import json
from pathlib import Path

import torch

from ktl.cli import main
from ktl.generator import GeneratorSpec, load_generator
from ktl.pretrain import augment, kid_report, render_emoji


def test_emoji_are_many_distinct_centred_images_on_black() -> None:
    images, codepoints = render_emoji(image_size=32)
    assert images.shape[1:] == (3, 32, 32) and len(images) == len(codepoints) > 1000
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    assert len(set(codepoints)) == len(codepoints)
    corners = images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert float(corners.mean()) < 0.1  # black background
    flat = images.flatten(1)
    assert torch.unique(flat, dim=0).shape[0] > 0.95 * len(images)  # not one glyph repeated


def test_augment_is_seeded_and_keeps_range() -> None:
    images, _ = render_emoji(image_size=16)
    x = images[:32]
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    c = augment(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == x.shape
    assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_kid_ranks_real_images_above_noise() -> None:
    images, _ = render_emoji(image_size=32)
    held, train = images[::10], images[1::10]
    noise = torch.rand_like(train)
    report = kid_report(held, {"real": train, "noise": noise}, subsets=20)
    assert report["real"]["kid"] < 0.2 * report["noise"]["kid"]


def test_tiny_pretrain_writes_a_loadable_generator(tmp_path: Path, capsys) -> None:
    out = tmp_path / "gen"
    assert main(["-q", "pretrain-generator", "--out", str(out), "--steps", "3", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["kid"]) >= {"training emoji (floor)", "this generator, prior samples"}
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    meta = json.loads((out / "training.json").read_text())
    assert "Open Font License" in meta["data"]["licence"] and meta["settings"]["steps"] == 3
    g = load_generator(GeneratorSpec(path=out))
    assert g.pretrained and g.latent_dim == 256
    assert g.synthesize(g.sample_latents(2, torch.Generator().manual_seed(0))).shape == (2, 3, 32, 32)


def test_missing_font_is_one_clear_line(tmp_path: Path, capsys) -> None:
    code = main(["pretrain-generator", "--out", str(tmp_path / "x"), "--font", str(tmp_path / "nope.ttf")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "fonts-noto-color-emoji" in err
    assert not (tmp_path / "x").exists()
