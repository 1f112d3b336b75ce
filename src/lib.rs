//! armd — active reward modeling daemon.
//!
//! Layout (pure numeric core first, I/O at the edges):
//! - [`posterior`]: Laplace posterior of a linear Bradley–Terry head (Cholesky factor of the precision,
//!   exact one-label update, MAP refit, prequential scoring).
//! - [`candidates`]: pairs of pooled responses to choose from (within-prompt, cross-prompt).
//! - [`selection`]: the selection strategies (paper baselines, the paper's D-optimal rules, exact greedy).
//! - [`evaluation`]: per-prompt Spearman and Best-of-N, the paper's metrics.
//! - [`features`]: feature scaling (standardisation, L2 normalisation) frozen with the model.
//! - [`simulate`]: `armd simulate`, the paper's protocol replayed offline to compare strategies.
//!
//! Nothing in these modules touches tokio, Kafka or JSON; the daemon and the simulator share them.
//!
//! - [`demo`]: `armd demo`, the daemon end to end on an embedded mock broker with simulated annotators.
//! - [`daemon`]: `armd run`, the Kafka daemon (messages, config, checkpoint, engine, Kafka I/O, HTTP).

pub mod candidates;
pub mod daemon;
pub mod demo;
pub mod error;
pub mod evaluation;
pub mod features;
pub mod linalg;
pub mod posterior;
pub mod selection;
pub mod simulate;

pub use error::CoreError;
