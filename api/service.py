"""The server's behaviour behind the routes: federations, clients, uploads, the round lifecycle and
batch jobs. Transport-free (routes translate HTTP to these calls); all state lives in `Store`.

Round lifecycle: a round is *open* until its uploads reach the quorum, or its deadline passes with at
least one upload; it is then *aligning* (the next round opens at once) while the device worker runs
`KnowledgeTransferServer.run_round`, and ends *published* (pairs on disk) or *failed* (error kept).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from functools import lru_cache, partial
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ktl.aligner import Aligner
from ktl.api.errors import ApiError
from ktl.api.jobs import JobPlan, StreamingSafetensors
from ktl.api.metrics import Metrics
from ktl.api.ratelimit import RateLimiter
from ktl.api.schemas import FederationSpec, JobSpec, PrototypesJSON
from ktl.api.settings import ServerSettings
from ktl.api.store import ClientRecord, FederationRecord, JobRecord, RoundRecord, Store, UploadResult
from ktl.api.worker import JOB_PRIORITY, ROUND_PRIORITY, DeviceWorker, Task
from ktl.clients import simplex_etf
from ktl.device import resolve_device
from ktl.errors import ConfigError, PayloadError
from ktl.generator import Generator, load_generator
from ktl.imaging import pairs_grid_png
from ktl.records import Prototypes
from ktl.round import KnowledgeTransferServer
from ktl.seeding import torch_generator

__all__ = ["KtlService", "hash_token"]

logger = logging.getLogger(__name__)

_SAFETENSORS_TYPES = {"application/octet-stream", "application/x-safetensors", "application/vnd.safetensors"}
_UPLOAD_DTYPES = (torch.float16, torch.float32)


def hash_token(token: str) -> str:
    """Tokens are 256-bit random strings, so a plain SHA-256 is a safe way to keep only a fingerprint."""
    return hashlib.sha256(token.encode()).hexdigest()


class KtlService:
    """One server instance. Call `start` before use and `stop` at the end (the app's lifespan does)."""

    def __init__(self, settings: ServerSettings, *, clock: Callable[[], float] = time.time) -> None:
        if settings.admin_token is None or not settings.admin_token.get_secret_value():
            raise ConfigError("no admin token: set KTL_ADMIN_TOKEN (the server refuses to start without one)")
        self.settings = settings
        self.clock = clock
        self.device = resolve_device(settings.device)
        self.store = Store(settings.data_dir)
        self.metrics = Metrics()
        self.limiter = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
        self.worker = DeviceWorker()
        self.generators: dict[str, Generator] = {}
        self._servers: dict[str, tuple[int, KnowledgeTransferServer]] = {}  # fid -> (last round, server)
        self._stop = threading.Event()
        self._scheduler = threading.Thread(target=self._schedule, name="ktl-scheduler", daemon=True)
        self.ready = False

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Load every generator once, recover unfinished work, start the worker and the scheduler."""
        for name, spec in self.settings.generators.items():
            self.generators[name] = load_generator(spec, self.device)
            logger.info("generator %r: %s", name, self.generators[name].description)
        self.worker.start()
        self._recover()
        self._scheduler.start()
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        self._stop.set()
        if self._scheduler.is_alive():
            self._scheduler.join(5)
        self.worker.stop()
        self.store.close()

    def is_admin(self, token: str | None) -> bool:
        expected = self.settings.admin_token.get_secret_value() if self.settings.admin_token else ""
        return token is not None and secrets.compare_digest(token.encode(), expected.encode())

    def _recover(self) -> None:
        """After a restart: close rounds that are due (quorum in, or deadline passed with an upload), align
        every round left aligning, and re-queue jobs that were queued or running (a running job restarts from its first image)."""
        now = self.clock()
        for rnd in self.store.rounds_in_state("open"):
            if self.store.close_if_ready(rnd.federation_id, rnd.round, now):  # aligned by the next loop
                logger.info("recovery: %s round %d was due; closing it", rnd.federation_id, rnd.round)
        for rnd in self.store.rounds_in_state("aligning"):
            logger.info("recovery: aligning %s round %d", rnd.federation_id, rnd.round)
            self._enqueue_round(rnd.federation_id, rnd.round)
        for job in self.store.jobs_in_states("queued", "running"):
            if job.state == "running":
                self.store.update_job(
                    job.id, state="queued", done=0, started_at=None, restarts=job.restarts + 1
                )
                logger.info("recovery: job %s was running; restarting it", job.id)
            self._enqueue_job(job.id)

    def _schedule(self) -> None:
        while not self._stop.wait(self.settings.scheduler_interval_s):
            try:
                self.close_due_rounds()
            except Exception:
                logger.exception("round scheduler failed")

    def close_due_rounds(self) -> int:
        """Close every open round whose deadline passed with at least one upload; returns how many."""
        now = self.clock()
        closed = 0
        for fid, r in self.store.due_rounds(now):
            if self.store.close_if_ready(fid, r, now):
                logger.info("%s round %d closed at its deadline", fid, r)
                self._enqueue_round(fid, r)
                closed += 1
        return closed

    # -- federations and clients ----------------------------------------------------------------------

    def generator(self, name: str) -> Generator:
        """A generator loaded at start-up, or 422 ``unknown_generator``."""
        if name not in self.generators:
            raise ApiError(
                422,
                "unknown_generator",
                f"generator {name!r} is not loaded; loaded: {sorted(self.generators)}",
            )
        return self.generators[name]

    def create_federation(self, spec: FederationSpec) -> FederationRecord:
        self.generator(spec.generator)
        etf_seed = spec.etf_seed if spec.etf_seed is not None else secrets.randbelow(2**31)
        return self.store.create_federation(spec, etf_seed, self.clock())

    def federation(self, fid: str) -> FederationRecord:
        fed = self.store.get_federation(fid)
        if fed is None:
            raise ApiError(404, "unknown_federation", f"no federation {fid!r}")
        return fed

    @staticmethod
    @lru_cache(maxsize=64)
    def etf(num_classes: int, dim: int, seed: int) -> torch.Tensor:
        return simplex_etf(num_classes, dim, seed=seed)

    def add_client(self, fid: str, name: str | None) -> tuple[ClientRecord, str]:
        self.federation(fid)
        token = secrets.token_urlsafe(32)
        return self.store.add_client(fid, name, hash_token(token), self.clock()), token

    def remove_client(self, fid: str, client_id: str) -> ClientRecord:
        client = self.store.get_client(client_id)
        if client is None or client.federation_id != fid:
            raise ApiError(404, "unknown_client", f"no client {client_id!r} in federation {fid!r}")
        self.store.deactivate_client(client_id)
        return client

    def authenticate(self, token: str) -> ClientRecord | None:
        return self.store.client_by_token_hash(hash_token(token))

    def check_rate(self, client: ClientRecord) -> None:
        wait = self.limiter.acquire(client.id)
        if wait > 0:
            raise ApiError(
                429,
                "rate_limited",
                f"client {client.id} is over {self.settings.rate_limit_per_minute:g} requests per minute",
                headers={"Retry-After": str(max(1, round(wait + 0.5)))},
                retry_after_s=round(wait, 3),
            )

    # -- uploads --------------------------------------------------------------------------------------

    def parse_upload(self, body: bytes, content_type: str | None) -> Prototypes:
        media = (content_type or "").split(";")[0].strip().lower()
        if media in _SAFETENSORS_TYPES:
            protos = Prototypes.from_bytes(body)
            if protos.vectors.dtype not in _UPLOAD_DTYPES:
                raise PayloadError(
                    "dtype", f"prototypes must be float16 or float32, got {protos.vectors.dtype}"
                )
            return protos
        if media == "application/json":
            try:
                data = PrototypesJSON.model_validate_json(body)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(x) for x in err["loc"]) or "body"
                raise PayloadError("bad_json", f"bad JSON body at {where}: {err['msg']}") from None
            if not data.prototypes:
                raise PayloadError("empty", "an upload must hold at least one prototype")
            if len({len(row) for row in data.prototypes}) != 1:
                raise PayloadError("shape", "prototypes must be a rectangular (n, K) list of lists")
            return Prototypes(
                vectors=torch.tensor(data.prototypes, dtype=torch.float32),
                class_ids=torch.tensor(data.class_ids, dtype=torch.int64),
                counts=torch.tensor(data.counts, dtype=torch.int64),
            )
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type must be application/octet-stream (safetensors) or application/json, got {media or 'none'!r}",
        )

    def submit_upload(
        self, fed: FederationRecord, r: int, client: ClientRecord, body: bytes, content_type: str | None
    ) -> UploadResult:
        """Validate and durably store one upload; close the round when it completes the quorum."""
        self.metrics.bytes_in.inc(len(body))
        protos = self.parse_upload(body, content_type)  # a PayloadError becomes its 4xx in the app
        protos.validate(num_classes=fed.spec.num_classes, dim=fed.spec.dim)
        canonical = protos.to_bytes(torch.float32)
        digest = hashlib.sha256(canonical).hexdigest()
        result = self.store.record_upload(
            fed, r, client.id, canonical, digest, protos.vectors.shape[0], len(body), self.clock()
        )
        if not result.duplicate:
            self.metrics.uploads.inc()
        if result.closed:
            logger.info("%s round %d reached its quorum (%d uploads)", fed.id, r, result.uploads)
            self._enqueue_round(fed.id, r)
        return result

    # -- rounds ---------------------------------------------------------------------------------------

    def round_record(self, fid: str, r: int) -> RoundRecord:
        rnd = self.store.get_round(fid, r)
        if rnd is None:
            fed = self.federation(fid)
            raise ApiError(
                404,
                "unknown_round",
                f"round {r} does not exist; the current round is {fed.current_round}",
                current_round=fed.current_round,
            )
        return rnd

    def _published_file(self, fid: str, r: int, name: str) -> bytes:
        rnd = self.round_record(fid, r)
        if rnd.state != "published":
            raise ApiError(
                409,
                "round_not_published",
                f"round {r} is {rnd.state}; pairs exist once it is published",
                state=rnd.state,
            )
        return (self.store.round_dir(fid, r) / name).read_bytes()

    def round_file(self, fid: str, r: int, name: str) -> bytes:
        """A published round's file, for sending (counted in ``ktl_bytes_sent``)."""
        data = self._published_file(fid, r, name)
        self.metrics.bytes_out.inc(len(data))
        return data

    def _enqueue_round(self, fid: str, r: int) -> None:
        self.worker.submit(ROUND_PRIORITY, partial(self._align_round, fid, r))

    def _server_for(self, fed: FederationRecord, r: int) -> KnowledgeTransferServer:
        """The federation's server step, warm from the latest aligner snapshot before round ``r``."""
        cached = self._servers.get(fed.id)
        if cached is not None and cached[0] == r - 1:
            return cached[1]
        generator = self.generators[fed.spec.generator]
        earlier = [s for s in self.store.aligner_snapshots(fed.id) if s < r]
        if earlier:
            aligner = Aligner.from_pretrained(
                self.store.aligner_dir(fed.id, max(earlier)), device=self.device
            )
        else:
            aligner = Aligner.create(
                num_classes=fed.spec.num_classes,
                proto_dim=fed.spec.dim,
                latent_dim=generator.latent_dim,
                settings=fed.spec.aligner,
                device=self.device,
                seed=fed.spec.seed,
            )
        return KnowledgeTransferServer(
            num_classes=fed.spec.num_classes,
            proto_dim=fed.spec.dim,
            generator=generator,
            aligner=aligner,
            pairs_per_class=fed.spec.fedktl.pairs_per_class,
            seed=fed.spec.seed,
        )

    def _align_round(self, fid: str, r: int) -> None:
        """Device task: align round ``r``, synthesize its pairs, snapshot the aligner, publish."""
        rnd = self.store.get_round(fid, r)
        fed = self.store.get_federation(fid)
        if rnd is None or fed is None or rnd.state != "aligning":
            return
        started = time.perf_counter()
        try:
            server = self._server_for(fed, r)
            result = server.run_round(self.store.load_uploads(fid, r), round_index=r)
            if not bool(torch.isfinite(result.centroids).all()):
                raise RuntimeError("alignment diverged: the centroids are not finite (lower aligner.lr?)")
            staged = self.store.staging_dir(fid)
            server.save_pretrained(staged)
            self.store.commit_aligner(fid, r, staged, self.settings.keep_aligner_rounds)
            centroids = st_save(
                {
                    "centroids": result.centroids.float().contiguous(),
                    "present": result.present.to(torch.uint8),
                }
            )
            stats = result.stats()
            self.store.publish_round(
                fid,
                r,
                {
                    "pairs.safetensors": result.pairs.to_bytes(),
                    "pairs.png": pairs_grid_png(
                        result.pairs, fed.spec.class_names, fed.spec.fedktl.pairs_per_class
                    ),
                    "centroids.safetensors": centroids,
                },
                stats,
                self.clock(),
            )
            self._servers[fid] = (r, server)
            self.metrics.rounds.labels(outcome="published").inc()
            logger.info(
                "%s round %d published (%d uploads, %.2fs)",
                fid,
                r,
                result.num_uploads,
                time.perf_counter() - started,
            )
        except Exception as exc:
            self._servers.pop(fid, None)  # its aligner may be half-trained
            logger.exception("%s round %d failed", fid, r)
            self.store.fail_round(fid, r, f"{type(exc).__name__}: {exc}", self.clock())
            self.metrics.rounds.labels(outcome="failed").inc()
        finally:
            self.metrics.round_seconds.observe(time.perf_counter() - started)

    # -- batch jobs -----------------------------------------------------------------------------------

    def _job_generator(self, spec: JobSpec) -> Generator:
        if spec.federation_id is not None:
            return self.generators[self.federation(spec.federation_id).spec.generator]
        return self.generator(spec.generator or "default")

    def job_plan(self, spec: JobSpec) -> JobPlan:
        """Resolve a job's sources; raises `ApiError` for anything a client can fix."""
        generator = self._job_generator(spec)
        if spec.latents is not None:
            if not spec.latents:
                raise ApiError(422, "empty", "latents must hold at least one row")
            if len({len(row) for row in spec.latents}) != 1 or len(spec.latents[0]) != generator.latent_dim:
                raise ApiError(422, "dim", f"latents must be (m, {generator.latent_dim}) for this generator")
            sources = torch.tensor(spec.latents, dtype=torch.float32)
            if not bool(torch.isfinite(sources).all()):
                raise ApiError(422, "non_finite", "latents contain NaN or Inf")
            class_ids = torch.full((sources.shape[0],), -1, dtype=torch.int64)
        else:
            fed = self.federation(spec.federation_id or "")
            r = spec.round if spec.round is not None else self.store.latest_published_round(fed.id)
            if r is None:
                raise ApiError(409, "no_published_round", f"federation {fed.id} has no published round yet")
            data = st_load(self._published_file(fed.id, r, "centroids.safetensors"))
            present = data["present"].bool()
            wanted = torch.tensor(
                spec.class_ids if spec.class_ids is not None else present.nonzero().flatten().tolist(),
                dtype=torch.int64,
            )
            missing = [c for c in wanted.tolist() if c >= present.numel() or not present[c]]
            if missing:
                raise ApiError(
                    422, "class_not_present", f"round {r} has no centroid for classes {missing[:10]}"
                )
            sources, class_ids = data["centroids"][wanted], wanted
        plan = JobPlan(
            generator, sources.to(generator.device), class_ids, spec.per_class, spec.spread, spec.seed
        )
        if plan.total > self.settings.max_job_images:
            raise ApiError(
                422,
                "too_many_images",
                f"{plan.total} images exceed the limit of {self.settings.max_job_images}",
            )
        return plan

    def create_job(self, spec: JobSpec) -> JobRecord:
        plan = self.job_plan(spec)
        job = self.store.create_job(spec, plan.total, self.clock())
        self._enqueue_job(job.id)
        return job

    def job(self, job_id: str) -> JobRecord:
        job = self.store.get_job(job_id)
        if job is None:
            raise ApiError(404, "unknown_job", f"no job {job_id!r}")
        return job

    def cancel_job(self, job_id: str) -> JobRecord:
        job = self.job(job_id)
        if not self.store.update_job(
            job_id, only_if=("queued", "running"), state="cancelled", finished_at=self.clock()
        ):
            raise ApiError(409, "job_finished", f"job {job_id} is already {job.state}", state=job.state)
        return self.job(job_id)

    def _enqueue_job(self, job_id: str) -> None:
        self.worker.submit(JOB_PRIORITY, partial(self._job_start, job_id))

    def _job_start(self, job_id: str) -> Task | None:
        job = self.store.get_job(job_id)
        if job is None or job.state != "queued":
            return None
        try:
            plan = self.job_plan(job.spec)
        except ApiError as exc:  # e.g. the federation's round files vanished
            self._job_failed(job_id, exc.message)
            return None
        generator = plan.generator
        shape = (plan.total, generator.num_channels, generator.image_size, generator.image_size)
        writer = StreamingSafetensors(
            self.store.job_result_path(job_id),
            {
                "images": (torch.uint8, shape),
                "latents": (torch.float32, (plan.total, generator.latent_dim)),
                "class_ids": (torch.int64, (plan.total,)),
            },
        )
        self.store.update_job(job_id, only_if=("queued",), state="running", started_at=self.clock(), done=0)
        now = time.perf_counter()
        return partial(self._job_step, job_id, plan, writer, 0, now, now)

    def _job_step(
        self,
        job_id: str,
        plan: JobPlan,
        writer: StreamingSafetensors,
        start: int,
        t0: float,
        last_progress: float,
    ) -> Task | None:
        generator = plan.generator
        job = self.store.get_job(job_id)
        if job is None or job.state != "running":  # cancelled
            writer.abort()
            if job is not None and job.state == "cancelled":
                self.metrics.jobs.labels(outcome="cancelled").inc()
            return None
        end = min(plan.total, start + self.settings.job_batch_size)
        try:
            noise = None
            if plan.spread > 0:
                noise = generator.sample_latents(
                    end - start, torch_generator(plan.seed, "job", start, device=generator.device)
                )
            latents, class_ids = plan.latents(start, end, noise)
            images = generator.synthesize(latents)
            writer.write("images", start, (images.clamp(0, 1) * 255).round().to(torch.uint8))
            writer.write("latents", start, latents.float())
            writer.write("class_ids", start, class_ids)
            self.metrics.images.inc(end - start)
            if end < plan.total:
                now = time.perf_counter()
                if now - last_progress >= self.settings.job_progress_interval_s:
                    self.store.update_job(job_id, only_if=("running",), done=end)
                    last_progress = now
                return partial(self._job_step, job_id, plan, writer, end, t0, last_progress)
            writer.finish()
            self.store.update_job(
                job_id, only_if=("running",), done=end, state="done", finished_at=self.clock()
            )
            self.metrics.jobs.labels(outcome="done").inc()
            self.metrics.job_seconds.observe(time.perf_counter() - t0)
            return None
        except Exception as exc:
            logger.exception("job %s failed", job_id)
            writer.abort()
            self._job_failed(job_id, f"{type(exc).__name__}: {exc}")
            return None

    def _job_failed(self, job_id: str, error: str) -> None:
        self.store.update_job(job_id, state="failed", error=error[:2000], finished_at=self.clock())
        self.metrics.jobs.labels(outcome="failed").inc()

    def job_result_path(self, job_id: str) -> Path:
        job = self.job(job_id)
        if job.state != "done":
            raise ApiError(409, "job_not_done", f"job {job_id} is {job.state}", state=job.state)
        path = self.store.job_result_path(job_id)
        self.metrics.bytes_out.inc(path.stat().st_size)
        return path
