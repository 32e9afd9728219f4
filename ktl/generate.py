"""``ktl generate``: a training data set generated from a published FedKTL round, sharded, resumable.

The sources are latents ``(s, W)`` with a class id each: the class centroids of a published round (read from
a server's data folder, or from a running server's pairs), or latents given in a file. Image ``i`` comes
from source ``i // per_class`` plus ``spread · ε`` (`ktl.api.jobs.JobPlan`'s semantics, as the server's
batch jobs), where ε is drawn for each shard from an RNG seeded by ``(seed, shard index)`` on the CPU (for
a generator whose prior is N(0, I)). Shards hold a fixed number of images and are generated in batches of
a fixed size, so which process generates a shard changes nothing: one process and several write the same
bytes.

Layout of ``OUT``::

    shard-00000.safetensors …   images uint8 (n, C, H, W), latents float32 (n, W), class_ids int64 (n,)
    manifest.json               the spec, counts per class, per shard its range, count and SHA-256 (last)
    images/<class>/00001.png    with --image-folder (torchvision ImageFolder, HF imagefolder)
    .shards/spec.json           the spec this folder holds (a different one is refused)
    .shards/shard-00000.json    a finished shard's record: range and SHA-256 (written after the shard)

A run that stops (a kill, a crash) is resumed by running it again: shards whose SHA-256 matches their
record are kept, the others are generated again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from ktl.api.store import atomic_write, sha256_file
from ktl.device import resolve_device
from ktl.errors import KtlError
from ktl.generator.base import DEFAULT_SPREAD

if TYPE_CHECKING:
    from ktl.clients.sdk import KtlHttpClient
    from ktl.generator import Generator, GeneratorSpec

__all__ = [
    "DEFAULT_SPREAD",
    "FORMAT",
    "GenerateOptions",
    "GenerateResult",
    "Source",
    "evaluate_images",
    "generate_dataset",
    "read_shard",
    "resolve_generator_spec",
    "source_from_data_dir",
    "source_from_latents",
    "source_from_server",
]

logger = logging.getLogger(__name__)

FORMAT = "ktl-generate/1"
RECORDS = ".shards"
MANIFEST = "manifest.json"
IMAGES = "images"
Precision = Literal["fp32", "fp16", "bf16"]
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
CPU_AUTO_BATCH = 16


# -- sources ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Latents to generate around, on the CPU.

    Attributes
    ----------
    latents
        ``(s, W)`` float32: the class centroids, or the given latents.
    class_ids
        ``(s,)`` int64, the class of each source.
    class_names
        Names by class id (the federation's ``class_names``), or None: ``class_<id>``.
    generator
        The name of the generator the federation uses (resolved by `resolve_generator_spec`).
    info
        Where the sources come from, for the manifest (no secrets).
    """

    latents: torch.Tensor
    class_ids: torch.Tensor
    class_names: list[str] | None
    generator: str
    info: dict[str, Any]

    def __post_init__(self) -> None:
        if self.latents.dim() != 2 or self.latents.shape[0] == 0:
            raise KtlError(f"the sources must be (m, W) with m ≥ 1, got {tuple(self.latents.shape)}")
        if self.class_ids.shape != (self.latents.shape[0],):
            raise KtlError(
                f"class_ids {tuple(self.class_ids.shape)} do not match {self.latents.shape[0]} latents"
            )
        if not bool(torch.isfinite(self.latents).all()):
            raise KtlError("the source latents contain NaN or Inf")
        if bool((self.class_ids < 0).any()):
            raise KtlError("class ids must be ≥ 0")

    def sha256(self) -> str:
        digest = hashlib.sha256()
        digest.update(self.latents.contiguous().numpy().tobytes())
        digest.update(self.class_ids.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def class_name(self, class_id: int) -> str:
        if self.class_names is not None and 0 <= class_id < len(self.class_names):
            return self.class_names[class_id]
        return f"class_{class_id}"


def source_from_data_dir(data_dir: Path, federation: str, round_index: int | None = None) -> Source:
    """The class centroids of a published round in a ``ktl serve`` data folder (read only; each file is
    checked against the checksum the server recorded, as the server's own batch jobs read it)."""
    from safetensors.torch import load as st_load

    from ktl.api.store import DB_NAME, Store

    root = Path(data_dir)
    if not (root / DB_NAME).is_file():
        raise KtlError(f"{root} is not a ktl serve data folder (it has no {DB_NAME})")
    store = Store(root, maintenance=True)  # leaves the folder as it is: no migration, no clean-up
    try:
        fed = store.get_federation(federation)
        if fed is None:
            raise KtlError(f"no federation {federation!r} in {root}")
        if not fed.spec.method_class.uses_generator:
            raise KtlError(
                f"federation {federation} runs {fed.spec.method!r}, which has no generator centroids "
                "(ktl generate needs a FedKTL federation)"
            )
        r = round_index if round_index is not None else store.latest_published_round(fed.id)
        if r is None:
            raise KtlError(f"federation {federation} has no published round yet")
        rnd = store.get_round(fed.id, r)
        if rnd is None or rnd.state != "published":
            state = "does not exist" if rnd is None else f"is {rnd.state}"
            raise KtlError(f"round {r} of federation {federation} {state}; it must be published")
        path = store.round_dir(fed.id, r) / "centroids.safetensors"
        data = st_load(store.read_verified(path))  # corrupt_file (one line) if it changed on disk
    finally:
        store.close()
    present = data["present"].bool()
    ids = present.nonzero().flatten()
    if ids.numel() == 0:
        raise KtlError(f"round {r} of federation {federation} has no class centroid")
    return Source(
        latents=data["centroids"][ids].float().contiguous(),
        class_ids=ids.to(torch.int64),
        class_names=fed.spec.class_names,
        generator=fed.spec.generator,
        info={"kind": "data-dir", "data_dir": str(root), "federation": fed.id, "round": r},
    )


def source_from_server(
    sdk: KtlHttpClient, federation: str, round_index: int | None = None, *, url: str = ""
) -> Source:
    """The class centroids of a published round of a running server, from the round's pairs.

    The server has no route for ``centroids.safetensors``; its FedKTL pairs hold, for each present class
    in class order, the class centroid first and then ``pairs_per_class - 1`` aligned single uploads of
    that class (which are *not* centroids). The first pair of each class is therefore taken: its latent is
    the centroid exactly (both are the same float32 values).
    """
    fed = sdk.federation(federation)
    spec = fed.get("spec") or {}
    if fed.get("generator") is None or fed.get("broadcast_file") != "pairs.safetensors":
        raise KtlError(
            f"federation {federation} runs {fed.get('method')!r}, which publishes no generator pairs "
            "(ktl generate needs a FedKTL federation)"
        )
    r = round_index
    if r is None:
        r = _latest_published_round(sdk, federation, int(fed["current_round"]))
    pairs = sdk.pairs(federation, r)
    classes = pairs.class_ids.tolist()
    first = [i for i, c in enumerate(classes) if i == 0 or classes[i - 1] != c]
    ids = pairs.class_ids[first]
    if len(set(ids.tolist())) != len(first):
        raise KtlError(f"round {r}'s pairs are not grouped by class; cannot tell the centroids apart")
    return Source(
        latents=pairs.latents[first].float().contiguous(),
        class_ids=ids.to(torch.int64),
        class_names=spec.get("class_names"),
        generator=str(fed["generator"]["name"]),
        info={"kind": "server", "url": url, "federation": federation, "round": r},
    )


def _latest_published_round(sdk: KtlHttpClient, federation: str, current: int) -> int:
    for r in range(current, 0, -1):
        if sdk.round(federation, r)["state"] == "published":
            return r
    raise KtlError(f"federation {federation} has no published round yet")


def source_from_latents(path: Path) -> Source:
    """Latents from a safetensors file: ``latents`` (m, W) and optional ``class_ids`` (m,) (default:
    0 … m−1, one class per latent)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise KtlError(f"{path} does not exist")
    try:
        data = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise KtlError(f"{path} is not a safetensors file: {' '.join(str(exc).split())}") from None
    if "latents" not in data:
        raise KtlError(f"{path} holds no 'latents' tensor (it has {sorted(data)})")
    latents = data["latents"].float()
    if latents.dim() != 2 or latents.shape[0] == 0:
        raise KtlError(f"{path}: latents must be (m, W) with m ≥ 1, got {tuple(latents.shape)}")
    ids = data.get("class_ids")
    class_ids = torch.arange(latents.shape[0]) if ids is None else ids.to(torch.int64).flatten()
    return Source(
        latents=latents.contiguous(),
        class_ids=class_ids.contiguous(),
        class_names=None,
        generator="default",
        info={"kind": "latents", "file": str(path)},
    )


def resolve_generator_spec(name: str, server_config: Path | None = None) -> GeneratorSpec:
    """The spec of the generator called ``name`` as ``ktl serve`` resolves it: its settings (``--config``
    TOML, ``KTL_GENERATORS``); without either, ``default`` is the embedded default."""
    from ktl.api.settings import load_settings

    generators = load_settings(server_config).generators
    if name not in generators:
        raise KtlError(
            f"generator {name!r} is not among the server settings' generators ({', '.join(sorted(generators))});"
            " pass the server's settings with --server-config"
        )
    return generators[name]


# -- options and the spec ---------------------------------------------------------------------------------


@dataclass
class GenerateOptions:
    """How much to generate and how; ``batch_size`` None = probe (``--batch-size auto``)."""

    out: Path
    per_class: int = 100
    spread: float = DEFAULT_SPREAD
    seed: int = 0
    shard_size: int = 1024
    batch_size: int | None = 64
    precision: Precision = "fp32"
    channels_last: bool = False
    compile: bool = False
    image_folder: bool = False
    eval_reference: Path | None = None
    eval_max_images: int = 10_000
    max_images: int = 1_000_000
    device: str = "auto"
    progress: bool = True

    def check(self, num_sources: int) -> None:
        """Refuse values that cannot work (before anything is allocated)."""
        if self.per_class < 1:
            raise KtlError(f"--per-class must be at least 1, got {self.per_class}")
        if not math.isfinite(self.spread) or self.spread < 0:
            raise KtlError(f"--spread must be a finite number ≥ 0, got {self.spread}")
        if not 0 <= self.seed < 2**62:
            raise KtlError(f"--seed must be in [0, 2**62), got {self.seed}")
        if self.shard_size < 1:
            raise KtlError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.batch_size is not None and self.batch_size < 1:
            raise KtlError(f"--batch-size must be at least 1 (or auto), got {self.batch_size}")
        if self.eval_max_images < 2:
            raise KtlError(f"--eval-max-images must be at least 2, got {self.eval_max_images}")
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise KtlError(f"--precision must be fp32, fp16 or bf16, got {self.precision!r}")
        total = num_sources * self.per_class
        if total > self.max_images:
            raise KtlError(
                f"{num_sources} classes × {self.per_class} images = {total} images exceed --max-images "
                f"{self.max_images}"
            )
        if self.eval_reference is not None:
            reference_files(self.eval_reference)  # refused now, not after the generation


def device_type(device: str) -> str:
    """``cpu`` or ``cuda`` for ``--device auto|cpu|cuda`` (`ktl.device.resolve_device`'s choice)."""
    if device not in ("auto", "cpu", "cuda"):
        raise KtlError(f"--device must be auto, cpu or cuda, got {device!r}")
    return resolve_device(device).type


def check_processes(processes: int, device: str) -> None:
    """One GPU per process: ``--processes`` beyond the visible GPUs is refused (each process takes
    ``cuda:<local rank>``); on the CPU any number shares the cores."""
    if processes < 1:
        raise KtlError(f"--processes must be at least 1, got {processes}")
    if device_type(device) == "cuda" and processes > torch.cuda.device_count():
        raise KtlError(
            f"--processes {processes} on CUDA needs {processes} GPUs; {torch.cuda.device_count()} visible "
            "(one process per GPU)"
        )


def check_precision(precision: str, device: str) -> None:
    if precision == "fp16" and device_type(device) == "cpu":
        raise KtlError("--precision fp16 needs a CUDA device; on the CPU use fp32 or bf16")


def dataset_spec(source: Source, generator: Generator, gen_spec: GeneratorSpec, o: GenerateOptions) -> dict:
    """Everything that decides the data set's bytes, plus where the sources came from (``source``)."""
    spec = options_spec(source, o)
    spec["generator"] = {
        "name": source.generator,
        "description": generator.description,
        "spec": gen_spec.model_dump(mode="json"),
        "latent_dim": generator.latent_dim,
        "image_size": generator.image_size,
        "num_channels": generator.num_channels,
    }
    order = ["format", "source", "sources_sha256", "num_sources", "class_names", "generator"]
    return {k: spec[k] for k in order} | {k: v for k, v in spec.items() if k not in order}


def options_spec(source: Source, o: GenerateOptions) -> dict:
    """The spec without the generator's part (known before it is loaded); ``batch_size`` left out while
    it is ``auto``."""
    total = int(source.latents.shape[0]) * o.per_class
    ids = sorted(set(source.class_ids.tolist()))
    spec = {
        "format": FORMAT,
        "source": source.info,
        "sources_sha256": source.sha256(),
        "num_sources": int(source.latents.shape[0]),
        "class_names": {str(c): source.class_name(c) for c in ids},
        "per_class": o.per_class,
        "spread": o.spread,
        "seed": o.seed,
        "shard_size": o.shard_size,
        "batch_size": o.batch_size,
        "precision": o.precision,
        # speed flags, yet part of the bytes: compiled kernels (and, on some devices, channels-last
        # algorithms) may round differently (torch.compile on the CPU: up to 1 grey level, measured)
        "channels_last": o.channels_last,
        "compile": o.compile,
        "total": total,
        "num_shards": max(1, math.ceil(total / o.shard_size)),
    }
    if o.batch_size is None:
        del spec["batch_size"]
    return spec


def _compared(spec: dict) -> dict:
    """The part of a spec two runs must share to write into one folder (the sources by their hash)."""
    return {k: v for k, v in spec.items() if k != "source"}


def spec_sha256(spec: dict) -> str:
    return hashlib.sha256(json.dumps(_compared(spec), sort_keys=True).encode()).hexdigest()


def existing_spec(out: Path) -> dict | None:
    """The spec ``out`` already holds; None for a missing or empty folder; refused when ``out`` holds
    something else."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KtlError(f"--out {out} exists and is not a folder")
    for path in (out / RECORDS / "spec.json", out / MANIFEST):
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                return dict(data["spec"] if path.name == MANIFEST else data)
            except (ValueError, KeyError, TypeError):
                raise KtlError(f"{path} is damaged; delete {out} or choose another --out") from None
    if out.is_dir() and any(out.iterdir()):
        raise KtlError(f"--out {out} is not empty and holds no ktl generate data set; choose another folder")
    return None


def check_against(out: Path, spec: dict, previous: dict | None, *, partial: bool = False) -> None:
    """One line when ``out`` holds a data set of another spec (``partial``: compare only the keys that
    ``spec`` has, e.g. an `options_spec`)."""
    if previous is None:
        return
    old, new = _compared(previous), _compared(spec)
    if partial:
        old = {k: v for k, v in old.items() if k in new}
    if old != new:
        diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        shown = ", ".join(f"{k} {_short(old.get(k))} there, {_short(new.get(k))} now" for k in diff[:3]) + (
            ", …" if len(diff) > 3 else ""
        )
        raise KtlError(
            f"--out {out} holds a data set of another spec ({shown}); delete it or choose another folder"
        )


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "…"


# -- the generator ------------------------------------------------------------------------------------------


def load_for_generation(gen_spec: GeneratorSpec, device: torch.device, o: GenerateOptions) -> Generator:
    """The generator on ``device`` with the speed flags applied (none of them changes fp32 results)."""
    from ktl.generator import load_generator

    generator = load_generator(gen_spec, device)
    modules = getattr(generator, "modules", None)
    if o.channels_last and callable(modules):
        for module in modules():
            module.to(memory_format=torch.channels_last)
    if o.compile:
        vae = getattr(generator, "vae", None)
        if vae is not None and hasattr(vae, "decoder"):
            vae.decoder = torch.compile(vae.decoder)
        else:
            logger.warning("--compile: the %s generator has no decoder to compile; ignored", gen_spec.kind)
    return generator


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def synthesize_uint8(generator: Generator, latents: torch.Tensor, batch: int, precision: str) -> torch.Tensor:
    """Images of ``latents`` as uint8 on the CPU, ``batch`` latents per generator forward pass."""
    if hasattr(generator, "batch_size"):
        generator.batch_size = batch  # the adapter's own split must not re-batch differently
    out = []
    for chunk in latents.split(batch):
        with _autocast(generator.device, precision):
            images = generator.synthesize(chunk.to(generator.device))
        out.append((images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu())
    return torch.cat(out)


def probe_batch_size(generator: Generator, precision: str, limit: int = 4096) -> int:
    """``--batch-size auto``: on CUDA, double the batch until out of memory or until images/s improves by
    less than 5 %; on the CPU, a small default."""
    if generator.device.type != "cuda":
        return CPU_AUTO_BATCH
    best, best_rate, batch = 8, 0.0, 8
    while batch <= limit:
        latents = torch.randn(batch, generator.latent_dim, device=generator.device)
        try:
            synthesize_uint8(generator, latents, batch, precision)  # warm-up (and cudnn choice)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            synthesize_uint8(generator, latents, batch, precision)
            torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            del latents
            torch.cuda.empty_cache()
        rate = batch / (time.perf_counter() - t0)
        if rate < best_rate * 1.05:
            break
        best, best_rate, batch = batch, rate, batch * 2
    logger.info("--batch-size auto: %d (%.0f images/s)", best, best_rate)
    return best


# -- shards --------------------------------------------------------------------------------------------------


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def shard_range(spec: dict, k: int) -> tuple[int, int]:
    start = k * spec["shard_size"]
    return start, min(spec["total"], start + spec["shard_size"])


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=False, ensure_ascii=False) + "\n").encode()


def shard_is_done(out: Path, spec: dict, spec_hash: str, k: int) -> bool:
    """Shard ``k`` is in place, recorded for this spec, and its bytes still have the recorded SHA-256."""
    record_path, path = out / RECORDS / f"shard-{k:05d}.json", out / shard_name(k)
    if not (record_path.is_file() and path.is_file()):
        return False
    try:
        record = json.loads(record_path.read_text())
    except ValueError:
        return False
    start, end = shard_range(spec, k)
    if record.get("spec_sha256") != spec_hash or [record.get("start"), record.get("end")] != [start, end]:
        return False
    return bool(record.get("sha256") == sha256_file(path)[0])


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    """A shard's tensors: ``images`` uint8 (n, C, H, W), ``latents`` float32 (n, W), ``class_ids`` (n,)."""
    from safetensors.torch import load_file

    return load_file(str(path))


class _ImageNames:
    """``images/<class folder>/<number>.png`` of image ``i`` (numbers from 1 within each class); one folder
    per class id (`class_folders`)."""

    def __init__(self, source: Source, per_class: int) -> None:
        self.per_class = per_class
        folders = class_folders(source)
        self.names = [folders[c] for c in source.class_ids.tolist()]
        seen: dict[int, int] = {}
        self.offsets = []  # images of the same class before each source
        for c in source.class_ids.tolist():
            self.offsets.append(seen.get(c, 0) * per_class)
            seen[c] = seen.get(c, 0) + 1
        self.width = max(5, len(str(max(seen.values()) * per_class)))

    def __call__(self, i: int) -> Path:
        s, j = divmod(i, self.per_class)
        return Path(IMAGES) / self.names[s] / f"{self.offsets[s] + j + 1:0{self.width}d}.png"


# A folder name's bytes, below NAME_MAX (255 on most file systems) with room for a suffix: a class name of
# 100 CJK characters (300 bytes in UTF-8) failed with ENAMETOOLONG.
MAX_FOLDER_BYTES = 100


def _safe_dir(name: str) -> str:
    cleaned = "".join(ch if ch.isalnum() or ch in "-_ ." else "_" for ch in name).strip(" .")
    cleaned = cleaned.encode()[:MAX_FOLDER_BYTES].decode("utf-8", "ignore").rstrip(" .")  # whole characters
    return cleaned or "_"


def class_folders(source: Source) -> dict[int, str]:
    """The folder of each class id: its name made safe and at most `MAX_FOLDER_BYTES` bytes, and distinct
    from every other class's — case-insensitively, as on macOS or Windows — with ``~<id>`` added where two
    would collide (``a/b`` and ``a_b``, or two classes of one name, were silently merged into one folder
    and overwrote each other's images)."""
    folders: dict[int, str] = {}
    taken: set[str] = set()
    for c in sorted(set(source.class_ids.tolist())):
        name = _safe_dir(source.class_name(c))
        k = 0
        while name.casefold() in taken:
            k += 1
            suffix = f"~{c}" if k == 1 else f"~{c}-{k}"
            name = (
                _safe_dir(source.class_name(c))
                .encode()[: MAX_FOLDER_BYTES - len(suffix)]
                .decode("utf-8", "ignore")
                + suffix
            )
        taken.add(name.casefold())
        folders[c] = name
    return folders


def _png_ok(path: Path) -> bool:
    """Whether ``path`` is a whole, readable PNG (a run stopped mid-write, or a damaged disk, can leave a
    truncated one; resuming rewrites it)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()  # checks the chunks and their CRCs up to IEND without decoding
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def _write_pngs(
    out: Path, names: _ImageNames, start: int, images: torch.Tensor, *, only_missing: bool
) -> int:
    from PIL import Image

    written = 0
    for offset, image in enumerate(images):
        path = out / names(start + offset)
        if only_missing and path.is_file() and _png_ok(path):
            continue
        array = image.permute(1, 2, 0).numpy()
        picture = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        picture.save(tmp, format="PNG")
        os.replace(tmp, path)
        written += 1
    return written


# -- the run -------------------------------------------------------------------------------------------------


@dataclass
class GenerateResult:
    """What a run wrote (the manifest) and did (on every process together)."""

    out: Path
    manifest: dict[str, Any]
    kept: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    seconds: float = 0.0  # the whole call: loading the generator, the shards, the manifest
    is_main: bool = True
    shard_seconds: float = 0.0  # this process's shard loop alone (generate + write), for throughput


def _state(device: str) -> Any:
    from accelerate import PartialState

    return PartialState(cpu=device_type(device) == "cpu")


def _remove_temporaries(out: Path) -> None:
    for pattern in (".*.tmp", f"{RECORDS}/.*.tmp", f"{IMAGES}/*/.*.tmp"):
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)


def generate_dataset(source: Source, gen_spec: GeneratorSpec, options: GenerateOptions) -> GenerateResult:
    """Generate (or finish) the data set in ``options.out``; on every process of an accelerate /
    torch.distributed launch (shards are split between them), or alone."""
    from accelerate.utils import broadcast_object_list, gather_object
    from safetensors.torch import save as st_save
    from tqdm.auto import tqdm

    from ktl.api.jobs import JobPlan, prior_noise

    o = options
    out = Path(o.out)
    o.check(int(source.latents.shape[0]))
    check_precision(o.precision, o.device)
    t0 = time.perf_counter()
    state = _state(o.device)
    previous = existing_spec(out)
    generator = load_for_generation(gen_spec, state.device, o)
    if source.latents.shape[1] != generator.latent_dim:
        raise KtlError(
            f"the sources are (m, {source.latents.shape[1]}) but the generator's latents are "
            f"{generator.latent_dim}-dimensional ({generator.description})"
        )
    if o.batch_size is None:  # auto: the folder's own choice, else the main process's probe
        chosen: list[Any] = [previous["batch_size"] if previous else None]
        if chosen[0] is None and state.is_main_process:
            chosen = [probe_batch_size(generator, o.precision)]
        if state.num_processes > 1:
            broadcast_object_list(chosen)
        o.batch_size = int(chosen[0])
    spec = dataset_spec(source, generator, gen_spec, o)
    check_against(out, spec, previous)
    spec_hash = spec_sha256(spec)
    state.wait_for_everyone()  # everyone has read the folder's spec before it is written
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _remove_temporaries(out)
        if previous is None:
            atomic_write(out / RECORDS / "spec.json", _json_bytes(spec))
    state.wait_for_everyone()

    # sources, noise and latents on the CPU (the latents' bytes do not depend on the device); the
    # generator moves each batch to its device
    plan = JobPlan(generator, source.latents, source.class_ids, o.per_class, o.spread, o.seed)
    names = _ImageNames(source, o.per_class) if o.image_folder else None
    t_shards = time.perf_counter()
    with state.split_between_processes(list(range(spec["num_shards"]))) as mine:
        todo = [k for k in mine if not shard_is_done(out, spec, spec_hash, k)]
        kept = [k for k in mine if k not in todo]
        if kept:
            logger.info("kept %d verified shard(s); generating %d", len(kept), len(todo))
        assigned = sum(shard_range(spec, k)[1] - shard_range(spec, k)[0] for k in mine)
        bar = tqdm(
            total=assigned,
            initial=assigned - sum(shard_range(spec, k)[1] - shard_range(spec, k)[0] for k in todo),
            unit="img",
            desc="generate" if state.num_processes == 1 else f"generate (process 0 of {state.num_processes})",
            disable=not (o.progress and state.is_main_process),
            dynamic_ncols=True,
        )
        with bar:
            if names is not None:
                for k in kept:  # a kept shard's PNGs may be missing (a kill between the two)
                    start, end = shard_range(spec, k)
                    if not all((out / names(i)).is_file() for i in range(start, end)):
                        stored = read_shard(out / shard_name(k))["images"]
                        _write_pngs(out, names, start, stored, only_missing=True)
            for k in todo:
                start, end = shard_range(spec, k)
                noise = prior_noise(generator, end - start, o.seed, "generate", k) if o.spread > 0 else None
                images, latents, classes = [], [], []
                for b in range(start, end, o.batch_size):
                    e = min(end, b + o.batch_size)
                    chunk = None if noise is None else noise[b - start : e - start]
                    z, c = plan.latents(b, e, chunk)
                    images.append(synthesize_uint8(generator, z, e - b, o.precision))
                    latents.append(z.float().cpu())
                    classes.append(c.to(torch.int64))
                    bar.update(e - b)
                tensors = {
                    "images": torch.cat(images).contiguous(),
                    "latents": torch.cat(latents).contiguous(),
                    "class_ids": torch.cat(classes).contiguous(),
                }
                data = st_save(tensors)  # no metadata: safetensors writes it in a random order
                digest = atomic_write(out / shard_name(k), data)
                record = {
                    "shard": k,
                    "start": start,
                    "end": end,
                    "count": end - start,
                    "sha256": digest,
                    "spec_sha256": spec_hash,
                }
                atomic_write(out / RECORDS / f"shard-{k:05d}.json", _json_bytes(record))
                if names is not None:
                    _write_pngs(out, names, start, tensors["images"], only_missing=False)
    shard_seconds = time.perf_counter() - t_shards
    done = [(kept, todo)]
    if state.num_processes > 1:
        done = gather_object(done)
    all_kept = sorted(k for pair in done for k in pair[0])
    all_generated = sorted(k for pair in done for k in pair[1])
    state.wait_for_everyone()
    manifest: dict[str, Any] = {}
    if state.is_main_process:
        manifest = _finish(out, spec, spec_hash, source, o, generator)
    state.wait_for_everyone()
    result = GenerateResult(
        out,
        manifest,
        all_kept,
        all_generated,
        time.perf_counter() - t0,
        state.is_main_process,
        shard_seconds,
    )
    if state.is_main_process:
        logger.info(
            "%d images in %d shard(s) in %s (%d generated, %d kept) in %.1f s",
            spec["total"],
            spec["num_shards"],
            out,
            len(all_generated),
            len(all_kept),
            result.seconds,
        )
    return result


def _finish(
    out: Path, spec: dict, spec_hash: str, source: Source, o: GenerateOptions, generator: Generator
) -> dict[str, Any]:
    """On the main process once every shard is written: check each shard's hash against its record,
    evaluate (``--eval``), then write the manifest (last)."""
    shards = []
    for k in range(spec["num_shards"]):
        start, end = shard_range(spec, k)
        record = json.loads((out / RECORDS / f"shard-{k:05d}.json").read_text())
        digest = sha256_file(out / shard_name(k))[0]
        if record["sha256"] != digest or record["spec_sha256"] != spec_hash:
            raise KtlError(f"{out / shard_name(k)} changed while the data set was written; run again")
        shards.append(
            {"file": shard_name(k), "start": start, "end": end, "count": end - start, "sha256": digest}
        )
    counts: dict[str, int] = {}  # by class folder: one key per class, as on disk with --image-folder
    folders = class_folders(source)
    for c in source.class_ids.tolist():
        counts[folders[c]] = counts.get(folders[c], 0) + o.per_class
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "spec": spec,
        "spec_sha256": spec_hash,
        "total": spec["total"],
        "counts": counts,
        "shards": shards,
        "image_folder": IMAGES if o.image_folder else None,
    }
    if o.eval_reference is not None:
        manifest["eval"] = evaluate_dataset(out, spec, o.eval_reference, o.eval_max_images)
        logger.info(
            "eval against %s: FID %.4f, KID %.5f ± %.5f (random-conv features, not Inception)",
            o.eval_reference,
            manifest["eval"]["fid"],
            manifest["eval"]["kid"],
            manifest["eval"]["kid_std"],
        )
    atomic_write(out / MANIFEST, _json_bytes(manifest))
    return manifest


# -- evaluation ----------------------------------------------------------------------------------------------


def reference_files(folder: Path) -> list[Path]:
    """The PNG/JPG files under ``folder`` (any depth), sorted; refused when fewer than two."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KtlError(f"--eval {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise KtlError(f"--eval {folder} holds {len(files)} PNG/JPG image(s); at least 2 are needed")
    return files


def _evenly(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when k ≥ n)."""
    return list(range(n)) if k >= n else [int(i * n / k) for i in range(k)]


def load_reference(folder: Path, size: int, max_images: int) -> torch.Tensor:
    """Reference images as uint8 (n, 3, size, size), resized (bilinear) where they differ."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    files = reference_files(folder)
    images = []
    for i in _evenly(len(files), max_images):
        try:
            with Image.open(files[i]) as picture:
                rgb = picture.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise KtlError(f"--eval: cannot read {files[i]}: {exc}") from None
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        images.append(torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1))
    return torch.stack(images)


def _generated_images(out: Path, spec: dict, max_images: int) -> torch.Tensor:
    wanted = _evenly(spec["total"], max_images)
    picked: list[torch.Tensor] = []
    by_shard: dict[int, list[int]] = {}
    for i in wanted:
        by_shard.setdefault(i // spec["shard_size"], []).append(i % spec["shard_size"])
    for k, rows in sorted(by_shard.items()):
        picked.append(read_shard(out / shard_name(k))["images"][rows])
    return torch.cat(picked)


def evaluate_images(generated: torch.Tensor, reference: torch.Tensor, *, seed: int = 0) -> dict[str, float]:
    """FID and KID (mean, std over subsets) of uint8 images against uint8 reference images, in the feature
    space of `ktl.pretrain.RandomConvFeatures` (no Inception weights offline): comparable between data
    sets scored here, not to published numbers."""
    import warnings

    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    from ktl.pretrain import RandomConvFeatures

    def rgb01(x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    features = RandomConvFeatures(seed)
    features.num_features = 448  # type: ignore[assignment]  # 64 + 128 + 256 pooled channels
    size = max(2, min(len(generated), len(reference)) // 2)
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore", UserWarning)  # torchmetrics: metrics that keep their features
        torch.manual_seed(seed)  # KID's subset draws
        fid = FrechetInceptionDistance(feature=features)
        kid = KernelInceptionDistance(feature=features, subsets=50, subset_size=size)
        for images, real in ((reference, True), (generated, False)):
            for chunk in images.split(256):
                batch = rgb01(chunk)
                fid.update(batch, real=real)
                kid.update(batch, real=real)
        fid_value = float(fid.compute())
        kid_mean, kid_std = kid.compute()
    return {"fid": fid_value, "kid": float(kid_mean), "kid_std": float(kid_std)}


def evaluate_dataset(out: Path, spec: dict, reference: Path, max_images: int) -> dict[str, Any]:
    generated = _generated_images(out, spec, max_images)
    ref = load_reference(reference, spec["generator"]["image_size"], max_images)
    scores = evaluate_images(generated, ref)
    return {
        **scores,
        "reference": str(reference),
        "reference_images": len(ref),
        "generated_images": len(generated),
        "features": "ktl.pretrain.RandomConvFeatures(seed 0): not Inception; compare only within ktl",
    }


# -- launching several processes ---------------------------------------------------------------------------


def in_distributed_launch() -> bool:
    """Whether this process is one of a torch.distributed / accelerate launch."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def launch(processes: int, argv: Sequence[str], device: str) -> int:
    """Run ``ktl <argv>`` in ``processes`` processes through ``torch.distributed.run`` (one machine, a free
    port; works offline, on the CPU with gloo); returns the launch's exit status."""
    import socket
    import subprocess
    import sys

    env = dict(os.environ)
    if device_type(device) == "cpu" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = "1"  # P processes on the same cores: one thread each
    env["KTL_GENERATE_CHILD"] = "1"
    with socket.socket() as s:  # --standalone's rendezvous picks a port too; a fixed free one is quieter
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(processes),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        "-m",
        "ktl",
        *argv,
    ]
    logger.debug("launching %s", " ".join(cmd))
    return subprocess.call(cmd, env=env)


@contextlib.contextmanager
def quiet_unless_main() -> Iterator[None]:
    """Only the main process logs at INFO."""
    root = logging.getLogger("ktl")
    level = root.level
    if process_rank() != 0:
        root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)
