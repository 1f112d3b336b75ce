"""Fixtures of the end-to-end tests: one Kafka broker, one Label Studio server and one Chromium
driver per session; an armd daemon, topics and a bridge per test.

Environment:
  ARMD_TEST_BROKERS   a running Kafka broker (else one is started with the repository's .ci/kafka.sh)
  ARMD_BIN            the armd binary (a build of this repository)
  ARMD_CHROMIUM, ARMD_CHROMEDRIVER   default /usr/bin/chromium, /usr/bin/chromedriver
  CI / ARMD_REQUIRE_TOOLS            when set, a missing tool fails the tests instead of skipping them
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402


def _missing(what: str):
    if H.required():
        pytest.fail(f"{what} (required under CI / ARMD_REQUIRE_TOOLS)", pytrace=False)
    pytest.skip(what)


@pytest.fixture(scope="session")
def brokers():
    if os.environ.get("ARMD_TEST_BROKERS"):
        yield os.environ["ARMD_TEST_BROKERS"]
        return
    script = H.REPO / ".ci" / "kafka.sh"
    if not script.exists():
        _missing("ARMD_TEST_BROKERS is not set and .ci/kafka.sh is not there to start a broker")
    d = tempfile.mkdtemp(prefix="ls-kafka-")
    try:
        subprocess.run(["bash", str(script), "fetch"], check=True)
        out = subprocess.run(["bash", str(script), "start", d], check=True, capture_output=True, text=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        _missing(f"cannot start a Kafka broker with .ci/kafka.sh: {e}")
    try:
        yield out.stdout.strip()
    finally:
        subprocess.run(["bash", str(script), "stop", d])
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def armd_bin():
    path = os.environ.get("ARMD_BIN")
    if not path:
        _missing("ARMD_BIN is not set (path of the armd binary)")
    if not os.access(path, os.X_OK):
        _missing(f"ARMD_BIN={path} is not an executable")
    return path


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    try:
        import label_studio  # noqa: F401
    except ImportError:
        _missing("the label-studio package is not installed (pip install -e '.[test]')")
    server = H.LabelStudioServer(tmp_path_factory.mktemp("label-studio"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def browser_paths():
    chromium = os.environ.get("ARMD_CHROMIUM", "/usr/bin/chromium")
    driver = os.environ.get("ARMD_CHROMEDRIVER", "/usr/bin/chromedriver")
    for p in (chromium, driver):
        if not os.access(p, os.X_OK):
            _missing(f"{p} not found (Debian: apt-get install chromium chromium-driver)")
    return chromium, driver


@pytest.fixture
def cleanup():
    """Stops what a test started, last started first, even when the test fails."""
    stack = []
    yield stack.append
    for stop in reversed(stack):
        try:
            stop()
        except Exception as e:  # noqa: BLE001
            print(f"cleanup: {e}", file=sys.stderr)


@pytest.fixture
def logs_on_failure(request):
    """Registers log files that are printed when the test fails."""
    files = []
    yield files.append
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for f in files:
            path = Path(f)
            if path.exists():
                text = path.read_text(errors="replace")
                print(f"\n----- {path} (last 6000 chars) -----\n{text[-6000:]}", file=sys.stderr)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
