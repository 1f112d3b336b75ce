"""Mapping between armd's messages and Label Studio tasks/annotations (no I/O)."""

import json

import pytest

from armd_labelstudio import messages as M
from armd_labelstudio.template import LABEL_CONFIG

# The request of README.md "Messages", as armd writes it.
README_REQUEST = {
    "schema": "armd.request.v1", "request_id": "armd-0-42-9f3c2a1b4d5e6f70", "instance_id": "armd-0",
    "sequence": 42,
    "a": {"prompt_id": "p-17", "response_id": "p-17/r-3",
          "metadata": {"prompt": "Name a prime.", "text": "Seven."}, "embedding_b64": "AACAPwAAAEA="},
    "b": {"prompt_id": "p-17", "response_id": "p-17/r-1", "embedding_b64": "AACAPwAAAEA="},
    "strategy": "targeted-info", "gain": 0.031, "predicted_p": 0.62, "model_version": 1234,
    "labels_wanted": 2, "issued_at_ms": 1764180000000, "expires_at_ms": 1764180600000,
}


def enc(obj) -> bytes:
    return json.dumps(obj).encode()


def with_(**changes):
    req = json.loads(json.dumps(README_REQUEST))
    for k, v in changes.items():
        if v is ...:
            del req[k]
        else:
            req[k] = v
    return req


def test_parses_armd_request():
    r = M.parse_request(enc(README_REQUEST))
    assert r.request_id == "armd-0-42-9f3c2a1b4d5e6f70"
    assert r.instance_id == "armd-0"
    assert r.labels_wanted == 2
    assert r.expires_at_ms == 1764180600000
    assert r.a.response_id == "p-17/r-3" and r.a.metadata["text"] == "Seven."
    assert r.b.metadata is None


def test_extra_fields_are_ignored():
    r = M.parse_request(enc(with_(something_new=[1, 2])))
    assert r.request_id == README_REQUEST["request_id"]


@pytest.mark.parametrize("payload, reason", [
    (None, "empty_payload"),
    (b"", "empty_payload"),
    (b"\xff\xfe", "invalid_utf8"),
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "wrong_type"),
    (enc(with_(schema="armd.request.v2")), "unsupported_schema"),
    (enc({"schema": "armd.label.v1", "request_id": "x", "outcome": "a"}), "unsupported_schema"),
    (enc(with_(schema=...)), "unsupported_schema"),
    (enc(with_(request_id=...)), "missing_field"),
    (enc(with_(a=...)), "missing_field"),
    (enc(with_(expires_at_ms=...)), "missing_field"),
    (enc(with_(labels_wanted="2")), "wrong_type"),
    (enc(with_(labels_wanted=True)), "wrong_type"),
    (enc(with_(labels_wanted=0)), "invalid_value"),
    (enc(with_(expires_at_ms=1.5)), "wrong_type"),
    (enc(with_(expires_at_ms=1)), "invalid_value"),
    (enc(with_(request_id="")), "invalid_value"),
    (enc(with_(request_id="x" * 257)), "invalid_value"),
    (enc(with_(a={"prompt_id": "p", "response_id": 3})), "wrong_type"),
    (enc(with_(b={"prompt_id": "p", "response_id": "r", "metadata": [1]})), "wrong_type"),
])
def test_bad_requests_are_rejected_with_a_reason(payload, reason):
    with pytest.raises(M.BadMessage) as e:
        M.parse_request(payload)
    assert e.value.reason == reason


def test_task_data_same_prompt_shows_it_once_above_both_texts():
    req = M.parse_request(enc(with_(b={"prompt_id": "p-17", "response_id": "p-17/r-1",
                                       "metadata": {"text": "Nine."}})))
    d = M.task_data(req)
    assert d["armd_request_id"] == req.request_id
    assert d["prompt"] == "Name a prime."  # from a's metadata; b has none
    assert d["prompt_a"] == d["prompt_b"] == ""
    assert (d["text_a"], d["text_b"]) == ("Seven.", "Nine.")
    assert d["expires_at"] == "2025-11-26 18:10:00 UTC"


def test_task_data_different_prompts_shows_each_above_its_response():
    req = M.parse_request(enc(with_(b={"prompt_id": "p-90", "response_id": "p-90/r-1",
                                       "metadata": {"prompt": "Name a colour.", "text": "Blue."}})))
    d = M.task_data(req)
    assert "different prompts" in d["prompt"]
    assert d["prompt_a"] == "Prompt: Name a prime."
    assert d["prompt_b"] == "Prompt: Name a colour."
    assert d["text_b"] == "Blue."


def test_missing_text_says_which_field_to_set_and_shows_the_metadata():
    req = M.parse_request(enc(with_(b={"prompt_id": "p-17", "response_id": "p-17/r-1",
                                       "metadata": {"model": "gemma-2b", "tokens": 17}})))
    d = M.task_data(req)
    assert d["text_b"].startswith("[no text: response p-17/r-1 has no metadata.text]")
    assert '"model": "gemma-2b"' in d["text_b"] and '"tokens": 17' in d["text_b"]
    # No metadata at all, and no prompt text anywhere.
    req = M.parse_request(enc(with_(a={"prompt_id": "p-17", "response_id": "p-17/r-3"},
                                    b={"prompt_id": "p-17", "response_id": "p-17/r-1"})))
    d = M.task_data(req)
    assert d["text_a"] == "[no text: response p-17/r-3 has no metadata.text]"
    assert d["prompt"] == "[no prompt text: prompt p-17; set metadata.prompt on its responses]"


def test_text_and_prompt_fields_are_configurable_dotted_paths():
    req = M.parse_request(enc(with_(
        a={"prompt_id": "p", "response_id": "r1",
           "metadata": {"gen": {"output": "Hello"}, "q": {"text": "Greet me"}}},
        b={"prompt_id": "p", "response_id": "r2", "metadata": {"gen": {"output": 42}}})))
    d = M.task_data(req, text_field="gen.output", prompt_field="q.text")
    assert (d["text_a"], d["text_b"], d["prompt"]) == ("Hello", "42", "Greet me")
    d = M.task_data(req, text_field="gen.missing")
    assert d["text_a"].startswith("[no text: response r1 has no metadata.gen.missing]")


def test_long_metadata_preview_is_truncated():
    req = M.parse_request(enc(with_(a={"prompt_id": "p", "response_id": "r",
                                       "metadata": {"blob": "x" * 10000}})))
    text = M.task_data(req)["text_a"]
    assert len(text) < M.METADATA_PREVIEW_CHARS + 200 and text.endswith("…")


def choice(value, name="preference"):
    return {"from_name": name, "to_name": "text_a", "type": "choices", "value": {"choices": [value]}}


def test_outcome_from_annotation_result():
    assert M.outcome_from_result([choice("A")]) == "a"
    assert M.outcome_from_result([choice("B")]) == "b"
    assert M.outcome_from_result([choice("Tie")]) == "tie"
    assert M.outcome_from_result([choice("A", "comment"), choice("B")]) == "b"
    assert M.outcome_from_result([]) is None
    assert M.outcome_from_result(None) is None
    assert M.outcome_from_result([choice("Maybe")]) is None
    assert M.outcome_from_result([choice("A"), choice("B")]) is None
    two = {"from_name": "preference", "value": {"choices": ["A", "B"]}}
    assert M.outcome_from_result([two]) is None


def test_template_matches_the_mapping():
    # The template's control and choice values are what outcome_from_result reads, and it shows every
    # task data field the bridge fills for annotators.
    assert f'<Choices name="{M.CHOICES_NAME}"' in LABEL_CONFIG
    for value in M.CHOICE_OUTCOMES:
        assert f'<Choice value="{value}"' in LABEL_CONFIG
    for key in ("prompt", "prompt_a", "prompt_b", "text_a", "text_b"):
        assert f'value="${key}"' in LABEL_CONFIG
    assert 'required="true"' in LABEL_CONFIG


def test_answer_time_is_the_later_of_creation_and_update():
    ann = {"created_at": "2026-01-01T00:00:00.000Z", "updated_at": "2026-01-01T00:00:05.250000Z"}
    assert M.answered_at_ms(ann) == 1767225605250
    assert M.answered_at_ms({"created_at": "2026-01-01T00:00:00+00:00"}) == 1767225600000
    assert M.answered_at_ms({}) is None
    assert M.parse_ls_time_ms("garbage") is None


# armd's label schema (src/daemon/messages.rs, RawLabel with deny_unknown_fields).
LABEL_FIELDS = {"schema", "request_id", "outcome", "annotator_id", "metadata"}


def test_label_message_is_an_armd_label():
    msg = M.label_message("armd-0-42-9f3c2a1b4d5e6f70", "tie", "ann@example.com", bridge_id="b1",
                          project_id=3, task_id=7, annotation_id=11, answered_at_ms=5)
    assert set(msg) <= LABEL_FIELDS
    assert msg["schema"] == "armd.label.v1"
    assert (msg["request_id"], msg["outcome"], msg["annotator_id"]) == \
        ("armd-0-42-9f3c2a1b4d5e6f70", "tie", "ann@example.com")
    assert isinstance(msg["metadata"], dict)
    raw = json.dumps(msg).encode()
    assert M.published_annotation(raw, "b1") == 11
    assert M.published_annotation(raw, "another-bridge") is None
    assert M.published_annotation(b"not json", "b1") is None
    assert M.published_annotation(None, "b1") is None
    with pytest.raises(ValueError):
        M.label_message("r", "maybe", "ann", bridge_id="b", project_id=1, task_id=1, annotation_id=1,
                        answered_at_ms=1)
    with pytest.raises(ValueError):
        M.label_message("r", "a", "x" * 300, bridge_id="b", project_id=1, task_id=1, annotation_id=1,
                        answered_at_ms=1)
