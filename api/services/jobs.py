"""Batch generation jobs: plans, queueing on the device worker behind rounds, progress, results."""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load as st_load

from ktl.api.jobs import JobPlan, StreamingSafetensors
from ktl.api.schemas import JobSpec
from ktl.api.services.base import ServerParts, Service
from ktl.api.services.federations import FederationService
from ktl.api.services.rounds import RoundService
from ktl.api.store import JobRecord
from ktl.api.worker import JOB_PRIORITY, Task
from ktl.errors import ConflictError, InvalidRequestError, KtlError, NotFoundError
from ktl.generator import Generator
from ktl.seeding import torch_generator

__all__ = ["JobService"]

logger = logging.getLogger(__name__)


class JobService(Service):
    """What the routes under ``/v1/jobs`` do, and the jobs' device tasks (one generator batch each)."""

    def __init__(self, parts: ServerParts, federations: FederationService, rounds: RoundService) -> None:
        super().__init__(parts)
        self.federations = federations
        self.rounds = rounds

    def _generator(self, spec: JobSpec) -> Generator:
        if spec.federation_id is not None:
            fed = self.federations.get(spec.federation_id)
            generator = self.federations.generator_of(fed)
            if generator is None:
                raise InvalidRequestError(
                    "no_generator",
                    f"federation {fed.id} runs {fed.spec.method!r}, which has no generator centroids",
                )
            return generator
        return self.federations.generator(spec.generator or "default")

    def plan(self, spec: JobSpec) -> JobPlan:
        """Resolve a job's sources; raises the project's errors for anything a caller can fix."""
        generator = self._generator(spec)
        if spec.latents is not None:
            if not spec.latents:
                raise InvalidRequestError("empty", "latents must hold at least one row")
            if len({len(row) for row in spec.latents}) != 1 or len(spec.latents[0]) != generator.latent_dim:
                raise InvalidRequestError(
                    "dim", f"latents must be (m, {generator.latent_dim}) for this generator"
                )
            sources = torch.tensor(spec.latents, dtype=torch.float32)
            if not bool(torch.isfinite(sources).all()):
                raise InvalidRequestError("non_finite", "latents contain NaN or Inf")
            class_ids = torch.full((sources.shape[0],), -1, dtype=torch.int64)
        else:
            fed = self.federations.get(spec.federation_id or "")
            r = spec.round if spec.round is not None else self.store.latest_published_round(fed.id)
            if r is None:
                raise ConflictError("no_published_round", f"federation {fed.id} has no published round yet")
            data = st_load(self.rounds.published_file(fed, r, "centroids.safetensors"))
            present = data["present"].bool()
            wanted = torch.tensor(
                spec.class_ids if spec.class_ids is not None else present.nonzero().flatten().tolist(),
                dtype=torch.int64,
            )
            missing = [c for c in wanted.tolist() if c >= present.numel() or not present[c]]
            if missing:
                raise InvalidRequestError(
                    "class_not_present", f"round {r} has no centroid for classes {missing[:10]}"
                )
            sources, class_ids = data["centroids"][wanted], wanted
        plan = JobPlan(
            generator, sources.to(generator.device), class_ids, spec.per_class, spec.spread, spec.seed
        )
        if plan.total > self.settings.max_job_images:
            raise InvalidRequestError(
                "too_many_images", f"{plan.total} images exceed the limit of {self.settings.max_job_images}"
            )
        return plan

    def create(self, spec: JobSpec) -> JobRecord:
        plan = self.plan(spec)
        job = self.store.create_job(spec, plan.total, self.clock())
        self.enqueue(job.id)
        return job

    def get(self, job_id: str) -> JobRecord:
        job = self.store.get_job(job_id)
        if job is None:
            raise NotFoundError("unknown_job", f"no job {job_id!r}")
        return job

    def cancel(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        if not self.store.update_job(
            job_id, only_if=("queued", "running"), state="cancelled", finished_at=self.clock()
        ):
            raise ConflictError("job_finished", f"job {job_id} is already {job.state}", state=job.state)
        return self.get(job_id)

    def result_path(self, job_id: str) -> Path:
        job = self.get(job_id)
        if job.state != "done":
            raise ConflictError("job_not_done", f"job {job_id} is {job.state}", state=job.state)
        path = self.store.job_result_path(job_id)
        record = self.store.verify_file(path)  # corrupt_file (never the damaged bytes) if it changed on disk
        self.metrics.bytes_out.inc(record.size)
        return path

    def recover(self) -> None:
        """After a restart: re-queue jobs that were queued or running (a running job restarts from its
        first image)."""
        for job in self.store.jobs_in_states("queued", "running"):
            if job.state == "running":
                self.store.update_job(
                    job.id, state="queued", done=0, started_at=None, restarts=job.restarts + 1
                )
                logger.info("recovery: job %s was running; restarting it", job.id)
            self.enqueue(job.id)

    # -- device tasks -------------------------------------------------------------------------------------

    def enqueue(self, job_id: str) -> None:
        self.parts.worker.submit(JOB_PRIORITY, partial(self._start, job_id))

    def _start(self, job_id: str) -> Task | None:
        job = self.store.get_job(job_id)
        if job is None or job.state != "queued":
            return None
        try:
            plan = self.plan(job.spec)
        except KtlError as exc:  # e.g. the federation's round files vanished
            self._failed(job_id, str(exc))
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
            on_commit=self.store.record_file,  # its checksum, recorded as it is renamed into place
        )
        self.store.update_job(job_id, only_if=("queued",), state="running", started_at=self.clock(), done=0)
        now = time.perf_counter()
        return partial(self._step, job_id, plan, writer, 0, now, now)

    def _step(
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
                return partial(self._step, job_id, plan, writer, end, t0, last_progress)
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
            self._failed(job_id, f"{type(exc).__name__}: {exc}")
            return None

    def _failed(self, job_id: str, error: str) -> None:
        self.store.update_job(job_id, state="failed", error=error[:2000], finished_at=self.clock())
        self.metrics.jobs.labels(outcome="failed").inc()
