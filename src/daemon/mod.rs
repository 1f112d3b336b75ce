//! `armd run`: the Kafka daemon.
pub mod checkpoint;
pub mod config;
pub mod messages;
