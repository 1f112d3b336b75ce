"""The bridge's counters (Prometheus text format on ``--metrics-listen``, and a summary log line)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics

disable_created_metrics()  # no *_created series next to each counter

P = "armd_labelstudio_"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests_read = Counter(P + "requests_read", "Messages read from the requests topic.",
                                     registry=r)
        self.requests_skipped = Counter(
            P + "requests_skipped", "Requests-topic messages that got no task, by reason "
            "(bad input: empty_payload, invalid_utf8, invalid_json, unsupported_schema, missing_field, "
            "wrong_type, invalid_value; foreign_instance; duplicate; expired; label_studio_rejected).",
            ["reason"], registry=r)
        self.tasks_created = Counter(P + "tasks_created", "Label Studio tasks created.", registry=r)
        self.tasks_adopted = Counter(
            P + "tasks_adopted", "Requests whose task already existed in Label Studio (a restart after "
            "the task was created but before it was recorded).", registry=r)
        self.tasks_expired = Counter(P + "tasks_expired", "Tasks removed from Label Studio because their "
                                     "request expired.", registry=r)
        self.labels_sent = Counter(P + "labels_sent", "Labels the broker confirmed on the labels topic.",
                                   registry=r)
        self.labels_recovered = Counter(
            P + "labels_recovered", "Labels found already published when their delivery was uncertain "
            "(crash or broker error after sending): not sent again.", registry=r)
        self.annotations_skipped = Counter(
            P + "annotations_skipped", "Submitted annotations not sent as labels, by reason (late: "
            "answered after the request expired; surplus: the request had all its labels; "
            "duplicate_annotator; unreadable: no single A/B/Tie choice; no_annotator).",
            ["reason"], registry=r)
        self.send_failures = Counter(P + "send_failures", "Label deliveries the producer reported as "
                                     "failed (retried).", registry=r)
        self.backend_errors = Counter(P + "backend_errors", "Errors talking to a backend, by backend "
                                      "(label_studio, kafka).", ["backend"], registry=r)
        self.open_tasks = Gauge(P + "open_tasks", "Tasks in the annotators' queue that the bridge watches.",
                                registry=r)
        self.pending_labels = Gauge(P + "pending_labels", "Labels sent but not yet confirmed.", registry=r)
        self.label_studio_up = Gauge(P + "label_studio_up", "1 when the last Label Studio call succeeded.",
                                     registry=r)
        self.kafka_up = Gauge(P + "kafka_up", "0 while librdkafka reports all brokers down.", registry=r)
        for reason in ("empty_payload", "invalid_utf8", "invalid_json", "unsupported_schema",
                       "missing_field", "wrong_type", "invalid_value", "foreign_instance", "duplicate",
                       "expired", "label_studio_rejected"):
            self.requests_skipped.labels(reason)
        for reason in ("late", "surplus", "duplicate_annotator", "unreadable", "no_annotator"):
            self.annotations_skipped.labels(reason)
        for backend in ("label_studio", "kafka"):
            self.backend_errors.labels(backend)
        self.kafka_up.set(1)

    def value(self, name: str, **labels) -> float:
        """The current value of one series (``name`` without the prefix; counters without ``_total``)."""
        full = P + name
        for metric in self.registry.collect():
            for s in metric.samples:
                if s.name in (full, full + "_total") and s.labels == labels:
                    return s.value
        raise KeyError(name)

    def summary(self) -> str:
        def total(name):
            return int(sum(s.value for m in self.registry.collect() for s in m.samples
                           if s.name == P + name + "_total"))
        return (f"requests read {total('requests_read')}, tasks created {total('tasks_created')}, "
                f"skipped {total('requests_skipped')}, expired {total('tasks_expired')}, labels sent "
                f"{total('labels_sent')}, annotations not sent {total('annotations_skipped')}, "
                f"open tasks {int(self.open_tasks._value.get())}")
