//! `armd run`: the Kafka daemon.
pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod export;
pub mod messages;
pub mod pool;
pub mod telemetry;
