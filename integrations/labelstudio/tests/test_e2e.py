"""End to end with real parts: Apache Kafka, `armd run`, a Label Studio server, the bridge (as its CLI,
in a child process) and, in the first test, an annotator in headless Chromium.

Every test has its own topics, armd daemon, Label Studio project and annotators."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections import Counter

import pytest

import harness as H
from harness import wait_for

pytestmark = pytest.mark.e2e

DIM = 8
FIGURE = H.REPO / "docs" / "figures" / "labelstudio-task.png"
#: Set to 1 to refresh the checked-in screenshot docs/figures/labelstudio-task.png from the test run.
UPDATE_FIGURE_ENV = "ARMD_LS_UPDATE_FIGURE"


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def stack(brokers, armd_bin, tmp_path, cleanup, logs_on_failure):
    """stack(name, **armd_config) -> (topics, armd): fresh topics and a running armd daemon."""
    def start(name, **kw):
        t = H.create_topics(brokers, name)
        armd = H.Armd(armd_bin, brokers, t, tmp_path / "armd", DIM, instance=f"ls-{name}", **kw)
        cleanup(armd.stop)
        logs_on_failure(armd.log)
        return t, armd
    return start


@pytest.fixture
def bridge(brokers, label_studio, tmp_path, cleanup, logs_on_failure):
    """bridge(topics, **kw) -> a running `armd-labelstudio` with a project of its own."""
    def start(t, **kw):
        title = kw.pop("title", f"armd e2e {uuid.uuid4().hex[:8]}")
        b = H.BridgeProcess(tmp_path, label_studio, brokers, t, title, **kw)
        b.title = title
        cleanup(b.kill)
        logs_on_failure(b.log)
        return b
    return start


def requests_on(brokers, topic, instance=None):
    out = []
    for m in H.read_topic(brokers, topic):
        try:
            r = json.loads(m.value())
        except (TypeError, ValueError):
            continue
        if isinstance(r, dict) and r.get("schema") == "armd.request.v1" and \
                (instance is None or r.get("instance_id") == instance):
            out.append(r)
    return out


def settled_requests(brokers, topic, at_least, quiet=2.5, timeout=60):
    """armd's requests once at least ``at_least`` were issued and none came for ``quiet`` seconds
    (armd issues what its in-flight budget and the pool allow, then waits for labels)."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while True:
        reqs = requests_on(brokers, topic)
        if last is None or len(reqs) != len(last):
            last, since = reqs, time.monotonic()
        elif len(reqs) >= at_least and time.monotonic() - since >= quiet:
            return reqs
        assert time.monotonic() < deadline, f"{len(reqs)} requests on {topic}, expected >= {at_least}"
        time.sleep(0.5)


def task_requests(ls, project_id):
    """armd request id of every task in the project (a list: duplicates would show)."""
    return [t["data"].get("armd_request_id") for t in ls.tasks(project_id)]


def wait_metric(armd_or_bridge, series, pred, timeout=60):
    return wait_for(f"{series} to satisfy the condition",
                    lambda: pred(armd_or_bridge.metric(series)) or None, timeout,
                    detail=lambda: f"last value {armd_or_bridge.metric(series)}")


# --------------------------------------------------------------------------------------------------

def browser_login(driver, url: str, email: str, password: str, attempts: int = 3) -> None:
    """Logs in through Label Studio's login form. On a loaded machine a submit can land before the page
    is ready and be lost (seen once in CI: the page stayed on /user/login for 120 s), so each attempt
    waits for the page to load, submits with Enter, and a lost submit is retried."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    for _ in range(attempts):
        driver.get(f"{url}/user/login/")
        WebDriverWait(driver, 60).until(
            lambda d: d.execute_script("return document.readyState") == "complete")
        for name, value in (("email", email), ("password", password)):
            field = driver.find_element(By.NAME, name)
            field.clear()
            field.send_keys(value)
        driver.find_element(By.NAME, "password").send_keys(Keys.RETURN)
        try:
            WebDriverWait(driver, 45).until(lambda d: "/user/login" not in d.current_url)
            return
        except TimeoutException:
            continue
    raise AssertionError(f"login as {email} failed {attempts} times; still at {driver.current_url}")


def test_annotator_in_chromium_answers_and_the_label_reaches_armd(
        stack, bridge, brokers, label_studio, browser_paths, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    # Pairs within a prompt (the prompt above, two answers to it side by side).
    t, armd = stack("browser", candidates="within")
    H.produce(brokers, t.responses, H.Responses(DIM).batch(4, 4))
    reqs = wait_for("armd's first requests", lambda: requests_on(brokers, t.requests), 60)
    b = bridge(t, extra=["--annotator-id", "email"], title="armd comparisons")
    pid = label_studio.project_id(b.title)
    wait_for("a task per request", lambda: len(task_requests(label_studio, pid)) >= len(reqs), 60)
    applied_before = armd.metric("armd_labels_applied_total")
    assert applied_before == 0

    email, password = f"ann-{uuid.uuid4().hex[:6]}@example.com", uuid.uuid4().hex
    label_studio.signup(email, password)

    chromium, chromedriver = browser_paths
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1400,900", "--lang=en-US"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(chromedriver), options=opts)
    try:
        driver.set_page_load_timeout(120)
        wait = WebDriverWait(driver, 120)
        browser_login(driver, label_studio.url, email, password)
        # "Label All Tasks": the label stream hands out the next task of the queue.
        driver.get(f"{label_studio.url}/projects/{pid}/data?labeling=1")
        close = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "button[aria-label='Close modal']")))
        assert "Read the prompt and the two responses" in driver.find_element(By.TAG_NAME, "body").text
        close.click()
        radio_a = wait.until(EC.element_to_be_clickable(
            (By.XPATH, "//input[@type='radio' and @name='A']/ancestor::label[1]")))
        page = driver.find_element(By.TAG_NAME, "body").text
        for header in ("Prompt", "Response A", "Response B", "Which response is better?"):
            assert header in page
        # The page shows exactly one of armd's requests: its prompt and both responses' texts.
        shown = [r for r in reqs if r["a"]["metadata"]["text"] in page and
                 r["b"]["metadata"]["text"] in page and r["a"]["metadata"]["prompt"] in page]
        assert len(shown) == 1, f"page does not show exactly one request: {page[:2000]}"
        req = shown[0]
        assert page.index(req["a"]["metadata"]["text"]) < page.index(req["b"]["metadata"]["text"])
        radio_a.click()
        submit = driver.find_element(By.CSS_SELECTOR, "button[data-testid='bottombar-submit-button']")
        wait.until(lambda d: submit.is_enabled() and submit.get_attribute("disabled") is None)
        time.sleep(0.5)  # let the button's colour transition finish before the screenshot
        shot = tmp_path / "labelstudio-task.png"
        assert driver.save_screenshot(str(shot))
        submit.click()
        labels = wait_for("the label on the labels topic", lambda: H.read_labels(brokers, t.labels), 60)
    finally:
        driver.quit()

    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20000
    if os.environ.get(UPDATE_FIGURE_ENV):
        FIGURE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, FIGURE)

    assert len(labels) == 1
    label = labels[0]
    assert label["schema"] == "armd.label.v1"
    assert label["request_id"] == req["request_id"]
    assert label["outcome"] == "a"
    assert label["annotator_id"] == email
    wait_metric(armd, "armd_labels_applied_total", lambda v: v == applied_before + 1)
    time.sleep(2)  # nothing else arrives
    assert armd.metric("armd_labels_applied_total") == applied_before + 1
    assert len(H.read_labels(brokers, t.labels)) == 1
    assert b.metric("armd_labelstudio_labels_sent_total") == 1


# --------------------------------------------------------------------------------------------------

def test_restarts_and_crashes_create_no_duplicate_task_and_send_no_duplicate_label(
        stack, bridge, brokers, label_studio):
    # Two labels per request (from distinct annotators), pairs across prompts.
    t, armd = stack("restart", labels_per_request=2, max_in_flight=8, batch_size=4)
    H.produce(brokers, t.responses, H.Responses(DIM).batch(4, 4))
    reqs = settled_requests(brokers, t.requests, 4)
    n = len(reqs)
    # Bad and foreign messages on the requests topic: skipped and counted, never a crash.
    foreign = dict(json.loads(json.dumps(requests_on(brokers, t.requests)[0])),
                   instance_id="other-armd", request_id="other-armd-3-00000000000000ff")
    H.produce(brokers, t.requests, [
        ("k", b""), ("k", None), ("k", b"\xff\xfe"), ("k", b"{oops"),
        ("k", json.dumps({"schema": "armd.label.v1", "request_id": "x", "outcome": "a"}).encode()),
        ("k", json.dumps({"schema": "armd.request.v1", "request_id": "y"}).encode()),
        ("k", json.dumps(foreign).encode())])
    assert len(requests_on(brokers, t.requests, instance="ls-restart")) == n
    assert all(r["labels_wanted"] == 2 for r in reqs)
    ids = {r["request_id"] for r in reqs}

    # 1. Crash right after Label Studio created the 3rd task, before the bridge recorded it.
    b = bridge(t, extra=["--instance-id", "ls-restart"],
               env={"ARMD_LABELSTUDIO_FAULT": "after-task-create:3"}, wait_ready=False)
    assert b.wait_exit(120) == 86, b.log_text()[-3000:]
    pid = label_studio.project_id(b.title)
    assert len(task_requests(label_studio, pid)) == 3
    b.start()
    wait_for("one task per request", lambda: sorted(task_requests(label_studio, pid)) == sorted(ids), 60,
             detail=lambda: str(Counter(task_requests(label_studio, pid))))
    wait_metric(b, "armd_labelstudio_tasks_adopted_total", lambda v: v == 1)
    wait_metric(b, 'armd_labelstudio_requests_skipped_total{reason="foreign_instance"}', lambda v: v == 1)
    for reason, count in (("empty_payload", 2), ("invalid_utf8", 1), ("invalid_json", 1),
                          ("unsupported_schema", 1), ("missing_field", 1)):
        assert b.metric(f'armd_labelstudio_requests_skipped_total{{reason="{reason}"}}') == count, reason
    assert b.metric("armd_labelstudio_tasks_created_total") == n - 3
    assert "skipping requests message" in b.log_text()

    ann1, ann2, ann3 = (label_studio.signup(f"{n}-{uuid.uuid4().hex[:6]}@example.com", uuid.uuid4().hex)
                        for n in ("ann1", "ann2", "ann3"))
    by_task = {tk["id"]: tk["data"]["armd_request_id"] for tk in label_studio.tasks(pid)}
    answers = []  # (request id, annotator email, outcome)

    def answer(who, choice):
        task = label_studio.next_task(pid, who)
        assert task is not None, f"{who.email} has an empty queue"
        r = label_studio.annotate(task["id"], who, choice)
        assert r.status_code == 201, r.text
        answers.append((by_task[task["id"]], who.email, {"A": "a", "B": "b", "Tie": "tie"}[choice]))
        return task["id"]

    # 2. Crash right after the broker confirmed the 2nd label, before the bridge recorded it as sent.
    b.stop()
    first = [answer(ann1, c) for c in ("A", "B", "A")]
    b.start(env={"ARMD_LABELSTUDIO_FAULT": "after-label-delivered:2"})
    assert b.wait_exit(60) == 86, b.log_text()[-3000:]
    b.start()
    wait_for("ann1's 3 labels", lambda: len(H.read_labels(brokers, t.labels)) >= 3, 60)
    time.sleep(2)
    assert len(H.read_labels(brokers, t.labels)) == 3, "a label was sent twice"
    assert b.metric("armd_labelstudio_labels_recovered_total") >= 1

    # 3. Several annotators per task: the queue gives ann2 the tasks ann1 answered (2 labels wanted),
    # and ann3 none of those that have their two answers.
    second = [answer(ann2, "B"), answer(ann2, "Tie")]
    assert len(set(second)) == 2 and set(second) <= set(first), (first, second)
    b.kill()  # kill -9 mid-stream
    third = answer(ann3, "B")
    assert third not in second
    assert third in first
    b.start()

    wait_for("6 labels", lambda: len(H.read_labels(brokers, t.labels)) >= 6, 60)
    wait_metric(armd, "armd_labels_applied_total", lambda v: v == 6)
    time.sleep(3)
    labels = H.read_labels(brokers, t.labels)
    sent = Counter((lb["request_id"], lb["annotator_id"], lb["outcome"]) for lb in labels)
    assert sent == Counter(answers), f"labels {sent} vs answers {answers}"
    assert len(labels) == 6
    assert armd.metric("armd_labels_applied_total") == 6
    assert armd.metric('armd_labels_rejected_total{reason="duplicate_label"}') == 0
    # Still exactly one task per request after all the restarts.
    assert sorted(task_requests(label_studio, pid)) == sorted(ids)
    # The two fully answered requests are done: nobody gets them anymore.
    for who in (ann1, ann2, ann3):
        nxt = label_studio.next_task(pid, who)
        assert nxt is None or nxt["id"] not in first, who.email


# --------------------------------------------------------------------------------------------------

def test_expired_requests_leave_the_queue_and_late_answers_are_not_sent(
        stack, bridge, brokers, label_studio):
    ttl = 20
    t, armd = stack("expiry", ttl_secs=ttl, max_in_flight=4, batch_size=4)
    H.produce(brokers, t.responses, H.Responses(DIM).batch(4, 4))
    batch = wait_for("armd's first 4 requests", lambda: (lambda r: r if len(r) >= 4 else None)(
        requests_on(brokers, t.requests)), 60)[:4]
    b = bridge(t)
    pid = label_studio.project_id(b.title)
    first_ids = {r["request_id"] for r in batch}
    wait_for("the first batch's tasks", lambda: first_ids <= set(task_requests(label_studio, pid)), 60)
    ann = label_studio.signup(f"ann-{uuid.uuid4().hex[:6]}@example.com", uuid.uuid4().hex)

    # In time: answered and applied.
    task = label_studio.next_task(pid, ann)
    timely = task["data"]["armd_request_id"]
    assert label_studio.annotate(task["id"], ann, "B").status_code == 201
    wait_metric(armd, "armd_labels_applied_total", lambda v: v == 1)

    # Late: the bridge is down, the request expires, the annotator answers anyway.
    assert b.stop() == 0
    late_task = next(tk for tk in label_studio.tasks(pid)
                     if tk["data"]["armd_request_id"] in first_ids - {timely})
    late = late_task["data"]["armd_request_id"]
    expires = late_task["data"]["expires_at_ms"]
    assert expires == next(r["expires_at_ms"] for r in batch if r["request_id"] == late)
    time.sleep(max(0.0, (expires - now_ms()) / 1000) + 1.0)
    assert label_studio.annotate(late_task["id"], ann, "A").status_code == 201
    b.start()
    # Every expired request of the first batch has left the queue (its task is deleted) ...
    expired = first_ids - {timely}
    wait_for("expired tasks to be deleted",
             lambda: not (expired & set(task_requests(label_studio, pid))), 30)
    time.sleep(2)
    # ... and the late answer was never sent.
    labels = H.read_labels(brokers, t.labels)
    assert [lb["request_id"] for lb in labels] == [timely]
    wait_metric(b, 'armd_labelstudio_annotations_skipped_total{reason="late"}', lambda v: v == 1)
    assert "not sent" in b.log_text()
    assert armd.metric("armd_labels_applied_total") == 1
    assert armd.metric('armd_labels_rejected_total{reason="expired_request"}') == 0

    # While the bridge runs: armd issues new requests as the first ones expired; each of their
    # tasks leaves the queue when it expires too, and the queue never hands out an expired task.
    new = wait_for("a request issued after the first batch", lambda: [
        tk for tk in label_studio.tasks(pid) if tk["data"]["armd_request_id"] not in first_ids], 60)
    watched = {tk["data"]["armd_request_id"]: tk["data"]["expires_at_ms"] for tk in new}
    last = max(watched.values())
    deadline = time.monotonic() + ttl + 30
    while now_ms() < last + 1500:
        nxt = label_studio.next_task(pid, ann)
        if nxt is not None:
            assert nxt["data"]["expires_at_ms"] > now_ms() - 1500, "the queue handed out an expired task"
        assert time.monotonic() < deadline
        time.sleep(1.0)
    wait_for("the new requests' tasks to be deleted at their expiry",
             lambda: not (set(watched) & set(task_requests(label_studio, pid))), 15)
    assert [lb["request_id"] for lb in H.read_labels(brokers, t.labels)] == [timely]


# --------------------------------------------------------------------------------------------------

def test_label_studio_outage_is_waited_out_without_losing_a_request(stack, bridge, brokers, label_studio):
    t, armd = stack("outage", max_in_flight=16, batch_size=4)
    proxy = H.TcpProxy(label_studio.port)  # Label Studio as the bridge sees it: down for now
    H.produce(brokers, t.responses, H.Responses(DIM).batch(4, 4))
    n = len(settled_requests(brokers, t.requests, 4))
    b = bridge(t, ls_url=f"http://127.0.0.1:{proxy.port}")
    wait_for("the bridge to report Label Studio unavailable",
             lambda: "Label Studio unavailable" in b.log_text(), 30)
    assert b.metric("armd_labelstudio_label_studio_up") == 0
    time.sleep(3)
    assert b.proc.poll() is None, "the bridge gave up"

    proxy.up()
    wait_metric(b, "armd_labelstudio_tasks_created_total", lambda v: v == n, timeout=60)
    assert "Label Studio available again" in b.log_text()
    pid = label_studio.project_id(b.title)
    ann = label_studio.signup(f"ann-{uuid.uuid4().hex[:6]}@example.com", uuid.uuid4().hex)

    # Down again mid-stream: new requests arrive and an annotator answers (on Label Studio directly).
    proxy.down()
    H.produce(brokers, t.responses, H.Responses(DIM, seed=11, first_prompt=4).batch(4, 4))
    settled_requests(brokers, t.requests, n + 2)
    task = label_studio.next_task(pid, ann)
    assert label_studio.annotate(task["id"], ann, "Tie").status_code == 201
    wait_metric(b, "armd_labelstudio_label_studio_up", lambda v: v == 0, timeout=30)
    assert H.read_labels(brokers, t.labels) == []

    proxy.up()
    ids = sorted(r["request_id"] for r in requests_on(brokers, t.requests))
    wait_for("one task per request after the outage",
             lambda: sorted(task_requests(label_studio, pid)) == ids, 60,
             detail=lambda: f"{Counter(task_requests(label_studio, pid))} vs {len(ids)} requests")
    labels = wait_for("the answer given during the outage", lambda: H.read_labels(brokers, t.labels), 30)
    assert [(lb["request_id"], lb["outcome"]) for lb in labels] == [(task["data"]["armd_request_id"], "tie")]
    wait_metric(armd, "armd_labels_applied_total", lambda v: v == 1)
    assert b.metric('armd_labelstudio_backend_errors_total{backend="label_studio"}') >= 2
    proxy.down()


# --------------------------------------------------------------------------------------------------

def test_kafka_unreachable_at_start_is_waited_out(bridge, brokers, label_studio):
    t = H.create_topics(brokers, "kafkadown")
    host, port = brokers.rsplit(":", 1)
    proxy = H.TcpProxy(int(port))  # the bootstrap address the bridge is given: nothing listens yet
    b = bridge(t, extra=["--brokers", f"127.0.0.1:{proxy.port}"])
    wait_for("the bridge to report Kafka unavailable",
             lambda: "Kafka unavailable" in b.log_text(), 60, detail=lambda: b.log_text()[-2000:])
    assert b.metric("armd_labelstudio_kafka_up") == 0
    # A request written meanwhile (by hand, as armd would) is bridged once Kafka is reachable.
    t0 = now_ms()
    req = {"schema": "armd.request.v1", "request_id": "kd-0-00000000000000aa", "instance_id": "kd",
           "sequence": 0, "strategy": "random", "gain": 0.0, "predicted_p": 0.5, "model_version": 0,
           "labels_wanted": 1, "issued_at_ms": t0, "expires_at_ms": t0 + 300_000,
           "a": {"prompt_id": "p", "response_id": "p/a", "embedding_b64": "",
                 "metadata": {"prompt": "Say hi.", "text": "Hi!"}},
           "b": {"prompt_id": "p", "response_id": "p/b", "embedding_b64": "",
                 "metadata": {"prompt": "Say hi.", "text": "Hello there."}}}
    H.produce(brokers, t.requests, [(req["request_id"], json.dumps(req).encode())])
    time.sleep(2)
    assert b.proc.poll() is None, "the bridge gave up"
    proxy.up()
    pid = label_studio.project_id(b.title)
    wait_for("the task", lambda: task_requests(label_studio, pid) == [req["request_id"]], 60,
             detail=lambda: b.log_text()[-2000:])
    assert "Kafka available again" in b.log_text()
    wait_metric(b, "armd_labelstudio_kafka_up", lambda v: v == 1)
    ann = label_studio.signup(f"ann-{uuid.uuid4().hex[:6]}@example.com", uuid.uuid4().hex)
    task = label_studio.next_task(pid, ann)
    assert (task["data"]["text_a"], task["data"]["text_b"]) == ("Hi!", "Hello there.")
    assert label_studio.annotate(task["id"], ann, "B").status_code == 201
    labels = wait_for("the label", lambda: H.read_labels(brokers, t.labels), 30)
    assert [(lb["request_id"], lb["outcome"], lb["annotator_id"]) for lb in labels] == \
        [(req["request_id"], "b", ann.email)]
    proxy.down()
