"""Real parts for the end-to-end tests: a Kafka broker, `armd run`, a Label Studio server, the bridge
as a child process, annotators (signed up through Label Studio's own sign-up form) and helpers to read
topics and metrics."""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import requests
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

HERE = Path(__file__).resolve().parent
PACKAGE_DIR = HERE.parent
REPO = PACKAGE_DIR.parent.parent


def required() -> bool:
    """Missing tools fail the tests (instead of skipping them) under CI and the repository's runners."""
    return bool(os.environ.get("CI") or os.environ.get("ARMD_REQUIRE_TOOLS"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, fn: Callable[[], object], timeout: float, interval: float = 0.25,
             detail: Callable[[], str] = lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}. {detail()}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------- Kafka

@dataclass
class Topics:
    responses: str
    requests: str
    labels: str
    models: str
    dead_letter: str


def create_topics(brokers: str, name: str) -> Topics:
    prefix = f"ls-{name}-{uuid.uuid4().hex[:8]}"
    t = Topics(*(f"{prefix}.{k}" for k in ("responses", "requests", "labels", "models", "dead-letter")))
    admin = AdminClient({"bootstrap.servers": brokers})
    parts = {t.responses: 2, t.requests: 1, t.labels: 1, t.models: 1, t.dead_letter: 1}
    futures = admin.create_topics([NewTopic(n, p, 1) for n, p in parts.items()])
    for f in futures.values():
        f.result(30)
    return t


def read_topic(brokers: str, topic: str, timeout: float = 20.0) -> List:
    """Every message of a topic (all partitions, from the beginning to the current end)."""
    c = Consumer({"bootstrap.servers": brokers, "group.id": f"reader-{uuid.uuid4().hex}",
                  "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    try:
        md = c.list_topics(topic, timeout=10)
        parts = sorted(md.topics[topic].partitions)
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1]
                for p in parts}
        todo = {p for p, e in ends.items() if e > 0}
        if not todo:
            return []
        c.assign([TopicPartition(topic, p, 0) for p in todo])
        out = []
        deadline = time.monotonic() + timeout
        while todo:
            assert time.monotonic() < deadline, f"reading {topic} timed out"
            m = c.poll(0.5)
            if m is None or m.error():
                continue
            out.append(m)
            if m.offset() + 1 >= ends[m.partition()]:
                todo.discard(m.partition())
        return out
    finally:
        c.close()


def read_json(brokers: str, topic: str) -> List[dict]:
    return [json.loads(m.value()) for m in read_topic(brokers, topic)]


def read_labels(brokers: str, topic: str) -> List[dict]:
    """The labels on armd's labels topic: its messages without the armd.scaler.v1 proposals armd itself
    writes there (the group's feature scaling)."""
    return [m for m in read_json(brokers, topic) if m.get("schema") != "armd.scaler.v1"]


def produce(brokers: str, topic: str, items: List[tuple]) -> None:
    """items: (key, value bytes or None)."""
    p = Producer({"bootstrap.servers": brokers, "linger.ms": 5})
    for key, value in items:
        p.produce(topic, key=key, value=value)
    assert p.flush(30) == 0


PROMPTS = [
    ("Explain in one sentence why the sky is blue.",
     ["Sunlight scatters off air molecules, and blue light, with its shorter wavelength, scatters the "
      "most, so the sky looks blue from every direction.",
      "Because the ocean reflects onto it.",
      "Rayleigh scattering: air scatters short (blue) wavelengths of sunlight far more than long "
      "(red) ones.",
      "The sky is blue because blue is the color of air."]),
    ("Give a short tip for writing clear commit messages.",
     ["Start with a short imperative summary line (under about 50 characters), then explain why the "
      "change was made in the body.",
      "Write whatever you like; nobody reads them.",
      "Say what changed and why, in the present tense, one logical change per commit.",
      "Use emojis so the log looks lively."]),
    ("What is a good first step when a service is slow in production?",
     ["Measure before changing anything: look at latency percentiles and find where the time goes.",
      "Restart it and hope.",
      "Check the dashboards for saturation (CPU, memory, I/O, queue depth) and recent deploys.",
      "Rewrite it in another language."]),
    ("Summarize what a reward model does in RLHF.",
     ["It scores a response to a prompt with a number that predicts how much people would prefer it, "
      "and the policy is then trained to earn higher scores.",
      "It gives the model a reward when it compiles.",
      "A reward model learns human preferences from comparisons, so it can rank new responses.",
      "It is the model that writes the prompts."]),
]


class Responses:
    """armd.response.v1 messages with short real texts (``metadata.text``) and prompts
    (``metadata.prompt``); ``first_prompt`` numbers the prompts of this batch on."""

    def __init__(self, dim: int, seed: int = 7, first_prompt: int = 0):
        self.dim = dim
        self.rng = random.Random(seed)
        self.prompt = first_prompt

    def batch(self, n_prompts: int, per: int) -> List[tuple]:
        out = []
        for _ in range(n_prompts):
            k = self.prompt
            self.prompt += 1
            prompt, answers = PROMPTS[k % len(PROMPTS)]
            prompt_id = f"prompt-{k}"
            centre = [self.rng.uniform(-1, 1) for _ in range(self.dim)]
            for j in range(per):
                x = [20.0 + 4.0 * (c + self.rng.uniform(-1, 1)) for c in centre]
                emb = base64.b64encode(struct.pack(f"<{len(x)}f", *x)).decode()
                meta = {"prompt": prompt, "text": answers[j % len(answers)], "model": "demo"}
                msg = {"schema": "armd.response.v1", "prompt_id": prompt_id,
                       "response_id": f"{prompt_id}/r{j}", "embedding_b64": emb, "metadata": meta}
                out.append((prompt_id, json.dumps(msg).encode()))
        return out


# ----------------------------------------------------------------------------------------------- armd

def armd_config(brokers: str, t: Topics, state: Path, dim: int, port: int, *, instance: str,
                ttl_secs: int = 300, labels_per_request: int = 1, candidates: str = "cross",
                max_in_flight: int = 8, batch_size: int = 4) -> str:
    return f"""
[daemon]
instance_id = "{instance}"
[kafka]
brokers = "{brokers}"
group_id = "{instance}-{t.responses}"
stats_interval_ms = 500
[kafka.topics]
responses = "{t.responses}"
requests = "{t.requests}"
labels = "{t.labels}"
models = "{t.models}"
dead_letter = "{t.dead_letter}"
[model]
dim = {dim}
warmup_samples = 16
refit_every = 40
prior_precision = 1.0
[selection]
batch_size = {batch_size}
max_in_flight = {max_in_flight}
round_interval_ms = 100
min_pool = 8
candidates = "{candidates}"
request_ttl_secs = {ttl_secs}
expiry_grace_secs = 60
labels_per_request = {labels_per_request}
[checkpoint]
path = "{state / 'armd.ckpt'}"
every_labels = 5
every_secs = 1
[export]
dir = "{state / 'model'}"
every_labels = 10
[http]
listen = "127.0.0.1:{port}"
[log]
level = "armd=info,warn"
"""


class Armd:
    def __init__(self, binary: str, brokers: str, t: Topics, state: Path, dim: int, **kw):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        state.mkdir(parents=True, exist_ok=True)
        self.config = state / "armd.toml"
        self.config.write_text(armd_config(brokers, t, state, dim, self.port, **kw))
        self.log = state / "armd.log"
        self.proc = subprocess.Popen([binary, "run", "--config", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        wait_for("armd /readyz", lambda: self._get("/readyz")[0] == 200, 60,
                 detail=lambda: self.log_text()[-2000:])

    def _get(self, path: str):
        try:
            with urllib.request.urlopen(self.base + path, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, ""
        except OSError:
            return 0, ""

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def metrics(self) -> str:
        status, text = self._get("/metrics")
        assert status == 200, f"armd /metrics answered {status}"
        return text

    def metric(self, series: str) -> float:
        """Value of one series (exact name with labels, e.g. 'armd_labels_rejected_total{reason="x"}');
        0 when absent."""
        for line in self.metrics().splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------------------- Label Studio

def ls_version() -> str:
    from importlib.metadata import version
    return version("label-studio")


def label_studio_bin() -> str:
    exe = Path(sys.executable).with_name("label-studio")
    return str(exe) if exe.exists() else (shutil.which("label-studio") or "label-studio")


def migrated_template(log_dir: Path) -> Path:
    """A migrated, empty Label Studio SQLite database, built once per Label Studio version (its ~150
    migrations take a minute on two cores) and copied into each test server's own data directory."""
    cache = Path(os.environ.get("ARMD_LS_TEMPLATE_CACHE",
                                Path.home() / ".cache" / "armd" / "labelstudio-template"))
    target = cache / ls_version() / "label_studio.sqlite3"
    if target.exists():
        return target
    tmp = cache / f"build-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    env = dict(os.environ, LABEL_STUDIO_BASE_DATA_DIR=str(tmp))
    with open(log_dir / "label-studio-init.log", "ab") as log:
        subprocess.run([label_studio_bin(), "init", "-q", "--no-browser", "--data-dir", str(tmp)],
                       env=env, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=900,
                       stdin=subprocess.DEVNULL)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp / "label_studio.sqlite3", str(target) + ".tmp")
    os.replace(str(target) + ".tmp", target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass
class Annotator:
    email: str
    password: str
    token: str  # legacy API token (for API-driven answers in tests)
    user_id: int


class LabelStudioServer:
    ADMIN = "admin@example.com"

    def __init__(self, workdir: Path):
        self.data = workdir / "ls-data"
        self.data.mkdir(parents=True)
        shutil.copyfile(migrated_template(workdir), self.data / "label_studio.sqlite3")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_password = uuid.uuid4().hex
        self.legacy_token = uuid.uuid4().hex
        self.log = workdir / "label-studio.log"
        env = dict(os.environ, LABEL_STUDIO_BASE_DATA_DIR=str(self.data), LOG_LEVEL="WARNING",
                   DEBUG="false", SENTRY_DSN="", FRONTEND_SENTRY_DSN="")
        env.pop("LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK", None)
        self.proc = subprocess.Popen(
            [label_studio_bin(), "start", "--no-browser", "--data-dir", str(self.data),
             "--port", str(self.port), "--host", self.url, "--internal-host", "127.0.0.1",
             "--username", self.ADMIN, "--password", self.admin_password,
             "--user-token", self.legacy_token, "--enable-legacy-api-token", "--log-level", "WARNING"],
            env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        wait_for("Label Studio to answer /health", self._healthy, 240,
                 detail=lambda: self.log.read_text(errors="replace")[-3000:])
        # A personal access token (JWT refresh token), what recent Label Studio versions hand out:
        # the bridge is run with this one.
        r = requests.post(f"{self.url}/api/token/", headers=self.admin_headers, timeout=30)
        r.raise_for_status()
        self.personal_token = r.json()["token"]

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"label-studio exited ({self.proc.returncode}): "
                                 f"{self.log.read_text(errors='replace')[-3000:]}")
        try:
            return requests.get(f"{self.url}/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    @property
    def admin_headers(self) -> Dict[str, str]:
        return {"Authorization": f"Token {self.legacy_token}"}

    def api(self, method: str, path: str, token: Optional[str] = None, **kw):
        headers = {"Authorization": f"Token {token or self.legacy_token}"}
        r = requests.request(method, self.url + path, headers=headers, timeout=30, **kw)
        return r

    def signup(self, email: str, password: str) -> Annotator:
        """Signs up an annotator through Label Studio's own sign-up form (a new user joins the
        organization), and fetches their API token."""
        s = requests.Session()
        s.get(f"{self.url}/user/signup/", timeout=30).raise_for_status()
        r = s.post(f"{self.url}/user/signup/", timeout=30, allow_redirects=False,
                   data={"email": email, "password": password,
                         "csrfmiddlewaretoken": s.cookies.get("csrftoken")},
                   headers={"Referer": f"{self.url}/user/signup/"})
        assert r.status_code == 302, f"sign-up of {email} failed: {r.status_code} {r.text[:500]}"
        me = s.get(f"{self.url}/api/current-user/whoami", timeout=30).json()
        token = s.get(f"{self.url}/api/current-user/token", timeout=30).json()["token"]
        return Annotator(email, password, token, me["id"])

    def project_id(self, title: str, timeout: float = 60) -> int:
        """The id of the one project with this title (waits for the bridge to create it)."""
        def ids():
            r = self.api("GET", "/api/projects/", params={"title": title, "page_size": 100})
            r.raise_for_status()
            return [p["id"] for p in r.json()["results"] if p["title"] == title]
        found = wait_for(f"project {title!r}", ids, timeout)
        assert len(found) == 1, f"projects titled {title!r}: {found}"
        return found[0]

    def tasks(self, project_id: int) -> List[dict]:
        out, page = [], 1
        while True:
            params = {"project": project_id, "page": page, "page_size": 100, "fields": "all"}
            r = self.api("GET", "/api/tasks/", params=params)
            for _ in range(10):
                # Label Studio 1.23 answers 500 (KeyError in data_manager/api.py) when a task is deleted
                # between its id query and its fetch, as the bridge does at expiry: ask again.
                if r.status_code != 500:
                    break
                time.sleep(0.2)
                r = self.api("GET", "/api/tasks/", params=params)
            if r.status_code == 404:
                return out
            r.raise_for_status()
            body = r.json()
            out += body["tasks"]
            if len(out) >= body["total"]:
                return out
            page += 1

    def next_task(self, project_id: int, who: Annotator) -> Optional[dict]:
        """What the label stream ("Label All Tasks") gives this annotator next, or None when their
        queue is empty."""
        r = self.api("GET", f"/api/projects/{project_id}/next", token=who.token)
        if r.status_code == 404:
            return None
        r.raise_for_status()
        return r.json()

    def annotate(self, task_id: int, who: Annotator, choice: str) -> requests.Response:
        return self.api("POST", f"/api/tasks/{task_id}/annotations/", token=who.token, json={
            "result": [{"from_name": "preference", "to_name": "text_a", "type": "choices",
                        "value": {"choices": [choice]}}]})

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class TcpProxy:
    """A TCP forwarder on a fixed local port that can be switched off (listener closed and every
    connection cut) and on again: Label Studio "going down" for the bridge without stopping it."""

    def __init__(self, target_port: int):
        self.port = free_port()
        self.target = target_port
        self.listener: Optional[socket.socket] = None
        self.conns: List[socket.socket] = []
        self.lock = threading.Lock()

    def up(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def down(self) -> None:
        s, self.listener = self.listener, None
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass
            s.close()
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, s: socket.socket) -> None:
        while True:
            try:
                client, _ = s.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            for x in (a, b):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# --------------------------------------------------------------------------------------------- bridge

class BridgeProcess:
    """`armd-labelstudio` as a child process (as an operator runs it)."""

    def __init__(self, workdir: Path, ls: LabelStudioServer, brokers: str, t: Topics, title: str,
                 *, api_key: Optional[str] = None, extra: List[str] = (), env: Dict[str, str] = None,
                 ls_url: Optional[str] = None, wait_ready: bool = True):
        self.metrics_port = free_port()
        self.state = workdir / "bridge-state"
        self.log = workdir / "bridge.log"
        # The installed command when there is one (ci.sh installs the package), else the module.
        script = Path(sys.executable).with_name("armd-labelstudio")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "armd_labelstudio"]
        self.args = [*command, "--brokers", brokers,
                     "--requests-topic", t.requests, "--labels-topic", t.labels,
                     "--group", f"bridge-{t.requests}", "--ls-url", ls_url or ls.url, "--project-title", title,
                     "--state-dir", str(self.state), "--poll-interval", "0.5",
                     "--metrics-listen", f"127.0.0.1:{self.metrics_port}", "--max-backoff", "2",
                     *extra]
        self.env = dict(os.environ, LABEL_STUDIO_API_KEY=api_key or ls.personal_token)
        self.proc: Optional[subprocess.Popen] = None
        self.start(env=env, wait_ready=wait_ready)

    def start(self, env: Dict[str, str] = None, wait_ready: bool = True) -> None:
        """Starts the bridge (``env`` is added for this run only) and waits for its metrics endpoint."""
        assert self.proc is None or self.proc.poll() is not None
        with open(self.log, "ab") as f:
            f.write(f"---- start {env or ''} ----\n".encode())
        self.proc = subprocess.Popen(self.args, env=dict(self.env, **(env or {})),
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"),
                                     stdin=subprocess.DEVNULL)
        if wait_ready:
            wait_for("bridge metrics endpoint", lambda: self._metrics_text() is not None, 60,
                     detail=lambda: self.log_text()[-3000:])

    def _metrics_text(self) -> Optional[str]:
        if self.proc.poll() is not None:
            raise AssertionError(f"bridge exited ({self.proc.returncode}): {self.log_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
                return r.read().decode()
        except OSError:
            return None

    def metric(self, series: str) -> float:
        text = self._metrics_text() or ""
        for line in text.splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
        return 0.0

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_exit(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        return self.proc.returncode if self.proc else 0

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
