"""Batch generation jobs: plans, batches spread over every device behind rounds, progress, results.

A running job is split into batches of ``job_batch_size`` images (fixed by the settings, not by the
number of devices). Each batch is a shared device task any worker may take: a job keeps up to one batch
per device in flight ("lanes"; each lane takes the job's next batch and re-queues itself behind the other
jobs' batches), the batches are written at their own rows of the result file in whatever order they end,
and the batch that ends last finishes the file. Noise is drawn on the CPU from the job's seed and the
batch's first index, so the result's bytes do not depend on the device count nor on which device ran what.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load as st_load

from ktl.api.jobs import JobPlan, StreamingSafetensors, WriterClosedError, prior_noise
from ktl.api.schemas import JobSpec
from ktl.api.services.base import ServerParts, Service
from ktl.api.services.federations import FederationService
from ktl.api.services.rounds import RoundService
from ktl.api.store import STORAGE_PREFIX, JobRecord, is_no_space
from ktl.api.worker import JOB_PRIORITY, AnyTask, DeviceWorker
from ktl.errors import ConflictError, InsufficientStorageError, InvalidRequestError, KtlError, NotFoundError
from ktl.generator import Generator

__all__ = ["JobService"]

logger = logging.getLogger(__name__)

FINISHED = ("done", "failed", "cancelled")


@dataclass
class _JobRun:
    """One running job in this process: its plan, its result writer and what its batches have done.
    Everything below ``lock`` changes under it."""

    job_id: str
    plan: JobPlan
    writer: StreamingSafetensors
    batch_size: int
    t0: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_start: int = 0  # first image of the next batch no lane took yet
    batches_done: int = 0
    done: int = 0  # images written
    last_progress: float = 0.0
    closed: bool = False  # finished, failed or cancelled: the lanes stop

    @property
    def batches(self) -> int:
        return -(-self.plan.total // self.batch_size)

    def claim(self) -> tuple[int, int] | None:
        """The next batch ``(start, end)`` for a lane, or None when every batch is taken or the run closed."""
        with self.lock:
            if self.closed or self.next_start >= self.plan.total:
                return None
            start = self.next_start
            self.next_start = min(self.plan.total, start + self.batch_size)
            return start, self.next_start

    def close(self) -> bool:
        """Mark the run closed; True for the one caller that closed it."""
        with self.lock:
            if self.closed:
                return False
            self.closed = True
            return True


class JobService(Service):
    """What the routes under ``/v1/jobs`` do, and the jobs' device tasks (one generator batch each)."""

    def __init__(self, parts: ServerParts, federations: FederationService, rounds: RoundService) -> None:
        super().__init__(parts)
        self.federations = federations
        self.rounds = rounds
        # Jobs with a task queued or running in this process (a count: a job may be enqueued twice), and
        # when `reconcile` first saw each job that has none.
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._stranded: dict[str, float] = {}
        self._lock = threading.Lock()
        self.batches_by_device: collections.Counter[int] = collections.Counter()  # worker index -> batches
        self._expired_at = float("-inf")  # when `expire` last looked

    def _generator(self, spec: JobSpec) -> tuple[str, Generator]:
        """The job's generator: its name and the first device's copy."""
        if spec.federation_id is not None:
            fed = self.federations.get(spec.federation_id)
            generator = self.federations.generator_of(fed)
            if generator is None:
                raise InvalidRequestError(
                    "no_generator",
                    f"federation {fed.id} runs {fed.spec.method!r}, which has no generator centroids",
                )
            return fed.spec.generator, generator
        name = spec.generator or "default"
        return name, self.federations.generator(name)

    def generator_on(self, name: str, worker: DeviceWorker) -> Generator:
        """Generator ``name``'s copy on ``worker``'s device."""
        return self.parts.device_generators[worker.index][name]

    def plan(self, spec: JobSpec) -> JobPlan:
        """Resolve a job's sources (on the CPU); raises the project's errors for anything a caller can fix."""
        name, generator = self._generator(spec)
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
            generator, sources.cpu(), class_ids, spec.per_class, spec.spread, spec.seed, generator_name=name
        )
        if plan.total > self.settings.max_job_images:
            raise InvalidRequestError(
                "too_many_images", f"{plan.total} images exceed the limit of {self.settings.max_job_images}"
            )
        return plan

    @staticmethod
    def result_bytes(plan: JobPlan) -> int:
        """The size of a job's result file (images as uint8, latents as float32, class ids), headers aside."""
        g = plan.generator
        return plan.total * (g.num_channels * g.image_size**2 + 4 * g.latent_dim + 8)

    def _room_for(self, plan: JobPlan) -> tuple[bool, str]:
        """Whether the result fits on the disk and leaves ``min_free_bytes`` free, and the numbers."""
        need, free = self.result_bytes(plan), self.store.disk_free_bytes()
        keep = self.settings.min_free_bytes
        return (
            free - need >= keep,
            f"its result needs {need} bytes; {free} are free and {keep} are kept free (min_free_bytes)",
        )

    def create(self, spec: JobSpec) -> JobRecord:
        """Queue a job (507 ``insufficient_storage`` when its result would leave less than
        ``min_free_bytes`` free: a 10k-image job filled the disk and uploads got 507)."""
        plan = self.plan(spec)
        fits, numbers = self._room_for(plan)
        if not fits:
            raise InsufficientStorageError("insufficient_storage", f"no room for this job: {numbers}")
        job = self.store.create_job(spec, plan.total, self.clock())
        self.enqueue(job.id)
        return job

    def get(self, job_id: str) -> JobRecord:
        job = self.store.get_job(job_id)
        if job is None:
            raise NotFoundError("unknown_job", f"no job {job_id!r}")
        return job

    def page(self, limit: int, before: str | None = None) -> tuple[list[JobRecord], bool]:
        """Up to ``limit`` jobs, newest first, older than the job ``before``; and whether more follow."""
        rows = self.store.list_jobs(limit + 1, before)
        return rows[:limit], len(rows) > limit

    def cancel_or_delete(self, job_id: str) -> JobRecord:
        """Cancel a queued or running job; delete a finished one (its row and its result file)."""
        job = self.get(job_id)
        if job.state in FINISHED and self.store.delete_job(job_id, only_if=FINISHED):
            logger.info("job %s (%s) deleted with its result", job_id, job.state)
            return job
        return self.cancel(job_id)

    def expire(self) -> int:
        """Delete the finished jobs older than ``job_retention_s`` (checked at most once a minute);
        returns how many."""
        retention = self.settings.job_retention_s
        now = self.clock()
        if retention is None or now - self._expired_at < 60:
            return 0
        self._expired_at = now
        deleted = sum(
            self.store.delete_job(j, only_if=FINISHED)
            for j in self.store.jobs_finished_before(now - retention)
        )
        if deleted:
            logger.info("deleted %d finished job(s) older than %g s (job_retention_s)", deleted, retention)
        return deleted

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
                self._restart(job)
                logger.info("recovery: job %s was running; restarting it", job.id)
            self.enqueue(job.id)

    def _restart(self, job: JobRecord) -> bool:
        """Put a running job back in the queue, to start again from its first image (one restart more);
        False if it is no longer running."""
        return self.store.update_job(
            job.id, only_if=("running",), state="queued", done=0, started_at=None, restarts=job.restarts + 1
        )

    # -- in-flight jobs and liveness ------------------------------------------------------------------------

    def _hold(self, job_id: str) -> None:
        with self._lock:
            self._in_flight[job_id] += 1
            self._stranded.pop(job_id, None)

    def _release(self, job_id: str) -> None:
        with self._lock:
            self._in_flight[job_id] -= 1
            if self._in_flight[job_id] <= 0:
                del self._in_flight[job_id]

    def in_flight(self, job_id: str) -> bool:
        """Whether a task of this job is queued or running in this process."""
        with self._lock:
            return self._in_flight[job_id] > 0

    def reconcile(self, grace_s: float = 2.0) -> list[str]:
        """Re-queue every queued or running job with no task in flight in this process (its failure could
        not be recorded, e.g. a full disk, or its tasks were lost) once it has been seen so for ``grace_s``
        seconds; a running one restarts from its first image, as after a restart. Returns their ids. The
        scheduler calls this every tick; it waits while the disk is short of space."""
        if self.store.disk_free_bytes() < self.settings.min_free_bytes:
            return []
        now = time.monotonic()
        requeued = []
        stale = set()
        for job in self.store.jobs_in_states("queued", "running"):
            with self._lock:
                if self._in_flight[job.id] > 0:
                    continue
                stale.add(job.id)
                first = self._stranded.setdefault(job.id, now)
            if now - first < grace_s:
                continue
            if job.state == "running":
                if not self._restart(job):
                    continue
                logger.warning("job %s was running with nothing working on it; restarting it", job.id)
            else:
                logger.warning("job %s was queued with nothing working on it; queueing it again", job.id)
            self.enqueue(job.id)
            requeued.append(job.id)
        with self._lock:
            for job_id in list(self._stranded):
                if job_id not in stale:
                    del self._stranded[job_id]
        return requeued

    # -- device tasks -------------------------------------------------------------------------------------

    def enqueue(self, job_id: str) -> None:
        self._hold(job_id)
        self.parts.pool.submit_any(JOB_PRIORITY, partial(self._start, job_id))

    def _start(self, job_id: str, worker: DeviceWorker) -> AnyTask | None:
        """Claim the queued job (queued → running: one start wins when it was queued twice), plan it,
        open its result file and queue one lane per device (at most one per batch)."""
        try:
            queued = self.store.get_job(job_id)
            if queued is None or queued.state != "queued":
                return None
            try:
                plan = self.plan(queued.spec)
            except KtlError as exc:  # e.g. the federation's round files vanished
                self._failed(job_id, str(exc))
                return None
            fits, numbers = self._room_for(plan)
            if not fits:  # it waits, queued: `reconcile` tries again
                if not (queued.error or "").startswith(STORAGE_PREFIX):
                    logger.warning("job %s waits for disk space: %s", job_id, numbers)
                    self.store.update_job(
                        job_id, only_if=("queued",), error=f"{STORAGE_PREFIX} waiting: {numbers}"
                    )
                return None
            if not self.store.update_job(
                job_id, only_if=("queued",), state="running", started_at=self.clock(), done=0, error=None
            ):
                return None  # cancelled, gone, or another start has it
            generator = plan.generator
            shape = (plan.total, generator.num_channels, generator.image_size, generator.image_size)
            try:
                writer = StreamingSafetensors(
                    self.store.job_result_path(job_id),
                    {
                        "images": (torch.uint8, shape),
                        "latents": (torch.float32, (plan.total, generator.latent_dim)),
                        "class_ids": (torch.int64, (plan.total,)),
                    },
                    on_commit=self.store.record_file,  # its checksum, recorded as it is renamed into place
                )
            except Exception as exc:  # a full disk
                self._failed_or_wait(job_id, exc)
                return None
            now = time.perf_counter()
            run = _JobRun(job_id, plan, writer, self.settings.job_batch_size, now, last_progress=now)
            lanes = min(len(self.parts.pool), run.batches)
            with self._lock:
                self._in_flight[job_id] += lanes  # each lane releases its hold when it ends
            for _ in range(lanes):
                self.parts.pool.submit_any(JOB_PRIORITY, partial(self._lane, run))
            return None
        finally:
            self._release(job_id)  # the start's own hold

    def _lane(self, run: _JobRun, worker: DeviceWorker) -> AnyTask | None:
        """Run the job's next batch on ``worker``; re-queue while batches are left. The lane that writes
        the last batch finishes the file; the first to see a failure or a cancel ends the job."""
        claimed = run.claim()
        if claimed is None:
            self._release(run.job_id)
            return None
        start, end = claimed
        ended = last = False
        try:
            job = self.store.get_job(run.job_id)
            if job is None or job.state != "running":  # cancelled
                if self._end(run) and job is not None and job.state == "cancelled":
                    self.metrics.jobs.labels(outcome="cancelled").inc()
                self._release(run.job_id)
                return None
            self._batch(run, worker, start, end)
            with run.lock:
                if run.closed:  # another lane failed, or saw the job cancelled, meanwhile
                    ended = True
                else:
                    run.batches_done += 1
                    run.done += end - start
                    last = run.batches_done == run.batches
                    if last:
                        run.closed = True  # no other lane may end it now: this one finishes it
                if not ended and not last:
                    now = time.perf_counter()
                    if now - run.last_progress >= self.settings.job_progress_interval_s:
                        # under the lock: the progress writes of a job's lanes go in order
                        self.store.update_job(run.job_id, only_if=("running",), done=run.done)
                        run.last_progress = now
        except Exception as exc:
            self._lane_failed(run, exc)
            return None
        if ended:
            self._release(run.job_id)
            return None
        if last:
            self._finish(run)
            return None
        return partial(self._lane, run)

    def _batch(self, run: _JobRun, worker: DeviceWorker, start: int, end: int) -> None:
        plan = run.plan
        generator = self.generator_on(plan.generator_name, worker)
        noise = prior_noise(generator, end - start, plan.seed, "job", start) if plan.spread > 0 else None
        latents, class_ids = plan.latents(start, end, noise)
        images = generator.synthesize(latents.to(generator.device))
        run.writer.write("images", start, (images.clamp(0, 1) * 255).round().to(torch.uint8))
        run.writer.write("latents", start, latents.float())
        run.writer.write("class_ids", start, class_ids)
        self.metrics.images.inc(end - start)
        with self._lock:
            self.batches_by_device[worker.index] += 1

    def _end(self, run: _JobRun) -> bool:
        """Close the run and drop its partial file; True for the one caller that closed it."""
        if not run.close():
            return False
        run.writer.abort()
        return True

    def _lane_failed(self, run: _JobRun, exc: Exception) -> None:
        try:
            if not self._end(run):  # another lane failed first, or the job was cancelled: not this one's
                if not isinstance(exc, WriterClosedError):
                    logger.warning("job %s: a batch failed after the job ended: %s", run.job_id, exc)
                return
            self._failed_or_wait(run.job_id, exc)
        finally:
            self._release(run.job_id)

    def _finish(self, run: _JobRun) -> None:
        """Every batch is written: commit the file and mark the job done (once: the last lane)."""
        try:
            run.writer.finish()
            if self.store.update_job(
                run.job_id, only_if=("running",), done=run.plan.total, state="done", finished_at=self.clock()
            ):
                self.metrics.jobs.labels(outcome="done").inc()
                self.metrics.job_seconds.observe(time.perf_counter() - run.t0)
            else:  # cancelled while its last batch ran
                self.metrics.jobs.labels(outcome="cancelled").inc()
        except Exception as exc:
            run.writer.abort()
            self._failed_or_wait(run.job_id, exc)
        finally:
            self._release(run.job_id)

    def _failed_or_wait(self, job_id: str, exc: Exception) -> None:
        """A job that ran out of disk goes back to the queue (from its first image) and runs again once
        there is space, as a round does (`reconcile` waits while the disk is short); any other error fails
        it."""
        if is_no_space(exc):
            logger.warning("job %s ran out of disk space; it waits, queued, for space: %s", job_id, exc)
            if self.store.update_job(
                job_id,
                only_if=("running",),
                state="queued",
                done=0,
                started_at=None,
                error=f"{STORAGE_PREFIX} the disk filled up; waiting for space ({type(exc).__name__})",
            ):
                return
        logger.error("job %s failed", job_id, exc_info=exc)
        self._failed(job_id, f"{type(exc).__name__}: {exc}")

    def _failed(self, job_id: str, error: str) -> None:
        """Record the failure (not over a cancel); may raise, e.g. on a full disk: `reconcile` then finds
        the job with nothing working on it and re-queues it."""
        if self.store.update_job(
            job_id,
            only_if=("queued", "running"),
            state="failed",
            error=error[:2000],
            finished_at=self.clock(),
        ):
            self.metrics.jobs.labels(outcome="failed").inc()
