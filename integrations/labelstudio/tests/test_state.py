"""The bridge's durable state (SQLite): what a restart relies on."""

import sqlite3

import pytest

from armd_labelstudio.state import CREATING, DONE, EXPIRED, OPEN, PENDING, SENT, State, now_ms


def test_identity_and_project_survive_a_reopen(tmp_path):
    s = State(str(tmp_path))
    bid = s.bridge_id
    assert len(bid) == 32
    s.set_meta("project_id", "4")
    s.close()
    s = State(str(tmp_path))
    assert s.bridge_id == bid
    assert s.get_meta("project_id") == "4"


def test_request_task_map_is_durable_without_a_clean_close(tmp_path):
    s = State(str(tmp_path))
    s.add_request("r1", 10, OPEN, 1, now_ms() + 60000, "t/0/5")
    s.add_request("r2", 11, OPEN, 2, now_ms() + 60000, "t/0/6")
    # No close(): a second connection (another process after a crash) sees every committed step.
    other = State(str(tmp_path))
    assert other.request("r1").task_id == 10
    assert [r.request_id for r in other.open_requests()] == ["r1", "r2"]
    assert other.request("nope") is None
    with pytest.raises(sqlite3.IntegrityError):
        other.add_request("r1", 12, OPEN, 1, 0, "t/0/7")  # one task per request
    with pytest.raises(sqlite3.IntegrityError):
        other.add_request("r3", 10, OPEN, 1, 0, "t/0/8")  # one request per task


def test_a_request_is_done_once_its_labels_are_sent(tmp_path):
    s = State(str(tmp_path))
    s.add_request("r", 1, OPEN, 2, now_ms() + 60000, "x")
    s.record_annotation(100, 1, "r", PENDING, annotator_id="ann-1", outcome="a", answered_at_ms=1,
                        watermarks={0: 17})
    s.record_annotation(101, 1, "r", PENDING, annotator_id="ann-2", outcome="b", answered_at_ms=2,
                        watermarks={0: 18})
    s.record_annotation(102, 1, "r", "late", answered_at_ms=3)
    assert s.accepted("r") == ["ann-1", "ann-2"]
    assert s.has_annotation(102) and not s.has_annotation(103)
    pend = s.pending()
    assert [(p.annotation_id, p.watermarks, p.attempts) for p in pend] == [(100, {0: 17}, 0),
                                                                          (101, {0: 18}, 0)]
    s.note_attempt([100])
    assert s.pending()[0].attempts == 1
    s.mark_sent([100])
    assert s.request("r").status == OPEN and s.sent_count("r") == 1
    s.mark_sent([101])
    assert s.request("r").status == DONE and s.sent_count("r") == 2
    s.mark_sent([101])  # a second confirmation changes nothing
    assert s.count_annotations(SENT) == 2 and s.pending() == []


def test_expired_requests_stay_closed_even_when_a_pending_label_is_confirmed(tmp_path):
    s = State(str(tmp_path))
    s.add_request("r", 1, OPEN, 1, now_ms() + 60000, "x")
    s.record_annotation(5, 1, "r", PENDING, annotator_id="a", outcome="a", answered_at_ms=1,
                        watermarks={0: 0})
    s.close_request("r", EXPIRED)
    s.mark_sent([5])
    assert s.request("r").status == EXPIRED
    assert s.open_requests() == []


def test_prune_forgets_old_closed_requests_only(tmp_path):
    s = State(str(tmp_path))
    s.add_request("open", 1, OPEN, 1, 0, "x")
    s.add_request("done", 2, OPEN, 1, 0, "x")
    s.add_request("pending", 3, OPEN, 1, 0, "x")
    s.record_annotation(1, 2, "done", PENDING, annotator_id="a", outcome="a", answered_at_ms=0,
                        watermarks={})
    s.mark_sent([1])
    s.record_annotation(2, 3, "pending", PENDING, annotator_id="a", outcome="a", answered_at_ms=0,
                        watermarks={})
    s.close_request("pending", EXPIRED)
    assert s.prune(now_ms() + 1000) == 1
    assert s.request("done") is None and not s.has_annotation(1)
    assert s.request("open") is not None
    assert s.request("pending") is not None and s.has_annotation(2)  # its label is still unconfirmed


def test_a_task_being_created_is_remembered_and_not_open_until_recorded(tmp_path):
    s = State(str(tmp_path))
    s.begin_request("r", 2, now_ms() + 60000, "t/0/1")
    after_crash = State(str(tmp_path))
    row = after_crash.request("r")
    assert (row.status, row.task_id) == (CREATING, None)
    assert after_crash.open_requests() == []
    after_crash.finish_request("r", 42)
    row = after_crash.request("r")
    assert (row.status, row.task_id, row.labels_wanted) == (OPEN, 42, 2)
    assert [r.request_id for r in after_crash.open_requests()] == ["r"]
    assert after_crash.prune(now_ms() + 1000) == 0
