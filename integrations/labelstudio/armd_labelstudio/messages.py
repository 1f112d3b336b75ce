"""armd's messages as the bridge reads and writes them, and their mapping to Label Studio tasks.

Pure functions, no I/O: validation of ``armd.request.v1``, the task data shown to annotators, the
outcome read back from an annotation, and the ``armd.label.v1`` message sent to the labels topic.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

REQUEST_SCHEMA = "armd.request.v1"
LABEL_SCHEMA = "armd.label.v1"
#: armd rejects ids (request, annotator) longer than this many UTF-8 bytes, or empty.
MAX_ID_BYTES = 256
#: Name of the Choices control in the comparison template, and its values -> armd outcomes.
CHOICES_NAME = "preference"
CHOICE_OUTCOMES = {"A": "a", "B": "b", "Tie": "tie"}
#: At most this much of a response's metadata is shown when it has no text field.
METADATA_PREVIEW_CHARS = 2000


class BadMessage(Exception):
    """A requests-topic message the bridge cannot use; ``reason`` is the counter label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Side:
    prompt_id: str
    response_id: str
    metadata: Optional[dict]


@dataclass(frozen=True)
class Request:
    request_id: str
    instance_id: str
    a: Side
    b: Side
    labels_wanted: int
    issued_at_ms: int
    expires_at_ms: int


def _field(obj: Mapping[str, Any], name: str, kind, where: str = ""):
    if name not in obj:
        raise BadMessage("missing_field", f"missing field `{where}{name}`")
    value = obj[name]
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if not ok:
        raise BadMessage("wrong_type", f"`{where}{name}` has the wrong type ({type(value).__name__})")
    return value


def _id(obj: Mapping[str, Any], name: str, where: str = "") -> str:
    value = _field(obj, name, str, where)
    n = len(value.encode("utf-8"))
    if n == 0 or n > MAX_ID_BYTES:
        raise BadMessage("invalid_value", f"`{where}{name}` is {n} bytes (1..{MAX_ID_BYTES} allowed)")
    return value


def _side(req: Mapping[str, Any], name: str) -> Side:
    side = _field(req, name, dict)
    where = f"{name}."
    meta = side.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise BadMessage("wrong_type", f"`{where}metadata` must be an object")
    return Side(_id(side, "prompt_id", where), _id(side, "response_id", where), meta)


def parse_request(payload: Optional[bytes]) -> Request:
    """Validates one message of armd's requests topic.

    Reads the fields the bridge uses and checks their types; other fields (the embeddings, the
    strategy, the gain, ...) are ignored, so a future armd that adds a field to ``armd.request.v1``
    does not stop the bridge. Raises :class:`BadMessage` with a reason code.
    """
    if not payload:
        raise BadMessage("empty_payload", "message has no value")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadMessage("invalid_utf8", str(e)) from None
    try:
        req = json.loads(text)
    except ValueError as e:
        raise BadMessage("invalid_json", str(e)) from None
    if not isinstance(req, dict):
        raise BadMessage("wrong_type", f"a request is a JSON object, got {type(req).__name__}")
    schema = req.get("schema")
    if schema != REQUEST_SCHEMA:
        raise BadMessage("unsupported_schema", f"schema is {schema!r}, expected {REQUEST_SCHEMA!r}")
    request_id = _id(req, "request_id")
    instance_id = _id(req, "instance_id")
    a, b = _side(req, "a"), _side(req, "b")
    labels_wanted = _field(req, "labels_wanted", int)
    if labels_wanted < 1:
        raise BadMessage("invalid_value", f"`labels_wanted` is {labels_wanted}")
    issued = _field(req, "issued_at_ms", int)
    expires = _field(req, "expires_at_ms", int)
    if expires < issued:
        raise BadMessage("invalid_value", "`expires_at_ms` is before `issued_at_ms`")
    return Request(request_id, instance_id, a, b, labels_wanted, issued, expires)


# ------------------------------------------------------------------------------------------ task data


def lookup(metadata: Optional[Mapping[str, Any]], path: str) -> Optional[str]:
    """The value at a dotted ``path`` in a response's metadata as text, or None when absent/empty."""
    value: Any = metadata
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    if value is None:
        return None
    if not isinstance(value, str):
        value = json.dumps(value, ensure_ascii=False)
    return value if value.strip() else None


def missing_text(side: Side, text_field: str) -> str:
    """What the task shows for a response whose metadata has no text."""
    out = f"[no text: response {side.response_id} has no metadata.{text_field}]"
    if side.metadata:
        preview = json.dumps(side.metadata, ensure_ascii=False, sort_keys=True)
        if len(preview) > METADATA_PREVIEW_CHARS:
            preview = preview[:METADATA_PREVIEW_CHARS] + "…"
        out += f"\nmetadata: {preview}"
    return out


def _prompt_text(side: Side, prompt_field: str) -> Optional[str]:
    return lookup(side.metadata, prompt_field)


def _missing_prompt(prompt_id: str, prompt_field: str) -> str:
    return f"[no prompt text: prompt {prompt_id}; set metadata.{prompt_field} on its responses]"


def iso_utc(ms: int) -> str:
    return _dt.datetime.fromtimestamp(ms / 1000, tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def task_data(req: Request, text_field: str = "text", prompt_field: str = "prompt") -> dict:
    """The Label Studio task data for a request (the fields the comparison template shows).

    ``prompt`` is shown above the two responses. When a and b answer different prompts (armd's
    default ``selection.candidates = "cross"``), ``prompt`` says so and ``prompt_a`` / ``prompt_b``
    show each prompt above its response; otherwise those two are empty.
    """
    text_a = lookup(req.a.metadata, text_field) or missing_text(req.a, text_field)
    text_b = lookup(req.b.metadata, text_field) or missing_text(req.b, text_field)
    pa, pb = _prompt_text(req.a, prompt_field), _prompt_text(req.b, prompt_field)
    if req.a.prompt_id == req.b.prompt_id:
        prompt = pa or pb or _missing_prompt(req.a.prompt_id, prompt_field)
        prompt_a = prompt_b = ""
    else:
        prompt = "A and B answer different prompts: each prompt is shown above its response."
        prompt_a = "Prompt: " + (pa or _missing_prompt(req.a.prompt_id, prompt_field))
        prompt_b = "Prompt: " + (pb or _missing_prompt(req.b.prompt_id, prompt_field))
    return {
        "armd_request_id": req.request_id,
        "prompt": prompt,
        "prompt_a": prompt_a,
        "prompt_b": prompt_b,
        "text_a": text_a,
        "text_b": text_b,
        "response_a": req.a.response_id,
        "response_b": req.b.response_id,
        "labels_wanted": req.labels_wanted,
        "expires_at": iso_utc(req.expires_at_ms),
        "expires_at_ms": req.expires_at_ms,
    }


# ------------------------------------------------------------------------------------- annotations


def outcome_from_result(result: Any, choices_name: str = CHOICES_NAME) -> Optional[str]:
    """armd's outcome (``"a"``, ``"b"``, ``"tie"``) from an annotation's ``result``, or None when it has
    no single recognised choice in the ``preference`` control."""
    if not isinstance(result, list):
        return None
    found = None
    for item in result:
        if not isinstance(item, dict) or item.get("from_name") != choices_name:
            continue
        choices = (item.get("value") or {}).get("choices")
        if not isinstance(choices, list) or len(choices) != 1:
            return None
        outcome = CHOICE_OUTCOMES.get(choices[0])
        if outcome is None or (found is not None and found != outcome):
            return None
        found = outcome
    return found


def parse_ls_time_ms(value: Any) -> Optional[int]:
    """Milliseconds since the epoch of a Label Studio timestamp (ISO 8601 string or datetime)."""
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        dt = value
    elif isinstance(value, str):
        try:
            dt = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    else:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=_dt.timezone.utc)
    return int(math.floor(dt.timestamp() * 1000))


def answered_at_ms(annotation: Mapping[str, Any]) -> Optional[int]:
    """When the annotator gave this answer: the later of the annotation's creation and last update
    (a skipped task answered later keeps its creation time), so lateness is never underestimated."""
    times = [t for t in (parse_ls_time_ms(annotation.get("created_at")),
                         parse_ls_time_ms(annotation.get("updated_at"))) if t is not None]
    return max(times) if times else None


def annotator_id_ok(annotator_id: Optional[str]) -> bool:
    return bool(annotator_id) and len(annotator_id.encode("utf-8")) <= MAX_ID_BYTES


def label_message(request_id: str, outcome: str, annotator_id: str, *, bridge_id: str,
                  project_id: int, task_id: int, annotation_id: int, answered_at_ms: int) -> dict:
    """The ``armd.label.v1`` message for one annotation. ``metadata`` (accepted and ignored by armd)
    records where the label came from; the bridge uses it to find labels it already published."""
    if outcome not in ("a", "b", "tie"):
        raise ValueError(f"outcome {outcome!r}")
    if not annotator_id_ok(annotator_id):
        raise ValueError(f"annotator id {annotator_id!r}")
    return {
        "schema": LABEL_SCHEMA,
        "request_id": request_id,
        "outcome": outcome,
        "annotator_id": annotator_id,
        "metadata": {
            "source": "label-studio",
            "bridge_id": bridge_id,
            "ls_project_id": project_id,
            "ls_task_id": task_id,
            "ls_annotation_id": annotation_id,
            "answered_at_ms": answered_at_ms,
        },
    }


def published_annotation(payload: Optional[bytes], bridge_id: str) -> Optional[int]:
    """The Label Studio annotation id of a labels-topic message this bridge published, else None."""
    if not payload:
        return None
    try:
        msg = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(msg, dict) or msg.get("schema") != LABEL_SCHEMA:
        return None
    meta = msg.get("metadata")
    if not isinstance(meta, dict) or meta.get("bridge_id") != bridge_id:
        return None
    ann = meta.get("ls_annotation_id")
    return ann if isinstance(ann, int) and not isinstance(ann, bool) else None
