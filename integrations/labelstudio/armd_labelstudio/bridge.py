"""The bridge: armd's requests topic -> Label Studio tasks -> armd's labels topic.

One thread does everything, in this order each turn:

1. deliver producer callbacks (a confirmed label is marked ``sent`` in the state);
2. read one requests-topic message: validate it, find or create its task (idempotent by request id,
   stored in the task data as ``armd_request_id``), record request <-> task in the state, and only
   then store its Kafka offset for commit;
3. every ``poll_interval``: publish labels whose delivery is pending, read the submitted annotations
   of the open tasks, decide each one once (send it, or record why not: late, surplus, ...), publish,
   and delete the tasks whose request expired.

Exactly-once labels across crashes: an annotation is recorded as ``pending`` with the labels topic's
end offsets *before* its label is first produced; after a crash or a failed delivery the bridge reads
the labels topic from those offsets and sends only the labels it does not find there (each label
carries the bridge id and the annotation id in its ``metadata``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from . import messages as M
from .lsclient import AuthError, LabelStudioAPI, LabelStudioError, NotFound, Unavailable
from .metrics import Metrics
from .state import CREATING, EXPIRED, EXPIRED_UNPOSTED, PENDING, State, now_ms

log = logging.getLogger("armd_labelstudio")

#: Test-only fault injection: ``ARMD_LABELSTUDIO_FAULT=<point>[:<n>]`` makes the process exit
#: abruptly (like ``kill -9``) at the n-th time (default 1st) it passes ``point``: ``after-task-create``
#: (task created in Label Studio, not yet recorded) or ``after-label-delivered`` (label confirmed by
#: the broker, not yet recorded as sent).
FAULT_ENV = "ARMD_LABELSTUDIO_FAULT"
FAULT_EXIT_CODE = 86


class RateLimit(logging.Filter):
    """Lets a message through at most once per ``interval`` seconds (messages equal up to their digits
    count as the same), so a broker outage is reported without flooding the log."""

    def __init__(self, interval: float = 30.0):
        super().__init__()
        self.interval = interval
        self.last: Dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = re.sub(r"\d+", "#", f"{record.name} {record.getMessage()}")
        now = time.monotonic()
        if now - self.last.get(key, -1e9) < self.interval:
            return False
        if len(self.last) > 1000:
            self.last.clear()
        self.last[key] = now
        return True


kafka_log = logging.getLogger("armd_labelstudio.kafka")
kafka_log.addFilter(RateLimit())


class KafkaUnavailable(Exception):
    pass


class FatalError(Exception):
    """A configuration problem the bridge cannot wait out (bad API key, deleted project)."""


@dataclass
class Config:
    brokers: str
    ls_url: str
    ls_api_key: str
    requests_topic: str = "armd.requests"
    labels_topic: str = "armd.labels"
    group_id: str = "armd-labelstudio"
    project_title: str = "armd comparisons"
    state_dir: str = "armd-labelstudio-state"
    poll_interval: float = 2.0
    annotator_id: str = "email"  # "email" or "id"
    text_field: str = "text"
    prompt_field: str = "prompt"
    instance_ids: tuple = ()
    kafka_settings: Dict[str, str] = field(default_factory=dict)
    stats_interval: float = 60.0
    max_backoff: float = 30.0
    state_retention_days: float = 30.0


class Backoff:
    def __init__(self, name: str, cap: float):
        self.name, self.cap = name, cap
        self.delay = 0.0
        self.down_since: Optional[float] = None
        self.retry_at = 0.0

    def failure(self, err: object) -> float:
        now = time.monotonic()
        self.delay = 1.0 if self.delay == 0 else min(self.cap, self.delay * 2)
        if self.down_since is None:
            self.down_since = now
        log.warning("%s unavailable (%s); retrying in %.0f s", self.name, err, self.delay)
        self.retry_at = now + self.delay
        return self.delay

    def success(self) -> None:
        if self.down_since is not None:
            log.info("%s available again after %.0f s", self.name, time.monotonic() - self.down_since)
        self.delay, self.down_since, self.retry_at = 0.0, None, 0.0

    def ready(self) -> bool:
        return time.monotonic() >= self.retry_at


class Bridge:
    def __init__(self, cfg: Config, metrics: Optional[Metrics] = None):
        if cfg.annotator_id not in ("email", "id"):
            raise ValueError("annotator_id must be 'email' or 'id'")
        self.cfg = cfg
        self.m = metrics or Metrics()
        self.state = State(cfg.state_dir)
        self.bridge_id = self.state.bridge_id
        self.stopping = threading.Event()
        self.ls: Optional[LabelStudioAPI] = None
        self.project_id: Optional[int] = None
        self.adopted = False
        self.max_annotations = 1
        self.ls_backoff = Backoff("Label Studio", cfg.max_backoff)
        self.kafka_backoff = Backoff("Kafka", cfg.max_backoff)
        self.consumer: Optional[Consumer] = None
        self.producer: Optional[Producer] = None
        self.scanner: Optional[Consumer] = None
        self.held = None  # (message, request) waiting for Label Studio
        self.inflight: Dict[int, str] = {}  # annotation id -> request id: produced, not yet reported
        self.absent: Set[int] = set()  # uncertain deliveries a scan showed are not on the topic
        self.users: Dict[int, str] = {}
        self._fault_counts: Dict[str, int] = {}
        self._all_brokers_down = False

    # ------------------------------------------------------------------------------ lifecycle
    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        try:
            self._connect_label_studio()
            if self.stopping.is_set():
                return
            self._setup_project()
            self._start_kafka()
            self._loop()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self.producer is not None:
            left = self.producer.flush(10)
            if left:
                log.warning("%d labels still unconfirmed at shutdown; checked on the labels topic at "
                            "the next start", left)
        if self.consumer is not None:
            try:
                self.consumer.close()  # commits the stored offsets
            except KafkaException as e:
                log.warning("closing the consumer: %s", e)
        if self.scanner is not None:
            self.scanner.close()
        self.state.close()
        log.info("stopped: %s", self.m.summary())

    def _fault(self, point: str) -> None:
        spec = os.environ.get(FAULT_ENV, "")
        name, _, n = spec.partition(":")
        if name != point:
            return
        self._fault_counts[point] = self._fault_counts.get(point, 0) + 1
        if self._fault_counts[point] >= int(n or 1):
            log.error("fault injection: exiting at %s", point)
            logging.shutdown()
            os._exit(FAULT_EXIT_CODE)

    # --------------------------------------------------------------------------- Label Studio
    def _wait(self, backoff: Backoff) -> None:
        self.stopping.wait(max(0.0, backoff.retry_at - time.monotonic()))

    def _connect_label_studio(self) -> None:
        while not self.stopping.is_set():
            try:
                if self.ls is None:
                    self.ls = LabelStudioAPI(self.cfg.ls_url, self.cfg.ls_api_key)
                me = self.ls.whoami()
                self._ls_ok()
                log.info("connected to Label Studio at %s as %s", self.cfg.ls_url, me.get("email"))
                return
            except AuthError as e:
                raise FatalError(f"Label Studio at {self.cfg.ls_url} does not accept the API key ({e}); "
                                 "use a personal access token or an enabled legacy token") from None
            except Unavailable as e:
                self._ls_down(e)
                self._wait(self.ls_backoff)

    def _ls_ok(self) -> None:
        self.ls_backoff.success()
        self.m.label_studio_up.set(1)

    def _ls_down(self, err: Exception) -> None:
        self.m.label_studio_up.set(0)
        self.m.backend_errors.labels("label_studio").inc()
        self.ls_backoff.failure(err)

    def _setup_project(self) -> None:
        while not self.stopping.is_set():
            try:
                self._setup_project_once()
                self._ls_ok()
                return
            except Unavailable as e:
                self._ls_down(e)
                self._wait(self.ls_backoff)

    def _setup_project_once(self) -> None:
        stored = self.state.get_meta("project_id")
        if stored is not None:
            pid = int(stored)
            try:
                project = self.ls.project(pid)
            except NotFound:
                raise FatalError(
                    f"Label Studio project {pid} recorded in {self.state.path} no longer exists; to start "
                    "over with a new project, move the state directory away") from None
            if project.get("title") != self.cfg.project_title:
                log.warning("using project %d %r from the state (not --project-title %r)", pid,
                            project.get("title"), self.cfg.project_title)
        else:
            pid = self.ls.find_project(self.cfg.project_title)
            if pid is not None:
                log.warning("adopting the existing Label Studio project %d %r (its tasks are matched by "
                            "armd request id)", pid, self.cfg.project_title)
                self.state.set_meta("adopted", "1")
            else:
                pid = self.ls.create_project(self.cfg.project_title, maximum_annotations=1)
                log.info("created Label Studio project %d %r", pid, self.cfg.project_title)
            self.state.set_meta("project_id", str(pid))
            project = self.ls.project(pid)
        self.state.set_meta("ls_url", self.cfg.ls_url)
        self.project_id = pid
        self.adopted = self.state.get_meta("adopted") == "1"
        self.max_annotations = int(project.get("maximum_annotations") or 1)
        self.m.open_tasks.set(len(self.state.open_requests()))
        log.info("project %d: %s/projects/%d/data (annotators: Label All Tasks)", pid,
                 self.cfg.ls_url.rstrip("/"), pid)

    # --------------------------------------------------------------------------------- Kafka
    def _kafka_conf(self) -> Dict[str, object]:
        # librdkafka's own log lines go through (rate-limited) Python logging, not straight to stderr.
        conf: Dict[str, object] = {"bootstrap.servers": self.cfg.brokers, "error_cb": self._kafka_error,
                                   "logger": kafka_log}
        conf.update(self.cfg.kafka_settings)
        return conf

    def _start_kafka(self) -> None:
        c = self._kafka_conf()
        c.update({"group.id": self.cfg.group_id, "enable.auto.commit": True,
                  "auto.commit.interval.ms": 1000, "enable.auto.offset.store": False,
                  "auto.offset.reset": "earliest"})
        # Static membership: a restarted bridge (same state, same id) takes its partitions back at
        # once, instead of waiting out the session of its previous (crashed) self.
        c.setdefault("group.instance.id", f"armd-labelstudio-{self.bridge_id}")
        self.consumer = Consumer(c)
        self.consumer.subscribe([self.cfg.requests_topic], on_revoke=self._on_revoke)
        p = self._kafka_conf()
        p.update({"enable.idempotence": True, "acks": "all", "linger.ms": 5,
                  "message.timeout.ms": 60000})
        self.producer = Producer(p)
        s = self._kafka_conf()
        s.update({"group.id": f"{self.cfg.group_id}.scan", "enable.auto.commit": False,
                  "enable.partition.eof": False, "auto.offset.reset": "earliest"})
        self.scanner = Consumer(s)
        log.info("reading %s (group %s), writing %s at %s", self.cfg.requests_topic, self.cfg.group_id,
                 self.cfg.labels_topic, self.cfg.brokers)

    def _kafka_error(self, err: KafkaError) -> None:
        self.m.backend_errors.labels("kafka").inc()
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            if not self._all_brokers_down:
                log.warning("Kafka unavailable: all brokers down (%s); librdkafka keeps reconnecting",
                            err.str())
            self._all_brokers_down = True
            self.m.kafka_up.set(0)
        else:
            kafka_log.warning("%s", err.str())

    def _kafka_reachable(self) -> None:
        if self._all_brokers_down:
            log.info("Kafka available again")
        self._all_brokers_down = False
        self.m.kafka_up.set(1)

    def _on_revoke(self, consumer, partitions) -> None:
        if self.held is not None:
            msg = self.held[0]
            if any(p.topic == msg.topic() and p.partition == msg.partition() for p in partitions):
                log.info("partition %s/%d revoked while waiting for Label Studio; its new owner reads it",
                         msg.topic(), msg.partition())
                self.held = None
                consumer.resume(partitions)

    # ---------------------------------------------------------------------------------- loop
    def _loop(self) -> None:
        next_sync = 0.0
        next_stats = time.monotonic() + self.cfg.stats_interval
        next_prune = time.monotonic() + 60.0
        next_probe = 0.0
        while not self.stopping.is_set():
            self.producer.poll(0)
            self.scanner.poll(0)  # serves its log and error events (it is assigned only while scanning)
            if self.held is not None:
                if self.ls_backoff.ready():
                    msg, req = self.held
                    self._process(msg, req)
                else:
                    msg = self.consumer.poll(min(0.2, max(0.0, self.ls_backoff.retry_at - time.monotonic())))
                    if msg is not None and not msg.error():
                        # A partition assigned while waiting (rebalance) is not paused: read it later.
                        tp = TopicPartition(msg.topic(), msg.partition(), msg.offset())
                        self.consumer.pause([tp])
                        self.consumer.seek(tp)
            else:
                msg = self.consumer.poll(max(0.0, min(0.2, next_sync - time.monotonic())))
                if msg is not None:
                    self._on_message(msg)
            now = time.monotonic()
            if now >= next_sync and self.ls_backoff.ready() and self.kafka_backoff.ready():
                self._sync()
                next_sync = time.monotonic() + self.cfg.poll_interval
            if self._all_brokers_down and now >= next_probe:
                next_probe = now + 5.0
                try:
                    self.consumer.list_topics(self.cfg.requests_topic, timeout=2)
                    self._kafka_reachable()
                except KafkaException:
                    pass
            if now >= next_stats:
                next_stats = now + self.cfg.stats_interval
                log.info("stats: %s", self.m.summary())
            if now >= next_prune:
                next_prune = now + 3600.0
                n = self.state.prune(now_ms() - int(self.cfg.state_retention_days * 86400e3))
                if n:
                    log.info("forgot %d requests closed more than %g days ago", n,
                             self.cfg.state_retention_days)

    # ------------------------------------------------------------------------------ requests
    def _on_message(self, msg) -> None:
        if msg.error():
            if msg.error().code() != KafkaError._PARTITION_EOF:
                self.m.backend_errors.labels("kafka").inc()
                log.warning("requests topic: %s", msg.error().str())
            return
        self._kafka_reachable()
        self.m.requests_read.inc()
        where = f"{msg.topic()}/{msg.partition()}/{msg.offset()}"
        try:
            req = M.parse_request(msg.value())
        except M.BadMessage as e:
            self._skip(msg, e.reason, f"skipping requests message {where}: {e.reason}: {e.detail}",
                       logging.WARNING)
            return
        if self.cfg.instance_ids and req.instance_id not in self.cfg.instance_ids:
            self._skip(msg, "foreign_instance", f"skipping request {req.request_id} at {where}: from "
                       f"armd instance {req.instance_id!r}, not one of --instance-id", logging.INFO)
            return
        self._process(msg, req)

    def _skip(self, msg, reason: str, line: str, level: int) -> None:
        self.m.requests_skipped.labels(reason).inc()
        log.log(level, line)
        self.consumer.store_offsets(message=msg)

    def _process(self, msg, req: M.Request) -> None:
        where = f"{msg.topic()}/{msg.partition()}/{msg.offset()}"
        try:
            self._post(req, where)
            self._ls_ok()
        except (Unavailable, AuthError) as e:
            if self.held is None:
                self.consumer.pause(self.consumer.assignment())
            self.held = (msg, req)
            self._ls_down(e)
            return
        except LabelStudioError as e:
            log.error("Label Studio rejected the task for request %s (%s): %s", req.request_id, where, e)
            self.m.requests_skipped.labels("label_studio_rejected").inc()
        self.consumer.store_offsets(message=msg)
        if self.held is not None:
            self.held = None
            self.consumer.resume(self.consumer.assignment())

    def _post(self, req: M.Request, where: str) -> None:
        row = self.state.request(req.request_id)
        if row is not None and row.status != CREATING:
            self.m.requests_skipped.labels("duplicate").inc()
            log.info("request %s at %s already has a task", req.request_id, where)
            return
        if row is None and req.expires_at_ms <= now_ms():
            self.state.add_request(req.request_id, None, EXPIRED_UNPOSTED, req.labels_wanted,
                                   req.expires_at_ms, where)
            self.m.requests_skipped.labels("expired").inc()
            log.info("request %s at %s expired at %s before it was read: no task", req.request_id,
                     where, M.iso_utc(req.expires_at_ms))
            return
        self._ensure_overlap(req.labels_wanted)
        # Look the task up only when it may exist: a previous run began creating it, or the project
        # was adopted (its tasks were made by a bridge whose state is gone).
        existing = []
        if row is not None or self.adopted:
            existing = self.ls.tasks_for_request(self.project_id, req.request_id)
        if row is None:
            self.state.begin_request(req.request_id, req.labels_wanted, req.expires_at_ms, where)
        elif not existing and req.expires_at_ms <= now_ms():
            self.state.close_request(req.request_id, EXPIRED_UNPOSTED)
            self.m.requests_skipped.labels("expired").inc()
            return
        if existing:
            task_id = existing[0]
            for extra in existing[1:]:
                log.error("request %s has several tasks; deleting task %d", req.request_id, extra)
                self.ls.delete_task(extra)
            self.m.tasks_adopted.inc()
            log.info("request %s: task %d already in Label Studio (recorded now)", req.request_id,
                     task_id)
        else:
            data = M.task_data(req, self.cfg.text_field, self.cfg.prompt_field)
            task_id = self.ls.create_task(self.project_id, data, overlap=req.labels_wanted)
            self._fault("after-task-create")
            self.m.tasks_created.inc()
            log.debug("request %s -> task %d", req.request_id, task_id)
        self.state.finish_request(req.request_id, task_id)
        self.m.open_tasks.inc()

    def _ensure_overlap(self, labels_wanted: int) -> None:
        """Label Studio's queue gives a task to ``overlap`` distinct annotators (set per task); the
        project's ``maximum_annotations`` must be at least that for its breadth-first queue."""
        if labels_wanted <= self.max_annotations:
            return
        log.info("requests want %d labels each: project maximum_annotations %d -> %d", labels_wanted,
                 self.max_annotations, labels_wanted)
        self.ls.set_maximum_annotations(self.project_id, labels_wanted)
        # Label Studio then rewrites the overlap of existing tasks: put back each open task's own.
        for row in self.state.open_requests():
            if row.labels_wanted != labels_wanted:
                self.ls.set_overlap(row.task_id, row.labels_wanted)
        self.max_annotations = labels_wanted

    # -------------------------------------------------------------------------- annotations
    def _sync(self) -> None:
        try:
            self._send_pending()
            cutoff = now_ms()
            called = self._collect()
            self._send_pending()
            called = self._expire(cutoff) or called
            if called:  # only a call that succeeded tells that Label Studio is back
                self._ls_ok()
        except (Unavailable, AuthError) as e:
            self._ls_down(e)
        except LabelStudioError as e:
            log.error("Label Studio: %s", e)
            self._ls_down(e)
        except KafkaUnavailable as e:
            self.kafka_backoff.failure(e)
            self.m.backend_errors.labels("kafka").inc()
            return
        self.kafka_backoff.success()
        self.m.pending_labels.set(len(self.inflight))

    def _annotator(self, user_id) -> Optional[str]:
        if not isinstance(user_id, int):
            return None
        if self.cfg.annotator_id == "id":
            return f"ls-user-{user_id}"
        if user_id not in self.users:
            try:
                email = self.ls.user_email(user_id)
            except NotFound:
                email = None
            if not M.annotator_id_ok(email):
                return None
            self.users[user_id] = email
        return self.users[user_id]

    def _collect(self) -> bool:
        """Reads the submitted annotations of the open tasks and decides each new one; False when there
        was nothing to read (no call to Label Studio)."""
        rows = self.state.open_requests()
        self.m.open_tasks.set(len(rows))
        if not rows:
            return False
        by_task = {r.task_id: r for r in rows}
        fresh = []
        for task_id, anns in self.ls.annotated_tasks(self.project_id, min(by_task), max(by_task)):
            row = by_task.get(task_id)
            if row is None:
                continue
            for ann in anns:
                if ann.get("was_cancelled") or not isinstance(ann.get("id"), int):
                    continue
                if not self.state.has_annotation(ann["id"]):
                    fresh.append((M.answered_at_ms(ann) or now_ms(), ann["id"], row, ann))
        fresh.sort(key=lambda f: (f[0], f[1]))
        watermarks = None
        for answered, aid, row, ann in fresh:
            def record(status, reason, **kw):
                self.state.record_annotation(aid, row.task_id, row.request_id, status,
                                             answered_at_ms=answered, **kw)
                self.m.annotations_skipped.labels(reason).inc()
            if answered > row.expires_at_ms:
                log.info("annotation %d on task %d answered at %s, after request %s expired at %s: "
                         "not sent", aid, row.task_id, M.iso_utc(answered), row.request_id,
                         M.iso_utc(row.expires_at_ms))
                record("late", "late")
                continue
            outcome = M.outcome_from_result(ann.get("result"))
            if outcome is None:
                log.warning("annotation %d on task %d has no single A/B/Tie choice in %r: not sent",
                            aid, row.task_id, M.CHOICES_NAME)
                record("unreadable", "unreadable")
                continue
            annotator = self._annotator(ann.get("completed_by"))
            if annotator is None:
                log.warning("annotation %d on task %d: no usable annotator identity for user %r",
                            aid, row.task_id, ann.get("completed_by"))
                record("no_annotator", "no_annotator")
                continue
            accepted = self.state.accepted(row.request_id)
            if annotator in accepted:
                record("duplicate_annotator", "duplicate_annotator")
                continue
            if len(accepted) >= row.labels_wanted:
                record("surplus", "surplus")
                continue
            if watermarks is None:
                watermarks = self._label_end_offsets()
            self.state.record_annotation(aid, row.task_id, row.request_id, PENDING,
                                         annotator_id=annotator, outcome=outcome,
                                         answered_at_ms=answered, watermarks=watermarks)
        return True

    def _expire(self, cutoff_ms: int) -> bool:
        """Deletes the tasks of requests that expired before ``cutoff_ms``; True if there were any."""
        called = False
        for row in self.state.open_requests():
            if row.expires_at_ms >= cutoff_ms:
                continue
            called = True
            gone = not self.ls.delete_task(row.task_id)
            self.state.close_request(row.request_id, EXPIRED)
            self.m.tasks_expired.inc()
            self.m.open_tasks.dec()
            log.info("request %s expired at %s: task %d %s", row.request_id,
                     M.iso_utc(row.expires_at_ms), row.task_id,
                     "was already deleted" if gone else "deleted from the queue")
        return called

    # ------------------------------------------------------------------------------- labels
    def _label_partitions(self) -> List[int]:
        try:
            md = self.scanner.list_topics(self.cfg.labels_topic, timeout=10)
        except KafkaException as e:
            raise KafkaUnavailable(f"metadata of {self.cfg.labels_topic}: {e}") from None
        topic = md.topics.get(self.cfg.labels_topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise KafkaUnavailable(f"labels topic {self.cfg.labels_topic}: "
                                   f"{topic.error if topic is not None else 'missing'}")
        return sorted(topic.partitions)

    def _label_end_offsets(self) -> Dict[int, int]:
        out = {}
        for p in self._label_partitions():
            try:
                _, high = self.scanner.get_watermark_offsets(TopicPartition(self.cfg.labels_topic, p),
                                                             timeout=10, cached=False)
            except KafkaException as e:
                raise KafkaUnavailable(f"end offsets of {self.cfg.labels_topic}: {e}") from None
            out[p] = high
        return out

    def _published(self, rows: List, timeout: float = 60.0) -> Set[int]:
        """Which of these pending labels are already on the labels topic (read from the end offsets
        recorded before each was first sent)."""
        wanted = {r.annotation_id for r in rows}
        start: Dict[int, int] = {}
        for r in rows:
            for p, off in (r.watermarks or {}).items():
                start[p] = min(start.get(p, off), off)
        ends = self._label_end_offsets()
        assign = []
        for p, end in ends.items():
            begin = start.get(p, OFFSET_BEGINNING)  # a partition added since: read it all
            if end > 0 and (begin == OFFSET_BEGINNING or begin < end):
                assign.append(TopicPartition(self.cfg.labels_topic, p, begin))
        found: Set[int] = set()
        if not assign:
            return found
        try:
            return self._scan(assign, ends, wanted, timeout)
        except KafkaException as e:
            raise KafkaUnavailable(f"reading {self.cfg.labels_topic}: {e}") from None

    def _scan(self, assign, ends, wanted, timeout) -> Set[int]:
        found: Set[int] = set()
        self.scanner.assign(assign)
        remaining = {tp.partition for tp in assign}
        deadline = time.monotonic() + timeout
        try:
            while remaining:
                if time.monotonic() > deadline:
                    raise KafkaUnavailable(f"reading {self.cfg.labels_topic} to check {len(wanted)} "
                                           "uncertain labels timed out")
                msg = self.scanner.poll(0.5)
                if msg is None:
                    for p in list(remaining):
                        pos = self.scanner.position([TopicPartition(self.cfg.labels_topic, p)])[0].offset
                        if pos >= ends[p]:
                            remaining.discard(p)
                    continue
                if msg.error():
                    if msg.error().code() != KafkaError._PARTITION_EOF:
                        raise KafkaUnavailable(f"reading {self.cfg.labels_topic}: {msg.error().str()}")
                    continue
                aid = M.published_annotation(msg.value(), self.bridge_id)
                if aid in wanted:
                    found.add(aid)
                if msg.offset() + 1 >= ends[msg.partition()]:
                    remaining.discard(msg.partition())
        finally:
            self.scanner.unassign()
        return found

    def _send_pending(self) -> None:
        rows = [r for r in self.state.pending() if r.annotation_id not in self.inflight]
        if not rows:
            return
        uncertain = [r for r in rows if r.attempts > 0 and r.annotation_id not in self.absent]
        if uncertain:
            found = self._published(uncertain)
            if found:
                log.info("%d labels were already on %s (sent before a crash or an unconfirmed delivery): "
                         "not sending them again", len(found), self.cfg.labels_topic)
                self.state.mark_sent(found)
                self.m.labels_recovered.inc(len(found))
            self.absent.update(r.annotation_id for r in uncertain if r.annotation_id not in found)
            rows = [r for r in rows if r.annotation_id not in found]
        if not rows:
            return
        self.state.note_attempt(r.annotation_id for r in rows)
        for r in rows:
            label = M.label_message(r.request_id, r.outcome, r.annotator_id, bridge_id=self.bridge_id,
                                    project_id=self.project_id, task_id=r.task_id,
                                    annotation_id=r.annotation_id, answered_at_ms=r.answered_at_ms)
            # The Kafka timestamp is when the annotator answered, so armd judges expiry by that even
            # when the label reaches Kafka later (bridge or broker down meanwhile).
            ts = min(r.answered_at_ms or now_ms(), now_ms())
            try:
                self.producer.produce(self.cfg.labels_topic, key=r.request_id.encode(),
                                      value=json.dumps(label).encode(), timestamp=ts,
                                      on_delivery=lambda err, msg, aid=r.annotation_id:
                                      self._delivered(aid, err))
            except BufferError:
                self.producer.poll(1.0)
                break
            except KafkaException as e:
                raise KafkaUnavailable(f"producing to {self.cfg.labels_topic}: {e}") from None
            self.inflight[r.annotation_id] = f"{r.request_id} = {r.outcome!r} by {r.annotator_id}"
            self.absent.discard(r.annotation_id)
        self.producer.poll(0)

    def _delivered(self, annotation_id: int, err) -> None:
        what = self.inflight.pop(annotation_id, "?")
        if err is not None:
            self.m.send_failures.inc()
            self.m.backend_errors.labels("kafka").inc()
            log.warning("label for annotation %d not confirmed (%s); checked and resent", annotation_id,
                        err.str() if hasattr(err, "str") else err)
            return
        self._kafka_reachable()
        self._fault("after-label-delivered")
        self.state.mark_sent([annotation_id])
        self.m.labels_sent.inc()
        log.info("label sent: %s (annotation %d)", what, annotation_id)
        self.m.pending_labels.set(len(self.inflight))
