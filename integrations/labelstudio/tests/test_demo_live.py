"""`armd demo --label-studio URL`: the demo's requests answered by a person in Label Studio.

Runs the real `armd demo` (ARMD_BIN) in live mode against the test's Label Studio server; the demo
starts the bridge itself (the installed `armd-labelstudio`) on its in-process mock Kafka cluster, so
this test needs no broker. An annotator answers tasks through the Label Studio API as they appear,
picking the response whose text states the higher hidden score, until 3 labels are submitted."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import harness as H
from harness import wait_for

pytestmark = pytest.mark.e2e

TEXT = re.compile(r"^Synthetic response (p\d+-r\d+)\. Its hidden quality score is (-?\d+\.\d\d) "
                  r"\(higher is better\)\.$")
PROMPT = re.compile(r"^(Prompt: )?Synthetic prompt p\d+ \(armd demo: .*Choose the response with the "
                    r"higher score")
URL = re.compile(r"Label Studio project: (http\S+/projects/(\d+)/data)")

SMALL = """
[data]
n_prompts = 40
responses_per_prompt = 4
dim = 8
latent_dim = 4
[daemon]
warmup_samples = 32
batch_size = 2
max_in_flight = 4
refit_every = 40
[run]
label_budget = 3
eval_every = 2
"""


def bridge_command() -> str:
    script = Path(sys.executable).with_name("armd-labelstudio")
    assert script.exists(), f"{script} missing: run the tests through integrations/labelstudio/ci.sh"
    return str(script)


def test_demo_live_mode_sends_its_requests_to_label_studio(armd_bin, label_studio, tmp_path, cleanup,
                                                            logs_on_failure):
    cfg = tmp_path / "demo.toml"
    cfg.write_text(SMALL)
    out = tmp_path / "demo-out"
    log = tmp_path / "demo.log"
    logs_on_failure(log)
    proc = subprocess.Popen(
        [armd_bin, "demo", "--config", str(cfg), "--out-dir", str(out), "--labels", "3",
         "--metrics-listen", "127.0.0.1:0", "--label-studio", label_studio.url,
         "--label-studio-token", label_studio.personal_token,
         "--label-studio-bridge", bridge_command()],
        stdout=subprocess.PIPE, stderr=open(log, "wb"), stdin=subprocess.DEVNULL, text=True)

    def stop():
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    cleanup(stop)

    def log_text():
        return log.read_text(errors="replace")

    def project():
        assert proc.poll() is None, f"armd demo exited ({proc.returncode}): {log_text()[-3000:]}"
        return URL.search(log_text())

    m = wait_for("the demo to print the Label Studio project URL", project, 120,
                 detail=lambda: log_text()[-3000:])
    assert m.group(1).startswith(label_studio.url)
    pid = int(m.group(2))
    # The bridge's output is streamed, prefixed.
    assert "[armd-labelstudio] " in log_text()

    ann = label_studio.signup(f"demo-{uuid.uuid4().hex[:6]}@example.com", uuid.uuid4().hex)
    shown, answered = [], []
    deadline = time.monotonic() + 180
    while len(answered) < 3:
        assert proc.poll() is None, f"armd demo exited early ({proc.returncode}): {log_text()[-3000:]}"
        assert time.monotonic() < deadline, f"answered {len(answered)} tasks: {log_text()[-3000:]}"
        task = label_studio.next_task(pid, ann)
        if task is None:
            time.sleep(0.5)
            continue
        data = task["data"]
        shown.append(data)
        ta, tb = TEXT.match(data["text_a"]), TEXT.match(data["text_b"])
        assert ta and tb, f"task texts are not the synthetic ones: {data}"
        assert (ta.group(1), tb.group(1)) == (data["response_a"], data["response_b"])
        prompts = [data["prompt_a"], data["prompt_b"]] if data["prompt_a"] else [data["prompt"]]
        for p in prompts:
            assert PROMPT.match(p), f"task prompt is not the synthetic one: {p!r}"
        choice = "A" if float(ta.group(2)) >= float(tb.group(2)) else "B"
        r = label_studio.annotate(task["id"], ann, choice)
        assert r.status_code == 201, r.text
        answered.append(choice)

    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"armd demo exit {proc.returncode}: {log_text()[-3000:]}"
    summary = (out / "summary.txt").read_text()
    assert summary in stdout
    assert "labels applied by armd: 3 of 3" in summary, summary
    # armd's curve only: one run row, no random baseline.
    rows = [line.split() for line in summary.splitlines()
            if line.startswith(("armd ", "random ")) and not line.startswith("armd demo")]
    assert [r[0] for r in rows] == ["armd"], summary
    assert rows[0][2:4] == ["3", "3"], summary  # labels sent, applied
    assert (out / "spearman.svg").exists() and (out / "curves.csv").exists()
    # The bridge was stopped with the demo.
    assert "stopped: " in log_text()
    assert len(shown) == 3
