"""The command line and the small helpers of the bridge loop."""

import logging

import pytest

from armd_labelstudio import cli
from armd_labelstudio.bridge import Backoff, RateLimit


def test_defaults_and_environment(monkeypatch):
    monkeypatch.delenv("ARMD_LABELSTUDIO_BROKERS", raising=False)
    args = cli.parser().parse_args([])
    assert (args.brokers, args.requests_topic, args.labels_topic) == \
        ("127.0.0.1:9092", "armd.requests", "armd.labels")
    assert (args.project_title, args.annotator_id, args.text_field, args.prompt_field) == \
        ("armd comparisons", "email", "text", "prompt")
    monkeypatch.setenv("ARMD_LABELSTUDIO_BROKERS", "kafka:9092")
    monkeypatch.setenv("ARMD_LABELSTUDIO_POLL_INTERVAL", "0.5")
    args = cli.parser().parse_args(["--kafka-setting", "security.protocol=SASL_SSL",
                                    "--kafka-setting", "sasl.mechanisms=PLAIN", "--instance-id", "a",
                                    "--instance-id", "b"])
    assert args.brokers == "kafka:9092" and args.poll_interval == 0.5
    assert dict(args.kafka_setting) == {"security.protocol": "SASL_SSL", "sasl.mechanisms": "PLAIN"}
    assert args.instance_id == ["a", "b"]
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["--kafka-setting", "novalue"])
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["--annotator-id", "name"])


def test_api_key_sources(monkeypatch, tmp_path):
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    monkeypatch.delenv("ARMD_LABELSTUDIO_LS_API_KEY", raising=False)
    monkeypatch.delenv("ARMD_LABELSTUDIO_LS_API_KEY_FILE", raising=False)
    assert cli.api_key(cli.parser().parse_args([])) == ""
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "from-env")
    assert cli.api_key(cli.parser().parse_args([])) == "from-env"
    f = tmp_path / "key"
    f.write_text("from-file\n")
    assert cli.api_key(cli.parser().parse_args(["--ls-api-key-file", str(f)])) == "from-file"
    assert cli.api_key(cli.parser().parse_args(["--ls-api-key", "flag", "--ls-api-key-file", str(f)])) == "flag"


def test_no_api_key_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    monkeypatch.delenv("ARMD_LABELSTUDIO_LS_API_KEY", raising=False)
    monkeypatch.delenv("ARMD_LABELSTUDIO_LS_API_KEY_FILE", raising=False)
    assert cli.main(["--state-dir", "/nonexistent/never-created"]) == 2
    assert "no Label Studio API key" in capsys.readouterr().err


def test_backoff_doubles_up_to_the_cap_and_resets():
    b = Backoff("X", cap=5)
    assert [b.failure("down") for _ in range(5)] == [1, 2, 4, 5, 5]
    assert not b.ready()
    b.success()
    assert b.ready() and b.failure("down") == 1


def test_rate_limit_lets_one_of_a_kind_through():
    f = RateLimit(interval=60)

    def rec(msg):
        return logging.LogRecord("k", logging.WARNING, __file__, 1, msg, None, None)

    assert f.filter(rec("Connect to 127.0.0.1:4000 failed (after 0ms)"))
    assert not f.filter(rec("Connect to 127.0.0.1:4000 failed (after 12ms)"))
    assert f.filter(rec("another problem"))
