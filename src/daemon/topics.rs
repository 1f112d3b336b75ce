//! `armd topics create`: the five topics armd uses, with the partitions, replication and retention each
//! one needs. armd itself never creates topics (locked-down clusters forbid it, and a typo in a topic name
//! should not silently create a new, empty topic); it waits for them at start. This command is the
//! documented way to make them.
//!
//! Why each setting ([`plan`] holds the rules; README "Topics" says the same for operators):
//! - **responses**: several partitions (they split selection across instances of one consumer group).
//!   Needed only until pooled: a retention of days is plenty.
//! - **requests**: every instance reads all of it (a request carries the pair's embeddings, which a label
//!   needs to be applied), and an instance started later, or rebuilt from nothing, replays the labels
//!   topic from its start, so the requests topic is kept as long as the labels topic: forever. Three
//!   partitions: requests are written by every instance of a group.
//! - **labels**: the source of truth between checkpoints (a restart replays it from the checkpointed
//!   positions) and the record of what the team paid for. Kept forever (`retention.ms = -1`). One
//!   partition: labels come at human rates, and one partition gives every reader the same order.
//! - **models**: one snapshot per instance matters, the latest: compacted, keyed by instance id.
//! - **dead letters**: kept 14 days for inspection.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;

use super::config::Config;
use super::kafka::client_config;

const DAY_MS: i64 = 86_400_000;

/// Choices of the operator; the rest follows from the configuration.
#[derive(Clone, Debug)]
pub struct TopicOptions {
    /// Partitions of the responses topic (the unit of work split between instances).
    pub response_partitions: i32,
    /// Replication factor of every topic (3 on a production cluster; 1 on a single test broker).
    pub replication_factor: i32,
}

impl Default for TopicOptions {
    fn default() -> Self {
        Self {
            response_partitions: 6,
            replication_factor: 1,
        }
    }
}

/// One topic to create.
#[derive(Clone, Debug, PartialEq)]
pub struct TopicSpec {
    /// Which of armd's topics (`responses`, `requests`, `labels`, `models`, `dead_letter`).
    pub role: &'static str,
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    /// Topic-level settings (`retention.ms`, `cleanup.policy`, …).
    pub settings: BTreeMap<&'static str, String>,
}

/// The topics `cfg` names, with their settings (see the module doc for why).
pub fn plan(cfg: &Config, opts: &TopicOptions) -> Result<Vec<TopicSpec>> {
    anyhow::ensure!(
        (1..=10_000).contains(&opts.response_partitions),
        "responses partitions must be 1-10000, got {}",
        opts.response_partitions
    );
    anyhow::ensure!(
        (1..=16).contains(&opts.replication_factor),
        "replication factor must be 1-16, got {}",
        opts.replication_factor
    );
    let t = &cfg.kafka.topics;
    let spec = |role, name: &str, partitions, settings: &[(&'static str, String)]| TopicSpec {
        role,
        name: name.to_string(),
        partitions,
        replication_factor: opts.replication_factor,
        settings: settings.iter().cloned().collect(),
    };
    Ok(vec![
        spec(
            "responses",
            &t.responses,
            opts.response_partitions,
            &[("retention.ms", (3 * DAY_MS).to_string())],
        ),
        spec("requests", &t.requests, 3, &[("retention.ms", "-1".into())]),
        spec("labels", &t.labels, 1, &[("retention.ms", "-1".into())]),
        spec(
            "models",
            &t.models,
            1,
            &[("cleanup.policy", "compact".into())],
        ),
        spec(
            "dead_letter",
            &t.dead_letter,
            1,
            &[("retention.ms", (14 * DAY_MS).to_string())],
        ),
    ])
}

/// What happened to one topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Created {
    Created,
    /// It was there already (its settings are left alone), with this many partitions.
    Existed {
        partitions: usize,
    },
}

/// Creates the planned topics that do not exist; existing ones are left as they are and reported.
pub fn create(cfg: &Config, specs: &[TopicSpec], timeout: Duration) -> Result<Vec<Created>> {
    let admin: AdminClient<DefaultClientContext> = client_config(cfg, "admin")
        .create()
        .context("cannot create the Kafka admin client")?;
    let new: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|s| {
            let mut n = NewTopic::new(
                &s.name,
                s.partitions,
                TopicReplication::Fixed(s.replication_factor),
            );
            for (k, v) in &s.settings {
                n = n.set(k, v);
            }
            n
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime for the admin client")?;
    let opts = AdminOptions::new().operation_timeout(Some(timeout));
    let results = runtime
        .block_on(admin.create_topics(&new, &opts))
        .with_context(|| format!("cannot create topics on {}", cfg.kafka.brokers))?;
    let mut out = Vec::with_capacity(specs.len());
    for (spec, r) in specs.iter().zip(results) {
        out.push(match r {
            Ok(_) => Created::Created,
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => Created::Existed {
                partitions: partitions_of(cfg, &spec.name, timeout)?,
            },
            Err((name, code)) => {
                anyhow::bail!("cannot create topic {name} ({} topic): {code}", spec.role)
            }
        });
    }
    Ok(out)
}

fn partitions_of(cfg: &Config, topic: &str, timeout: Duration) -> Result<usize> {
    let c: BaseConsumer = client_config(cfg, "admin-metadata")
        .create()
        .context("cannot create a metadata client")?;
    let md = c
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("cannot read the metadata of topic {topic}"))?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len()))
}

/// One line per topic for the command's output.
pub fn describe(spec: &TopicSpec, outcome: Option<&Created>) -> String {
    let settings: Vec<String> = spec
        .settings
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let what = match outcome {
        None => "would create".to_string(),
        Some(Created::Created) => "created".to_string(),
        Some(Created::Existed { partitions }) if *partitions as i32 != spec.partitions => format!(
            "exists with {partitions} partitions (left as is; the plan says {})",
            spec.partitions
        ),
        Some(Created::Existed { .. }) => "exists (left as is)".to_string(),
    };
    format!(
        "{:<12} {:<28} partitions={:<3} replication={} {}  {what}",
        spec.role,
        spec.name,
        spec.partitions,
        spec.replication_factor,
        settings.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &[(&str, &str)]) -> Config {
        Config::from_toml_with_env("[model]\ndim = 8\n", extra).unwrap()
    }

    #[test]
    fn plan_names_every_configured_topic_with_its_rules() {
        let c = cfg(&[("ARMD__KAFKA__TOPICS__LABELS", "team.labels")]);
        let p = plan(&c, &TopicOptions::default()).unwrap();
        let names: Vec<&str> = p.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "armd.responses",
                "armd.requests",
                "team.labels",
                "armd.models",
                "armd.dead-letter"
            ]
        );
        let labels = &p[2];
        assert_eq!(labels.partitions, 1);
        assert_eq!(labels.settings["retention.ms"], "-1");
        assert_eq!(p[3].settings["cleanup.policy"], "compact");
        assert_eq!(p[0].partitions, 6);
        assert!(p.iter().all(|s| s.replication_factor == 1));
    }

    #[test]
    fn requests_are_kept_as_long_as_the_labels_that_need_them() {
        let p = plan(&cfg(&[]), &TopicOptions::default()).unwrap();
        assert_eq!(p[1].role, "requests");
        assert_eq!(p[1].settings["retention.ms"], p[2].settings["retention.ms"]);
        assert_eq!(p[1].settings["retention.ms"], "-1");
    }

    #[test]
    fn bad_options_are_refused_with_the_value() {
        let c = cfg(&[]);
        let e = plan(
            &c,
            &TopicOptions {
                response_partitions: 0,
                replication_factor: 1,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("partitions") && e.contains('0'), "{e}");
        let e = plan(
            &c,
            &TopicOptions {
                response_partitions: 3,
                replication_factor: 0,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("replication"), "{e}");
    }
}
