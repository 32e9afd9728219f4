"""Rounds: uploads, the round lifecycle, and the method's server step on the device worker.

A round is *open* until its uploads reach the quorum, or its deadline passes with at least one upload; it
is then *aligning* (the next round opens at once) while the device worker runs the federation's method
(`Method.server_update`), and ends *published* (the broadcast and the method's files on disk) or *failed*
(error kept). The method's server state is snapshotted after every round, so a restart is warm.
"""

from __future__ import annotations

import hashlib
import logging
import time
from functools import partial

import torch
from pydantic import ValidationError

from ktl.api.schemas import PrototypesJSON
from ktl.api.services.base import ServerParts
from ktl.api.services.federations import FederationService
from ktl.api.store import ClientRecord, FederationRecord, RoundRecord, UploadRecord, UploadResult
from ktl.api.worker import ROUND_PRIORITY
from ktl.errors import ConflictError, NotFoundError, PayloadError, UnsupportedMediaError
from ktl.methods import Method, load_method
from ktl.records import Prototypes

__all__ = ["RoundService", "SAFETENSORS_TYPES"]

logger = logging.getLogger(__name__)

SAFETENSORS_TYPES = {"application/octet-stream", "application/x-safetensors", "application/vnd.safetensors"}


class RoundService:
    """What the routes under ``/v1/federations/{fid}/rounds/{r}`` do, and the round's device task."""

    def __init__(self, parts: ServerParts, federations: FederationService) -> None:
        self.parts = parts
        self.store, self.metrics, self.settings, self.clock = (
            parts.store,
            parts.metrics,
            parts.settings,
            parts.clock,
        )
        self.federations = federations
        self._methods: dict[str, tuple[int, Method]] = {}  # fid → (last round, its warm method)

    # -- uploads --------------------------------------------------------------------------------------

    @staticmethod
    def decode_body(body: bytes, content_type: str | None) -> bytes:
        """The upload as safetensors bytes: the body itself, or its JSON form converted."""
        media = (content_type or "").split(";")[0].strip().lower()
        if media in SAFETENSORS_TYPES:
            return body
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
            ).to_bytes(torch.float32)
        raise UnsupportedMediaError(
            "unsupported_media_type",
            "Content-Type must be application/octet-stream (safetensors) or application/json, "
            f"got {media or 'none'!r}",
        )

    def submit_upload(
        self, fed: FederationRecord, r: int, client: ClientRecord, body: bytes, content_type: str | None
    ) -> UploadResult:
        """Validate (by the federation's method) and durably store one upload; close the round when it
        completes the quorum. Its identity is the SHA-256 of its canonical float32 form."""
        self.metrics.bytes_in.inc(len(body))
        upload = self.federations.validator(fed).validate_upload(self.decode_body(body, content_type))
        privacy = self.federations.privacy(fed)
        if privacy is not None and privacy.rounds is not None and r > privacy.rounds:
            raise ConflictError(
                "privacy_budget_spent",
                f"the federation's privacy budget covers rounds 1–{privacy.rounds}; round {r} is past it",
            )
        canonical = upload.to_bytes(torch.float32)
        digest = hashlib.sha256(canonical).hexdigest()
        result = self.store.record_upload(
            fed, r, client.id, canonical, digest, upload.vectors.shape[0], len(body), self.clock()
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
        if not path.is_file():
            raise NotFoundError(
                "not_published_by_method",
                f"method {fed.spec.method!r} publishes no {name} (its broadcast is "
                f"{fed.spec.method_class.broadcast_file})",
            )
        return path.read_bytes()

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
        for fid, r in self.store.due_rounds(now):
            if self.store.close_if_ready(fid, r, now):
                logger.info("%s round %d closed at its deadline", fid, r)
                self.enqueue(fid, r)
                closed += 1
        return closed

    def recover(self) -> None:
        """After a restart: close rounds that are due (quorum in, or deadline passed with an upload) and
        align every round left aligning."""
        now = self.clock()
        for rnd in self.store.rounds_in_state("open"):
            if self.store.close_if_ready(rnd.federation_id, rnd.round, now):  # aligned by the next loop
                logger.info("recovery: %s round %d was due; closing it", rnd.federation_id, rnd.round)
        for rnd in self.store.rounds_in_state("aligning"):
            logger.info("recovery: aligning %s round %d", rnd.federation_id, rnd.round)
            self.enqueue(rnd.federation_id, rnd.round)

    def enqueue(self, fid: str, r: int) -> None:
        self.parts.worker.submit(ROUND_PRIORITY, partial(self.run_server_step, fid, r))

    def _method_for(self, fed: FederationRecord, r: int) -> Method:
        """The federation's method, warm: kept from round ``r − 1``, or loaded from the latest state
        snapshot before ``r``, or fresh for its first round."""
        cached = self._methods.get(fed.id)
        if cached is not None and cached[0] == r - 1:
            return cached[1]
        ctx = self.federations.method_context(fed)
        earlier = [s for s in self.store.state_snapshots(fed.id) if s < r]
        if earlier:
            return load_method(self.store.state_dir(fed.id, max(earlier)), ctx)
        return fed.spec.method_class(fed.spec.method_settings(), ctx)

    def run_server_step(self, fid: str, r: int) -> None:
        """Device task: the method's server step on round ``r``'s uploads, its state snapshot, publish."""
        rnd = self.store.get_round(fid, r)
        fed = self.store.get_federation(fid)
        if rnd is None or fed is None or rnd.state != "aligning":
            return
        started = time.perf_counter()
        try:
            method = self._method_for(fed, r)
            update = method.server_update(self.store.load_uploads(fid, r), r)
            staged = self.store.staging_dir(fid)
            method.save_pretrained(staged)
            self.store.commit_state(fid, r, staged, self.settings.keep_aligner_rounds)
            files = dict(update.files)
            if update.payload is not None:
                files[method.broadcast_file] = update.payload
            self.store.publish_round(fid, r, files, update.metrics, self.clock())
            self._methods[fid] = (r, method)
            self.metrics.rounds.labels(outcome="published").inc()
            logger.info(
                "%s round %d published (%s, %.2fs)", fid, r, fed.spec.method, time.perf_counter() - started
            )
        except Exception as exc:
            self._methods.pop(fid, None)  # its state may be half-trained
            logger.exception("%s round %d failed", fid, r)
            self.store.fail_round(fid, r, f"{type(exc).__name__}: {exc}", self.clock())
            self.metrics.rounds.labels(outcome="failed").inc()
        finally:
            self.metrics.round_seconds.observe(time.perf_counter() - started)
