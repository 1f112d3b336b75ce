//! The observability kit stays consistent with the daemon: alert rules and the Grafana dashboard only
//! reference metrics the daemon exports, `promtool` accepts the rules and the exposition text, and the
//! dashboard is structurally valid Grafana JSON.

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

use armd::daemon::telemetry::{Kind, Telemetry, CATALOGUE};

/// promtool is installed by `.ci/run`; elsewhere the checks that need it are skipped unless
/// `ARMD_REQUIRE_TOOLS` or `CI` is set.
fn promtool() -> Option<&'static str> {
    let found = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found
        && (std::env::var_os("ARMD_REQUIRE_TOOLS").is_some() || std::env::var_os("CI").is_some())
    {
        panic!("promtool is required in CI (Debian package 'prometheus'; .ci/run installs it)");
    }
    found.then_some("promtool")
}

/// Every `armd_*` series name an expression may use: catalogue names, plus histogram sub-series.
fn known_series() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for d in CATALOGUE {
        names.insert(d.name.to_string());
        if d.kind == Kind::Histogram {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{}{suffix}", d.name));
            }
        }
    }
    names
}

fn referenced(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("armd_") {
        let start = i + pos;
        let prev_ok =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if prev_ok {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

#[test]
fn alerts_and_dashboard_reference_only_exported_metrics() {
    let known = known_series();
    for file in [
        "deploy/prometheus/alerts.yml",
        "deploy/grafana/dashboards/armd.json",
    ] {
        let text = std::fs::read_to_string(file).unwrap();
        let refs = referenced(&text);
        assert!(!refs.is_empty(), "{file} references no armd metric");
        let unknown: Vec<_> = refs.difference(&known).collect();
        assert!(
            unknown.is_empty(),
            "{file} references metrics armd does not export: {unknown:?}"
        );
    }
}

#[test]
fn dashboard_is_structurally_valid() {
    let text = std::fs::read_to_string("deploy/grafana/dashboards/armd.json").unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(dash["uid"], "armd");
    let panels = dash["panels"].as_array().expect("panels array");
    assert!(panels.len() >= 10);
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().expect("numeric panel id")),
            "duplicate panel id"
        );
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(["timeseries", "stat"].contains(&p["type"].as_str().unwrap()));
        let grid = &p["gridPos"];
        assert!(grid["w"].as_u64().unwrap() + grid["x"].as_u64().unwrap() <= 24);
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty());
        for t in targets {
            assert!(t["expr"].as_str().is_some_and(|e| e.contains("armd_")));
        }
    }
    // What the issue asks the dashboard to show.
    for needle in [
        "armd_selection_batch_gain_nats",
        "armd_posterior_log_det",
        "armd_prequential_accuracy_ratio",
        "armd_label_latency_seconds_bucket",
        "armd_requests_in_flight",
        "armd_consumer_lag_messages",
        "armd_labels_rejected_total",
    ] {
        assert!(text.contains(needle), "dashboard lacks {needle}");
    }
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let Some(tool) = promtool() else { return };
    let out = Command::new(tool)
        .args(["check", "rules", "deploy/prometheus/alerts.yml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_the_exposition_text() {
    // The same recorder and renderer that serve the daemon's /metrics endpoint.
    let telemetry = Telemetry::new();
    let text = telemetry.render();
    assert!(text.contains("armd_labels_applied_total"));
    common::promtool_check_metrics(&text);
}
