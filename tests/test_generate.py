"""``ktl generate``: 1 and 2 processes write the same bytes, resume after a kill, the manifest and the
image folder, the sources (data folder, server, latents), bad input, and --eval."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file, save_file

from ktl import generate as gen
from ktl.api import create_app
from ktl.cli import main
from ktl.clients.sdk import KtlHttpClient
from ktl.errors import KtlError
from ktl.generator import GeneratorSpec
from tests.api.conftest import ADMIN, federation, make_settings, protos, register

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--per-class", "8", "--shard-size", "8", "--batch-size", "4", "--spread", "0.5", "--device", "cpu"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def latents_file(tmp_path: Path) -> Path:
    path = tmp_path / "latents.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"latents": torch.randn(3, 256, generator=g), "class_ids": torch.tensor([0, 1, 2])}, str(path))
    return path


@pytest.fixture
def one_thread() -> Iterator[None]:
    """CPU convolutions' bytes depend on the thread count: compare runs at one thread, as the children of
    ``--processes`` run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ktl(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ktl", "-q", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.relative_to(folder).as_posix().startswith(".shards")
    }


def options(out: Path, **kw: object) -> gen.GenerateOptions:
    values: dict[str, object] = dict(
        out=out, per_class=8, shard_size=8, batch_size=4, spread=0.5, device="cpu", progress=False
    )
    values.update(kw)
    return gen.GenerateOptions(**values)  # type: ignore[arg-type]


def test_one_and_two_processes_write_the_same_bytes(tmp_path: Path, latents_file: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    first = ktl("generate", "--latents", latents_file, "--out", one, *TINY, "--image-folder", "--no-progress")
    assert first.returncode == 0, first.stderr
    second = ktl(
        "generate", "--latents", latents_file, "--out", two, *TINY, "--image-folder", "--processes", "2"
    )
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout.strip().splitlines()[-1]) == {"out": str(two), "images": 24, "shards": 3}
    a, b = files_of(one), files_of(two)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)  # shards, manifest, PNGs: byte for byte

    manifest = json.loads((one / "manifest.json").read_text())
    assert manifest["total"] == 24 and sum(manifest["counts"].values()) == 24
    assert manifest["counts"] == {"class_0": 8, "class_1": 8, "class_2": 8}
    for shard in manifest["shards"]:
        assert sha(one / shard["file"]) == shard["sha256"]
        t = load_file(str(one / shard["file"]))
        assert t["images"].shape == (shard["count"], 3, 32, 32) and t["images"].dtype == torch.uint8
        assert t["latents"].dtype == torch.float32 and t["class_ids"].dtype == torch.int64
    pngs = sorted(p.relative_to(one / "images").as_posix() for p in (one / "images").rglob("*.png"))
    assert pngs == [f"class_{c}/{i:05d}.png" for c in range(3) for i in range(1, 9)]
    shard1 = load_file(str(one / "shard-00001.safetensors"))  # images 8 … 15: class 1, numbers 1 … 8
    png = torch.from_numpy(np.array(Image.open(one / "images/class_1/00003.png")))
    assert torch.equal(png.permute(2, 0, 1), shard1["images"][2])


@pytest.mark.slow  # make test-all (make test keeps generation across processes and the shard checks)
def test_resume_after_kill_keeps_verified_shards_and_redoes_the_rest(
    tmp_path: Path, latents_file: Path, one_thread: None
) -> None:
    out = tmp_path / "out"
    args = ["--per-class", "400", "--shard-size", "50", "--batch-size", "10", "--spread", "0.3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ktl", "-q", "generate", "--latents", str(latents_file), "--out", str(out)]
    proc = subprocess.Popen([*cmd, *args, "--device", "cpu", "--no-progress"], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 60
        while len(list((out / ".shards").glob("shard-*.json"))) < 3:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (out / "manifest.json").unlink(missing_ok=True)
    finished = sorted(int(p.stem.split("-")[1]) for p in (out / ".shards").glob("shard-*.json"))
    with open(out / "shard-00000.safetensors", "r+b") as f:  # damage shard 0
        f.seek(-10, os.SEEK_END)
        f.write(b"0123456789")
    mtimes = {k: (out / gen.shard_name(k)).stat().st_mtime_ns for k in finished if k != 0}

    source = gen.source_from_latents(latents_file)
    o = options(out, per_class=400, shard_size=50, batch_size=10, spread=0.3)
    result = gen.generate_dataset(source, GeneratorSpec(), o)
    assert result.kept == sorted(mtimes) and 0 in result.generated
    assert sorted(result.kept + result.generated) == list(range(24))
    assert {k: (out / gen.shard_name(k)).stat().st_mtime_ns for k in mtimes} == mtimes  # not redone
    clean = gen.generate_dataset(source, GeneratorSpec(), dataclasses.replace(o, out=tmp_path / "clean"))
    assert clean.generated == list(range(24))
    assert files_of(out) == files_of(tmp_path / "clean")


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[tuple[Path, str, str, KtlHttpClient]]:
    """A server data folder with a published FedKTL round (classes 0 … 3 present) and a fedproto
    federation; yields the folder, the FedKTL and fedproto ids and an admin SDK on the live app."""
    settings = make_settings(tmp_path / "data")
    app = create_app(settings)
    with TestClient(app) as http:
        admin = KtlHttpClient("", ADMIN, http=http, retries=0)
        names = [f"n{c}" for c in range(10)]
        fed = federation(admin, quorum=2, class_names=names)
        a, b = register(admin, http, fed["id"], 2)
        a.upload(fed["id"], 1, protos([0, 1, 2]))
        b.upload(fed["id"], 1, protos([2, 3], seed=1))
        app.state.service.worker.wait_idle(60)
        assert admin.round(fed["id"], 1)["state"] == "published"
        other = admin.create_federation({"method": "fedproto", "num_classes": 4})
        yield settings.data_dir, fed["id"], other["id"], admin


def test_published_round_from_the_data_folder_and_from_the_server(
    tmp_path: Path, data_dir: tuple[Path, str, str, KtlHttpClient]
) -> None:
    folder, fid, proto_fid, admin = data_dir
    local = gen.source_from_data_dir(folder, fid)
    remote = gen.source_from_server(admin, fid, url="http://test")
    assert local.info["round"] == remote.info["round"] == 1
    assert local.class_ids.tolist() == remote.class_ids.tolist() == [0, 1, 2, 3]
    assert torch.equal(local.latents, remote.latents)  # the pairs' first latent per class is the centroid
    assert local.class_names == remote.class_names and local.class_name(3) == "n3"

    a = gen.generate_dataset(local, GeneratorSpec(), options(tmp_path / "a", per_class=3, image_folder=True))
    b = gen.generate_dataset(remote, GeneratorSpec(), options(tmp_path / "b", per_class=3))
    assert a.manifest["counts"] == {"n0": 3, "n1": 3, "n2": 3, "n3": 3}
    assert a.manifest["shards"] == b.manifest["shards"]  # the same bytes from either source
    assert sorted(p.parent.name for p in (tmp_path / "a/images").rglob("*.png")) == sorted(
        f"n{c}" for c in range(4) for _ in range(3)
    )
    # b's folder, resumed from the data folder's source: the same spec (sources by their hash), all kept
    again = gen.generate_dataset(local, GeneratorSpec(), options(tmp_path / "b", per_class=3))
    assert again.kept == [0, 1] and again.generated == []

    with pytest.raises(KtlError, match="no federation 'fed-nope'"):
        gen.source_from_data_dir(folder, "fed-nope")
    with pytest.raises(KtlError, match="round 2 of federation .* is open; it must be published"):
        gen.source_from_data_dir(folder, fid, 2)
    with pytest.raises(KtlError, match="which has no generator centroids"):
        gen.source_from_data_dir(folder, proto_fid)
    with pytest.raises(KtlError, match="publishes no generator pairs"):
        gen.source_from_server(admin, proto_fid)


def error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ktl: error: "), err
    return err[0]


def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, latents_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "out")
    base = ["generate", "--out", out, "--latents", str(latents_file), "--device", "cpu", "--no-progress"]
    assert "exactly one source" in error_line(capsys, ["generate", "--out", out])
    assert "needs --federation" in error_line(capsys, ["generate", "--out", out, "--data-dir", str(tmp_path)])
    assert "is not a ktl serve data folder" in error_line(
        capsys, ["generate", "--out", out, "--data-dir", str(tmp_path), "--federation", "f"]
    )
    assert "--per-class must be at least 1" in error_line(capsys, [*base, "--per-class", "-1"])
    assert "--spread must be" in error_line(capsys, [*base, "--spread", "-0.5"])
    assert "exceed --max-images 10" in error_line(capsys, [*base, "--per-class", "4", "--max-images", "10"])
    assert "fp16 needs a CUDA device" in error_line(capsys, [*base, "--precision", "fp16"])
    assert "does not exist" in error_line(capsys, [*base[:4], str(tmp_path / "nope.safetensors")])
    assert "at least 2 are needed" in error_line(capsys, [*base, "--eval", str(tmp_path)])
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "x.txt").write_text("mine")
    assert "holds no ktl generate data set" in error_line(
        capsys, [*base[:2], str(tmp_path / "stranger"), *base[3:]]
    )
    assert main([*base, "--per-class", "2", "--seed", "1"]) == 0
    capsys.readouterr()
    line = error_line(capsys, [*base, "--per-class", "2", "--seed", "2"])
    assert "holds a data set of another spec (seed 1 there, 2 now)" in line
    line = error_line(capsys, [*base, "--per-class", "2", "--seed", "2", "--processes", "2"])
    assert "(seed 1 there, 2 now)" in line  # refused before any process is launched


def test_eval_ranks_the_generated_images_above_noise(tmp_path: Path, latents_file: Path) -> None:
    out = tmp_path / "out"
    gen.generate_dataset(
        gen.source_from_latents(latents_file), GeneratorSpec(), options(out, image_folder=True)
    )
    noise = tmp_path / "noise"
    noise.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(24):
        pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(noise / f"{i}.png")
    spec = json.loads((out / "manifest.json").read_text())["spec"]
    itself = gen.evaluate_dataset(out, spec, out / "images", 100)
    other = gen.evaluate_dataset(out, spec, noise, 100)
    assert all(
        torch.isfinite(torch.tensor([s["fid"], s["kid"], s["kid_std"]])).all() for s in (itself, other)
    )
    assert itself["fid"] < other["fid"] and itself["kid"] < other["kid"]
    assert itself["reference_images"] == itself["generated_images"] == 24

    result = gen.generate_dataset(
        gen.source_from_latents(latents_file), GeneratorSpec(), options(out, eval_reference=noise)
    )
    assert result.kept == [0, 1, 2] and result.manifest["eval"]["fid"] == pytest.approx(other["fid"])
    assert json.loads((out / "manifest.json").read_text())["eval"]["reference_images"] == 24
