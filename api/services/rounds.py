"""Rounds: uploads, the round lifecycle, and the method's server step on the device worker.

A round is *open* until its uploads reach the quorum, or its deadline passes with at least one upload; it
is then *aligning* (the next round opens at once) while the device worker runs the federation's method
(`Method.server_update`), and ends *published* (the broadcast and the method's files on disk) or *failed*
(error kept). The method's server state is snapshotted after every round, so a restart is warm.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from pydantic import ValidationError

from ktl.api.schemas import PrototypesJSON
from ktl.api.services.base import ServerParts, Service
from ktl.api.services.evaluation import parse_upload_metrics, summarize
from ktl.api.services.federations import FederationService
from ktl.api.services.jsonparse import parse_json_bounded
from ktl.api.services.ledger import StepLedger
from ktl.api.store import (
    ClientRecord,
    FederationRecord,
    RoundChange,
    RoundFacts,
    RoundRecord,
    RoundRule,
    UploadRecord,
    UploadResult,
)
from ktl.api.worker import ROUND_PRIORITY, Task
from ktl.errors import (
    ConflictError,
    CorruptFileError,
    InsufficientStorageError,
    NotFoundError,
    PayloadError,
    UnsupportedMediaError,
)
from ktl.methods import Method, ServerUpdate, load_method
from ktl.quality import QUALITY_FILE
from ktl.records import DuplicateKeyError, Prototypes, loads_unique
from ktl.runner import published_files, server_work
from ktl.work import Work

__all__ = ["RoundService", "SAFETENSORS_TYPES", "cancel_rule", "due_rule", "next_round", "quorum_rule"]

logger = logging.getLogger(__name__)

SAFETENSORS_TYPES = {"application/octet-stream", "application/x-safetensors", "application/vnd.safetensors"}


@dataclass
class _Step:
    """One round's server step in progress on the device worker."""

    fid: str
    r: int
    fed: FederationRecord
    started: float  # perf_counter at its start (for the close → publish histogram)
    busy: float = 0.0  # seconds it has run, slices summed
    method: Method | None = None
    work: Work[ServerUpdate] | None = None


# -- the round rules -----------------------------------------------------------------------------------
# A round is open until its uploads reach the quorum, or its deadline passes with at least one upload; it
# then closes ('aligning') and the next round opens at once with its own deadline. Cancelling the open
# round opens the next one too. The store applies these decisions in the transaction that read the facts.


def next_round(fed: FederationRecord, r: int, now: float, *, close: bool = True) -> RoundChange:
    """Round ``r`` ends (closes, unless it was cancelled) and round ``r + 1`` opens with the federation's
    deadline."""
    return RoundChange(
        at=now, close=r if close else None, open=r + 1, deadline_at=now + fed.spec.round_deadline_s
    )


def quorum_rule(fed: FederationRecord, now: float) -> RoundRule:
    """After an upload: the round closes when its uploads reach the quorum."""

    def rule(facts: RoundFacts) -> RoundChange | None:
        return next_round(fed, facts.round, now) if facts.uploads >= fed.spec.quorum else None

    return rule


def due_rule(fed: FederationRecord, now: float) -> RoundRule:
    """The deadline scheduler and recovery: the quorum is in, or the deadline passed with ≥ 1 upload."""

    def rule(facts: RoundFacts) -> RoundChange | None:
        due = facts.uploads >= fed.spec.quorum or (facts.deadline_at <= now and facts.uploads >= 1)
        return next_round(fed, facts.round, now) if due else None

    return rule


def cancel_rule(fed: FederationRecord, now: float) -> RoundRule:
    """Cancelling the federation's open round opens the next one (the federation goes on); cancelling an
    aligning round changes nothing else (its successor is already open)."""

    def rule(facts: RoundFacts) -> RoundChange | None:
        if facts.state == "open" and facts.current_round == facts.round:
            return next_round(fed, facts.round, now, close=False)
        return None

    return rule


class RoundService(Service):
    """What the routes under ``/v1/federations/{fid}/rounds/{r}`` do, and the round's device task."""

    def __init__(self, parts: ServerParts, federations: FederationService) -> None:
        super().__init__(parts)
        self.federations = federations
        self._methods: dict[str, tuple[int, Method]] = {}  # fid → (last round, its warm method)
        self._running: dict[str, int] = {}  # fid → the round whose server step is under way
        # Which of them is executing, kept on disk: a crash is charged to that round only (`recover`).
        self._ledger = StepLedger(self.store.root)
        # Rounds with a server step queued or running on the worker (one chain of tasks per round at most).
        self._in_flight: set[tuple[str, int]] = set()
        # Attempts a crash charged that a full disk kept us from giving back at start-up (`reconcile`).
        self._unreleased: set[tuple[str, int]] = set()
        self._lock = threading.Lock()

    # -- uploads --------------------------------------------------------------------------------------

    @staticmethod
    def decode_body(body: bytes, content_type: str | None) -> bytes:
        """The upload as safetensors bytes: the body itself, or its JSON form converted.

        JSON costs tens of bytes per number while it is converted, so it is bounded three ways: the
        body's size (``max_json_upload_bytes``, before authentication, `BodyLimitMiddleware`), the
        parses at once (`parse_json_bounded`, on its own threads; 503 ``busy`` beyond a wait) and the
        conversion: numpy's C loop over the parsed rows once they are known to be rectangular
        (``torch.tensor`` on nested lists is 2–3× slower). The n × K numbers come from the body's
        bytes, 2 or more each, so the arrays are at most twice the body's size.
        """
        import numpy as np

        media = (content_type or "").split(";")[0].strip().lower()
        if media in SAFETENSORS_TYPES:
            return body
        if media == "application/json":

            def parse() -> bytes:
                try:
                    loads_unique(body)
                except DuplicateKeyError as exc:
                    raise PayloadError("bad_json", f"bad JSON body: {exc}") from None
                except ValueError:
                    pass  # not JSON: pydantic says where
                try:  # strict: "1" or true for a number is refused, as in every request body
                    data = PrototypesJSON.model_validate_json(body, strict=True)
                except ValidationError as exc:
                    err = exc.errors()[0]
                    where = ".".join(str(x) for x in err["loc"]) or "body"
                    raise PayloadError("bad_json", f"bad JSON body at {where}: {err['msg']}") from None
                rows = data.prototypes
                if not rows:
                    raise PayloadError("empty", "an upload must hold at least one prototype")
                k = len(rows[0])
                if any(len(row) != k for row in rows):
                    raise PayloadError("shape", "prototypes must be a rectangular (n, K) list of lists")
                return Prototypes(
                    vectors=torch.from_numpy(np.array(rows, dtype=np.float32).reshape(len(rows), k)),
                    class_ids=torch.from_numpy(np.array(data.class_ids, dtype=np.int64)),
                    counts=torch.from_numpy(np.array(data.counts, dtype=np.int64)),
                ).to_bytes(torch.float32)

            return parse_json_bounded(parse)
        raise UnsupportedMediaError(
            "unsupported_media_type",
            "Content-Type must be application/octet-stream (safetensors) or application/json, "
            f"got {media or 'none'!r}",
        )

    def submit_upload(
        self,
        fed: FederationRecord,
        r: int,
        client: ClientRecord,
        body: bytes,
        content_type: str | None,
        metrics: str | None = None,
    ) -> UploadResult:
        """Validate (by the federation's method) and durably store one upload, with the client's own
        evaluation ``metrics`` if it sent any (the ``Ktl-Metrics`` JSON, `parse_upload_metrics`); close
        the round when it completes the quorum. Its identity is the SHA-256 of its canonical float32
        form (the metrics are not part of it: a retry with other metrics is the same upload)."""
        self.metrics.bytes_in.inc(len(body))
        if fed.state != "active":
            raise ConflictError("federation_paused", f"federation {fed.id} is paused by its operator")
        evaluation = parse_upload_metrics(metrics) if metrics is not None else None
        upload = self.federations.validator(fed).validate_upload(self.decode_body(body, content_type))
        counts = getattr(upload, "counts", None)  # the weight of each row in the aggregate
        if (
            isinstance(counts, torch.Tensor)
            and counts.numel()
            and int(counts.max()) > fed.spec.max_samples_per_class
        ):
            raise PayloadError(
                "counts",
                f"counts go up to {int(counts.max())}; this federation accepts at most "
                f"{fed.spec.max_samples_per_class} samples per class (max_samples_per_class)",
            )
        privacy = self.federations.privacy(fed)
        if privacy is not None and privacy.rounds is not None and r > privacy.rounds:
            raise ConflictError(
                "privacy_budget_spent",
                f"the federation's privacy budget covers rounds 1–{privacy.rounds}; round {r} is past it",
            )
        canonical = upload.to_bytes(torch.float32)
        digest = hashlib.sha256(canonical).hexdigest()
        result = self.store.record_upload(
            fed,
            r,
            client.id,
            canonical,
            digest,
            upload.rows,
            len(body),
            self.clock(),
            metrics=evaluation.to_json() if evaluation is not None else None,
            rule=quorum_rule(fed, self.clock()),
        )
        if not result.duplicate:
            self.metrics.uploads.inc()
        if result.closed:
            logger.info("%s round %d reached its quorum (%d uploads)", fed.id, r, result.uploads)
            self.enqueue(fed.id, r)
        return result

    # -- round state and published files ------------------------------------------------------------------

    def get(self, fid: str, r: int) -> RoundRecord:
        rnd = self.store.get_round(fid, r)
        if rnd is None:
            fed = self.federations.get(fid)
            raise NotFoundError(
                "unknown_round",
                f"round {r} does not exist; the current round is {fed.current_round}",
                current_round=fed.current_round,
            )
        return rnd

    def uploads(self, fid: str, r: int) -> list[UploadRecord]:
        return self.store.uploads(fid, r)

    def client_metrics(self, fid: str, r: int) -> dict[str, dict[str, float | int]]:
        """Round ``r``'s metrics from its clients' uploads so far, per name (`summarize`)."""
        return summarize(self.store.metric_sums(fid, r, r)).get(r, {})

    def learning_curve(
        self, fid: str, after: int, limit: int
    ) -> list[tuple[RoundRecord, dict[str, dict[str, float | int]]]]:
        """Up to ``limit`` rounds after round ``after``, each with its clients' metrics (`summarize`)."""
        rounds = self.store.rounds_between(fid, after + 1, after + limit)
        if not rounds:
            return []
        summary = summarize(self.store.metric_sums(fid, rounds[0].round, rounds[-1].round))
        return [(rnd, summary.get(rnd.round, {})) for rnd in rounds]

    def published_file(self, fed: FederationRecord, r: int, name: str) -> bytes:
        """A file of a published round; ``not_published_by_method`` when the method publishes no such file."""
        rnd = self.get(fed.id, r)
        if rnd.state != "published":
            raise ConflictError(
                "round_not_published",
                f"round {r} is {rnd.state}; its files exist once it is published",
                state=rnd.state,
            )
        path = self.store.round_dir(fed.id, r) / name
        if not path.is_file() and self.store.file_record(path) is None:
            raise NotFoundError(
                "not_published_by_method",
                f"method {fed.spec.method!r} publishes no {name} (its broadcast is "
                f"{fed.spec.method_class.broadcast_file})",
            )
        # Checked against the checksum written with it: a damaged file is `corrupt_file` naming the round,
        # never its bytes.
        return self.store.read_verified(path)

    def quality(self, fed: FederationRecord, rnd: RoundRecord) -> dict[str, Any] | None:
        """The published round's alignment quality report (``quality.json``), or None: not published yet,
        or the method publishes none. A damaged report is logged and left out — it never breaks the round
        state clients poll (``ktl admin check`` lists it)."""
        if rnd.state != "published":
            return None
        path = self.store.round_dir(fed.id, rnd.round) / QUALITY_FILE
        if self.store.file_record(path) is None:
            return None
        try:
            report = json.loads(self.store.read_verified(path))
        except (CorruptFileError, ValueError) as exc:
            logger.warning("%s round %d: quality report not served: %s", fed.id, rnd.round, exc)
            return None
        return report if isinstance(report, dict) else None

    def send_file(self, fed: FederationRecord, r: int, name: str) -> bytes:
        """A published round's file, for sending (counted in ``ktl_bytes_sent``)."""
        data = self.published_file(fed, r, name)
        self.metrics.bytes_out.inc(len(data))
        return data

    def broadcast(self, fed: FederationRecord, r: int) -> bytes:
        """What every client of the round downloads: the method's broadcast bytes."""
        return self.send_file(fed, r, fed.spec.method_class.broadcast_file)

    # -- the lifecycle ------------------------------------------------------------------------------------

    def close_due(self) -> int:
        """Close every open round whose deadline passed with at least one upload; returns how many."""
        now = self.clock()
        closed = 0
        for fid, r in self.store.open_rounds_past_deadline(now):
            fed = self.store.get_federation(fid)
            if fed is None or fed.state != "active":  # a paused federation's rounds wait
                continue
            if self.store.change_round(fid, r, due_rule(fed, now)):
                logger.info("%s round %d closed at its deadline", fid, r)
                self.enqueue(fid, r)
                closed += 1
        return closed

    def retry_storage_failures(self) -> int:
        """Rounds whose server step failed for lack of space go again once there is space; returns how many."""
        if self.store.disk_free_bytes() < self.settings.min_free_bytes:
            return 0
        retried = 0
        for rnd in self.store.rounds_failed_for_storage():
            if self.store.retry_round(rnd.federation_id, rnd.round):
                logger.info(
                    "%s round %d failed for lack of space; there is space again: retrying",
                    rnd.federation_id,
                    rnd.round,
                )
                self.enqueue(rnd.federation_id, rnd.round)
                retried += 1
        return retried

    def cancel(self, fid: str, r: int) -> RoundRecord:
        """The operator ends an open or aligning round (failed, ``cancelled by the operator``); a step under
        way stops at its next slice, and cancelling the open round opens the next one."""
        fed = self.federations.get(fid)
        self.get(fid, r)
        now = self.clock()
        if not self.store.cancel_round(fid, r, "cancelled by the operator", now, cancel_rule(fed, now)):
            rnd = self.get(fid, r)
            raise ConflictError("round_finished", f"round {r} is already {rnd.state}", state=rnd.state)
        logger.info("%s round %d cancelled by the operator", fid, r)
        return self.get(fid, r)

    def release_running(self) -> None:
        """At a graceful stop (the worker stopped between two slices): the steps under way were stopped on
        purpose, so their attempts do not count towards ``max_round_attempts``; they run again at start-up."""
        for fid, r in list(self._running.items()):
            self.store.release_attempt(fid, r)
            logger.info(
                "%s round %d: its server step stops with the server; it runs again at start-up", fid, r
            )
        self._running.clear()
        self._ledger.clear()

    def forget(self, fid: str) -> None:
        """Drop what is kept in memory for a deleted federation."""
        self._methods.pop(fid, None)

    def resume(self, fid: str) -> None:
        """After a pause: queue the federation's rounds that wait for their server step."""
        for rnd in self.store.rounds_in_state("aligning"):
            if rnd.federation_id == fid:
                self.enqueue(fid, rnd.round)

    def recover(self) -> None:
        """After a restart: close rounds that are due (quorum in, or deadline passed with an upload) and
        align every round left aligning."""
        self._charge_the_crash()
        now = self.clock()
        for rnd in self.store.rounds_in_state("open"):
            fed = self.store.get_federation(rnd.federation_id)
            if fed is None:  # set aside: its rounds wait
                continue
            try:
                closed = self.store.change_round(fed.id, rnd.round, due_rule(fed, now))
            except InsufficientStorageError:  # start anyway: it is closed once there is room
                logger.warning("recovery: the disk is full; %s round %d stays open", fed.id, rnd.round)
                continue
            if closed:  # aligned by the next loop
                logger.info("recovery: %s round %d was due; closing it", rnd.federation_id, rnd.round)
        for rnd in self.store.rounds_in_state("aligning"):
            logger.info("recovery: aligning %s round %d", rnd.federation_id, rnd.round)
            self.enqueue(rnd.federation_id, rnd.round)

    def _charge_the_crash(self) -> None:
        """At start-up: of the steps the previous life left under way, only the one that was executing
        keeps the attempt it was charged; the others get theirs back (`ktl.api.services.ledger`)."""
        ledger = self._ledger.read()
        if ledger is not None:
            for fid, r in ledger.started:
                if (fid, r) == ledger.executing:
                    logger.warning(
                        "%s round %d: the server stopped while its server step was executing; that "
                        "counts as one of its %d attempts",
                        fid,
                        r,
                        self.settings.max_round_attempts,
                    )
                else:
                    self._release(fid, r)
        self._ledger.clear()

    def _release(self, fid: str, r: int) -> None:
        """Give round ``r`` back the attempt the crash charged it; on a full disk (a kill inside a disk-full
        window) the server still starts, and `reconcile` gives it back once there is room."""
        try:
            self.store.release_attempt(fid, r)
        except InsufficientStorageError:
            logger.warning(
                "%s round %d: the disk is full; its attempt is given back when there is room", fid, r
            )
            self._unreleased.add((fid, r))

    def _executing(self, step: tuple[str, int] | None) -> None:
        self._ledger.write(self._running, step)

    def enqueue(self, fid: str, r: int) -> bool:
        """Queue round ``r``'s server step, unless one is already queued or running; True if queued."""
        with self._lock:
            if (fid, r) in self._in_flight:
                return False
            self._in_flight.add((fid, r))
        self.parts.worker.submit(ROUND_PRIORITY, self._tracked(fid, r, partial(self._start_step, fid, r)))
        return True

    def _tracked(self, fid: str, r: int, task: Task) -> Task:
        """``task`` and its follow-ups, with round ``r`` counted in flight until the chain ends — by
        returning nothing or by raising (a failure that could not even be recorded, e.g. on a full disk)."""

        def run() -> Task | None:
            try:
                follow = task()
            except BaseException:
                self._settle(fid, r)
                raise
            if follow is None:
                self._settle(fid, r)
                return None
            return self._tracked(fid, r, follow)

        return run

    def _settle(self, fid: str, r: int) -> None:
        with self._lock:
            self._in_flight.discard((fid, r))
            if self._running.get(fid) == r:
                del self._running[fid]

    def reconcile(self) -> int:
        """Queue again every aligning round (of an active federation) that has no server step queued or
        running here — one whose end could not be recorded (its step failed and the disk was full, so
        `Store.fail_round` failed too) would otherwise wait forever. Waits while the disk is short of
        space. Returns how many it queued."""
        if self.store.disk_free_bytes() < self.settings.min_free_bytes:
            return 0
        for fid, r in sorted(self._unreleased):
            self._unreleased.discard((fid, r))
            self._release(fid, r)
        queued = 0
        for rnd in self.store.rounds_in_state("aligning"):
            fed = self.store.get_federation(rnd.federation_id)
            if fed is None or fed.state != "active":  # a paused federation's rounds wait for `resume`
                continue
            if self.enqueue(rnd.federation_id, rnd.round):
                logger.warning(
                    "%s round %d was aligning with no server step queued (its end could not be recorded); "
                    "queuing it again",
                    rnd.federation_id,
                    rnd.round,
                )
                queued += 1
        return queued

    def _method_for(self, fed: FederationRecord, r: int) -> Method:
        """The federation's method, warm: kept from round ``r − 1``, or loaded from the latest valid state
        snapshot before ``r``, or fresh for its first round.

        A snapshot whose files do not match their checksums, or that does not load, is skipped for the one
        before it (or a fresh method); the round's stats then say so under ``state_fallback``."""
        cached = self._methods.get(fed.id)
        if cached is not None and cached[0] == r - 1:
            return cached[1]
        ctx = self.federations.method_context(fed)
        skipped: list[tuple[int, str]] = []
        method: Method | None = None
        restored: int | None = None
        before = r
        while method is None and (found := self.store.latest_valid_state(fed.id, before, skipped=skipped)):
            snapshot, folder = found
            try:
                method, restored = load_method(folder, ctx), snapshot
            except Exception as exc:  # checksums match, yet it does not load (e.g. another version wrote it)
                logger.warning("%s: cannot load the state snapshot after round %d: %s", fed.id, snapshot, exc)
                skipped.append((snapshot, f"cannot be loaded: {type(exc).__name__}: {exc}"))
                before = snapshot
        if method is None:
            method = fed.spec.method_class(fed.spec.method_settings(), ctx)
        if skipped:
            logger.warning(
                "%s round %d starts from %s (skipped damaged snapshots of rounds %s)",
                fed.id,
                r,
                f"the snapshot after round {restored}" if restored is not None else "a fresh method",
                [s for s, _ in skipped],
            )
            self.store.note_round(
                fed.id,
                r,
                state_fallback={
                    "restored_from_round": restored,
                    "skipped": [{"round": s, "reason": why} for s, why in skipped],
                },
            )
        return method

    def warm_method(self, fid: str) -> Method | None:
        """The federation's method as its last published round left it (None before the first)."""
        cached = self._methods.get(fid)
        return cached[1] if cached is not None else None

    def run_server_step(self, fid: str, r: int) -> None:
        """Round ``r``'s whole server step at once (tests and tools; the server runs it in slices)."""
        task: Task | None = partial(self._start_step, fid, r)
        while task is not None:
            task = task()

    def _start_step(self, fid: str, r: int) -> Task | None:
        """Device task: begin round ``r``'s server step — after the federation's previous round, since a
        method's state goes from one round to the next — and return its first slice."""
        rnd = self.store.get_round(fid, r)
        fed = self.store.get_federation(fid)
        if rnd is None or fed is None or rnd.state != "aligning":
            return None
        if fed.state != "active":  # paused: `resume` queues it again
            return None
        if self._running.get(fid, r) != r:  # the previous round's step is still running: after it
            return partial(self._start_step, fid, r)
        self._running[fid] = r
        step = _Step(fid, r, fed, started=time.perf_counter())
        # Counted durably before the work: a round whose step kills the process each time (a poison
        # round) is tried max_round_attempts times, then fails with the reason, instead of forever.
        attempt = self.store.start_attempt(fid, r)
        if attempt > self.settings.max_round_attempts:
            reason = (
                f"attempts_exhausted: the server stopped during this round's server step {attempt - 1} "
                "times; the round is given up and the federation paused (resume it to go on)"
            )
            self._fail(step, RuntimeError(reason))
            # Its next rounds would likely do the same: the federation waits for the operator.
            self.store.set_federation_state(fid, "paused")
            logger.error("%s paused: round %d's server step kept stopping the server", fid, r)
            return None
        self._executing((fid, r))
        try:
            step.method = self._method_for(fed, r)
            step.work = server_work(step.method, self.store.load_uploads(fid, r), r)
        except Exception as exc:
            self._fail(step, exc)
            return None
        finally:
            self._executing(None)
        return partial(self._run_slice, step)

    def _run_slice(self, step: _Step) -> Task | None:
        """Device task: about ``align_slice_seconds`` of the step, then back in the queue behind the other
        federations' work; publish when the step ends. Between slices the step stops if its round was
        cancelled or its time budget (``max_align_seconds`` of its own running time) is spent."""
        if step.work is None or step.method is None:
            return None
        self._executing((step.fid, step.r))
        try:
            return self._slice(step)
        finally:
            self._executing(None)

    def _slice(self, step: _Step) -> Task | None:
        if step.work is None:
            return None
        t0 = time.perf_counter()
        until = t0 + self.settings.align_slice_seconds
        try:
            while True:
                try:
                    next(step.work)
                except StopIteration as done:
                    update: ServerUpdate = done.value
                    break
                if time.perf_counter() >= until:
                    step.busy += time.perf_counter() - t0
                    if step.busy > self.settings.max_align_seconds:
                        raise TimeoutError(
                            f"align_timeout: the server step ran past max_align_seconds "
                            f"({self.settings.max_align_seconds:g} s)"
                        )
                    rnd = self.store.get_round(step.fid, step.r)
                    if rnd is None or rnd.state != "aligning":  # cancelled by the operator
                        logger.info(
                            "%s round %d is %s; its server step stops", step.fid, step.r, rnd and rnd.state
                        )
                        self._end(step)
                        return None
                    return partial(self._run_slice, step)
            step.busy += time.perf_counter() - t0
            self._publish(step, update)
        except Exception as exc:
            self._fail(step, exc)
        return None

    def _publish(self, step: _Step, update: ServerUpdate) -> None:
        """Snapshot the method's state, write the broadcast and the method's files, mark published."""
        method = step.method
        if method is None:
            return
        staged = self.store.staging_dir(step.fid)
        method.save_pretrained(staged)
        self.store.commit_state(step.fid, step.r, staged, self.settings.keep_aligner_rounds)
        stats = {**update.metrics, "server_seconds": step.busy}
        self.store.publish_round(step.fid, step.r, published_files(method, update), stats, self.clock())
        self._methods[step.fid] = (step.r, method)
        self._end(step)
        self.metrics.rounds.labels(outcome="published").inc()
        logger.info(
            "%s round %d published (%s, %.2fs of server step)",
            step.fid,
            step.r,
            step.fed.spec.method,
            step.busy,
        )

    def _fail(self, step: _Step, exc: Exception) -> None:
        self._methods.pop(step.fid, None)  # its state may be half-trained
        self._end(step)
        logger.error(
            "%s round %d failed: %s", step.fid, step.r, exc, exc_info=not isinstance(exc, TimeoutError)
        )
        self.store.fail_round(step.fid, step.r, f"{type(exc).__name__}: {exc}", self.clock())
        self.metrics.rounds.labels(outcome="failed").inc()

    def _end(self, step: _Step) -> None:
        if self._running.get(step.fid) == step.r:
            del self._running[step.fid]
        self.metrics.round_seconds.observe(time.perf_counter() - step.started)
