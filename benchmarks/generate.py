"""``ktl bench generate``: what ``ktl generate`` delivers, side by side in one run on one machine.

Two measurements:

* **Processes.** The same data set (``--classes`` × ``--per-class`` images of the embedded generator,
  written as shards) by ``ktl generate`` in 1 process and in P processes (``--processes P``, each
  pinned to ``cores / P`` threads), as a user runs it: the wall time of the whole command (start-up
  included), and images/s. On a CPU box the processes share the cores; on a GPU box each takes a GPU.
* **Precision × batch size, job vs bare forward.** For the embedded generator and a diffusers UNet at
  64×64 (random weights: the speed of a forward does not depend on them; DDIM with
  ``--unet-steps`` steps), images/s of the bare forward (``generator.synthesize`` on pre-drawn
  latents, the images left on the device) and of ``ktl generate``'s shard loop in the same process
  (noise, latents, forward, uint8 to the CPU, the shard's SHA-256 and its atomic write), per precision
  and batch size; the ratio job / bare says what the data set writer costs. On the CPU the grid is
  fp32 and bf16; with CUDA also fp16.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ktl.benchmarks.common import machine, report
from ktl.device import resolve_device, synchronize
from ktl.errors import KtlError

__all__ = ["add_arguments", "main", "run"]

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", type=int, default=10, help="classes (latents) of the data set")
    parser.add_argument("--per-class", type=int, default=1000, help="images per class (process scaling)")
    parser.add_argument(
        "--processes", type=int, default=2, help="P of the 1 vs P processes comparison (0: not measured)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument(
        "--batch-sizes", default=None, help="comma-separated (default: 16,64 on the CPU; 64,256,1024 on CUDA)"
    )
    parser.add_argument(
        "--precisions", default=None, help="comma-separated (default: fp32,bf16 on the CPU; +fp16 on CUDA)"
    )
    parser.add_argument(
        "--images",
        type=int,
        default=None,
        help="images per grid cell (default: 512 on the CPU, 8192 on CUDA)",
    )
    parser.add_argument("--unet-steps", type=int, default=5, help="DDIM steps of the UNet generator")
    parser.add_argument("--no-unet", action="store_true", help="leave the diffusers UNet out")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timings per cell")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time the embedded generator's bare forward under torch.compile (its compile time too)",
    )
    parser.add_argument(
        "--compile-cells",
        default=None,
        help="with --compile, only these cells, PRECISIONxBATCH comma-separated, e.g. bf16x1024 (default: "
        "every embedded cell; each costs a cold compile)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--write", type=Path, default=None, help="also write the table into this markdown file"
    )


# -- 1 vs P processes ----------------------------------------------------------------------------------------


def _run_generate(
    latents: Path, out: Path, processes: int, per_class: int, shard: int, device: str, threads: int
) -> float:
    """Wall seconds of one ``ktl generate`` command (a fresh process tree)."""
    cmd = [sys.executable, "-m", "ktl", "-q", "generate", "--latents", str(latents), "--out", str(out),
           "--per-class", str(per_class), "--spread", "0.5", "--shard-size", str(shard), "--batch-size", "64",
           "--device", device, "--no-progress", "--processes", str(processes)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"ktl generate --processes {processes} failed: {done.stderr[-2000:]}")
    return wall


def _processes(args: argparse.Namespace, device: torch.device, work: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    from ktl.generator import GeneratorSpec, load_generator

    if args.processes < 1:
        return {"skipped": "--processes 0"}
    if device.type == "cuda" and torch.cuda.device_count() < args.processes:
        return {
            "skipped": f"{args.processes} processes need {args.processes} GPUs; {torch.cuda.device_count()} here"
        }
    dim = load_generator(GeneratorSpec(), "cpu").latent_dim
    latents = work / "latents.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"latents": torch.randn(args.classes, dim, generator=g)}, str(latents))
    cores = os.cpu_count() or 1
    total = args.classes * args.per_class
    shard = max(16, total // (4 * args.processes))  # several shards per process: the split is even
    rows = []
    for p in (1, args.processes):
        threads = max(1, cores // p)  # the processes share the cores
        walls = [
            _run_generate(latents, work / f"p{p}-{i}", p, args.per_class, shard, device.type, threads)
            for i in range(args.repeats)
        ]
        # the same command for one image per class: its start-up (imports, the launch, loading the
        # generator, the process group), subtracted to give the generation's own rate
        starts = [
            _run_generate(latents, work / f"p{p}-start-{i}", p, 1, shard, device.type, threads)
            for i in range(args.repeats)
        ]
        wall, start = min(walls), min(starts)
        rows.append(
            {
                "processes": p,
                "threads_each": threads,
                "wall_s": wall,
                "startup_s": start,
                "images_per_s": total / wall,
                "images_per_s_after_startup": total / max(wall - start, 1e-9),
            }
        )
        logger.info("ktl generate, %d process(es) × %d thread(s): %.1f s, start-up %.1f s (best of %s, %s)", p,
                    threads, wall, start, [round(w, 1) for w in walls], [round(w, 1) for w in starts])  # fmt: skip
    return {
        "images": total,
        "shard_size": shard,
        "rows": rows,
        "ratio_after_startup": rows[1]["images_per_s_after_startup"] / rows[0]["images_per_s_after_startup"],
        "ratio": rows[1]["images_per_s"] / rows[0]["images_per_s"],
    }


# -- precision × batch size: bare forward vs the shard loop --------------------------------------------------


def _unet_folder(path: Path) -> Path:
    """A diffusers UNet2DModel at 64×64 (random weights) with a DDIM scheduler, saved as a ``ddim`` folder."""
    from diffusers.models.unets.unet_2d import UNet2DModel
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64, 64, 128),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )
    unet.save_pretrained(path / "unet")
    DDIMScheduler(num_train_timesteps=1000).save_pretrained(path / "scheduler")
    return path


def _bare(generator: Any, n: int, batch: int, precision: str, repeats: int) -> float:
    """Best images/s of ``generator.synthesize`` on pre-drawn latents (the images stay on the device)."""
    from ktl.generate import _autocast

    device = generator.device
    z = torch.randn(n, generator.latent_dim, generator=torch.Generator().manual_seed(1)).to(device)
    generator.batch_size = batch
    with _autocast(device, precision):
        generator.synthesize(z[:batch])  # warm-up
    best = 0.0
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        for chunk in z.split(batch):
            with _autocast(device, precision):
                generator.synthesize(chunk)
        synchronize(device)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def _job(spec: Any, n: int, batch: int, precision: str, repeats: int, device: str, work: Path) -> float:
    """Best images/s of ``ktl generate``'s shard loop (one shard of ``n`` images) in this process."""
    from ktl.generate import GenerateOptions, generate_dataset, source_from_latents
    from ktl.generator import load_generator

    dim = load_generator(spec, "cpu").latent_dim
    file = work / f"latents-{dim}.safetensors"
    if not file.exists():
        from safetensors.torch import save_file

        save_file({"latents": torch.randn(4, dim, generator=torch.Generator().manual_seed(2))}, str(file))
    source = source_from_latents(file)
    best = 0.0
    for i in range(repeats + 1):  # the first run warms up (cudnn's choices, allocator)
        options = GenerateOptions(out=work / f"job-{time.monotonic_ns()}", per_class=-(-n // 4), spread=0.5,
                                  shard_size=n, batch_size=batch, precision=precision,  # type: ignore[arg-type]
                                  device=device, progress=False)  # fmt: skip
        result = generate_dataset(source, spec, options)
        if i:
            best = max(best, result.manifest["total"] / result.shard_seconds)
    return best


def _grid_axes(args: argparse.Namespace, device: torch.device) -> tuple[list[int], list[str], int]:
    """Batch sizes, precisions and images per cell of the grid (the defaults depend on the device)."""
    cuda = device.type == "cuda"
    sizes = [int(b) for b in (args.batch_sizes or ("64,256,1024" if cuda else "16,64")).split(",")]
    precisions = (args.precisions or ("fp32,fp16,bf16" if cuda else "fp32,bf16")).split(",")
    return sizes, precisions, args.images or (8192 if cuda else 512)


def _compile_cells(args: argparse.Namespace, device: torch.device) -> set[str] | None:
    """``--compile-cells`` checked against the embedded generator's grid before anything runs."""
    if args.compile_cells is None:
        return None
    sizes, precisions, n = _grid_axes(args, device)
    grid = {f"{p}x{min(b, n)}" for p in precisions for b in sizes}
    cells = {c.strip() for c in args.compile_cells.split(",") if c.strip()}
    if not cells or not cells <= grid:
        raise KtlError(
            f"--compile-cells {args.compile_cells}: cells of the grid are {', '.join(sorted(grid))}"
        )
    return cells


def _grid(args: argparse.Namespace, device: torch.device, work: Path) -> list[dict[str, Any]]:
    from ktl.generator import GeneratorSpec, load_generator

    cuda = device.type == "cuda"
    sizes, precisions, n = _grid_axes(args, device)
    generators = [("embedded AutoencoderKL decoder (32×32)", GeneratorSpec(), n)]
    if not args.no_unet:
        folder = _unet_folder(work / "unet64")
        unet = GeneratorSpec(kind="ddim", path=folder, num_inference_steps=args.unet_steps)
        generators.append(
            (f"diffusers UNet2DModel 64×64, DDIM {args.unet_steps} steps", unet, n if cuda else 32)
        )
    rows = []
    for name, spec, count in generators:
        generator = load_generator(spec, device)
        for precision in precisions:
            for batch in sizes:
                b = min(batch, count)
                bare = _bare(generator, count, b, precision, args.repeats)
                job = _job(spec, count, b, precision, args.repeats, str(device), work)
                rows.append({"generator": name, "precision": precision, "batch_size": b, "images": count,
                             "bare_images_per_s": bare, "job_images_per_s": job, "job_vs_bare": job / bare})  # fmt: skip
                logger.info("%s %s batch %d: bare %.0f, job %.0f images/s (%.0f%%)", name, precision, b, bare, job,
                            100 * job / bare)  # fmt: skip
    return rows


def _compiled(
    args: argparse.Namespace, device: torch.device, grid: list[dict[str, Any]], wanted: set[str] | None
) -> list[dict[str, Any]]:
    """The embedded generator's bare forward compiled (``ktl generate --compile``) vs eager, per cell of the
    grid (or the ``wanted`` ones); the first call's time (compilation) apart."""
    from ktl.generate import GenerateOptions, load_for_generation
    from ktl.generator import GeneratorSpec

    cells = [c for c in grid if c["generator"].startswith("embedded")]
    if wanted is not None:
        cells = [c for c in cells if f"{c['precision']}x{c['batch_size']}" in wanted]
    rows = []
    for cell in cells:
        options = GenerateOptions(out=Path("unused"), compile=True)
        generator = load_for_generation(GeneratorSpec(), device, options)
        t0 = time.perf_counter()
        _bare(generator, cell["batch_size"], cell["batch_size"], cell["precision"], 1)  # compiles
        compile_s = time.perf_counter() - t0
        rate = _bare(generator, cell["images"], cell["batch_size"], cell["precision"], args.repeats)
        rows.append({"precision": cell["precision"], "batch_size": cell["batch_size"], "compile_s": compile_s,
                     "compiled_images_per_s": rate, "eager_images_per_s": cell["bare_images_per_s"],
                     "compiled_vs_eager": rate / cell["bare_images_per_s"]})  # fmt: skip
        logger.info("compiled %s batch %d: %.0f vs eager %.0f images/s (compiling %.1f s)", cell["precision"],
                    cell["batch_size"], rate, cell["bare_images_per_s"], compile_s)  # fmt: skip
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    wanted = _compile_cells(args, device)
    with tempfile.TemporaryDirectory(prefix="ktl-bench-generate-") as tmp:
        work = Path(tmp)
        processes = _processes(args, device, work)
        grid = _grid(args, device, work)
        compiled = _compiled(args, device, grid, wanted) if args.compile else []
    return {
        "device": str(device),
        "processes": processes,
        "grid": grid,
        "compiled": compiled,
        "machine": machine(),
    }


def to_markdown(res: dict[str, Any]) -> str:
    p = res["processes"]
    lines = [
        f"## Batch generation (`ktl bench generate`) — {res['device'].split(':')[0]}",
        "",
        f"{res['machine']}; device {res['device']}.",
        "",
    ]
    if "skipped" in p:
        lines += [f"**1 vs P processes**: not measured ({p['skipped']}).", ""]
    else:
        lines += [
            f"**1 vs {p['rows'][1]['processes']} processes**: `ktl generate` of {p['images']} images of the "
            f"embedded generator (shards of {p['shard_size']}, batch 64), the whole command timed (start-up "
            "included), best of runs.",
            "",
            "| processes | threads each | whole command (s) | its start-up (s) | images/s, whole | images/s after start-up |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['processes']} | {r['threads_each']} | {r['wall_s']:.1f} | {r['startup_s']:.1f} | "
            f"{r['images_per_s']:.0f} | {r['images_per_s_after_startup']:.0f} |"
            for r in p["rows"]
        ]
        lines += [
            "",
            f"{p['rows'][1]['processes']} processes / 1 process: **{p['ratio']:.2f}×** images/s for the whole "
            f"command, **{p['ratio_after_startup']:.2f}×** after start-up (start-up: the same command for one "
            "image per class).",
            "",
        ]
    lines += [
        "**Job vs bare forward**, per precision and batch size: images/s of `generator.synthesize` alone and of "
        "`ktl generate`'s shard loop (noise, forward, uint8 to the CPU, SHA-256, atomic write) in one process.",
        "",
        "| generator | precision | batch | bare (images/s) | job (images/s) | job / bare |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['generator']} | {r['precision']} | {r['batch_size']} | {r['bare_images_per_s']:.0f} | "
        f"{r['job_images_per_s']:.0f} | {r['job_vs_bare']:.0%} |"
        for r in res["grid"]
    ]
    if res.get("compiled"):
        lines += [
            "",
            "**torch.compile** of the embedded generator's decoder (`ktl generate --compile`), bare forward, "
            "compiled vs eager (the first call, which compiles, timed apart):",
            "",
            "| precision | batch | compiling (s) | compiled (images/s) | eager (images/s) | compiled / eager |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['precision']} | {r['batch_size']} | {r['compile_s']:.1f} | {r['compiled_images_per_s']:.0f} | "
            f"{r['eager_images_per_s']:.0f} | {r['compiled_vs_eager']:.2f}× |"
            for r in res["compiled"]
        ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    res = run(args)
    # one section per device type, as `ktl bench server` writes: a GPU run never replaces the CPU figures
    section = f"generate-{res['device'].split(':')[0]}"
    return report(res, to_markdown(res), as_json=args.json, write=args.write, section=section)
