//! The paper's simple baselines: `random`, `entropy` and `max-diff`.
//!
//! All three look only at the predicted reward gap `m = θ̂ᵀv` (or at nothing), so they never whiten the
//! pool for their ranking; the variance reported with each pick is computed for the picks alone.
//!
//! Scores:
//! - `random`: `0.0` for every pick (there is no ranking); picks come in draw order.
//! - `entropy`: the predictive entropy of the plug-in label distribution, `H(σ(m))` in nats (`ln 2` at
//!   `m = 0`). Candidates are ranked by `|m|` ascending rather than by this entropy, so that gaps too large
//!   for the entropy to be distinguished from 0 in floating point still rank correctly.
//! - `max-diff`: `|m|`.
//!
//! Ties go to the lower candidate index (see [`super::top_k`]).

use rand::Rng;

use super::{top_k, Pick, Round};
use crate::linalg::{log_sigmoid, sigmoid};

/// Entropy in nats of a Bernoulli label with probability `σ(m)`, stable for any `m`.
pub fn logit_entropy(m: f64) -> f64 {
    // −p ln p − (1 − p) ln(1 − p) with p = σ(m), ln p = log σ(m), ln(1 − p) = log σ(−m).
    -(sigmoid(m) * log_sigmoid(m) + sigmoid(-m) * log_sigmoid(-m))
}

/// `random`: `min(k, N)` distinct candidates drawn uniformly without replacement with `rng`.
pub fn random(round: &mut Round<'_>, rng: &mut impl Rng) -> Vec<Pick> {
    let n = round.len();
    let k = round.ranking_len().min(n);
    let drawn = rand::seq::index::sample(rng, n, k);
    round.picks(drawn.into_iter().map(|c| (c, 0.0)))
}

/// `entropy`: the `k` candidates with the smallest `|m|` (largest predictive entropy).
pub fn entropy(round: &mut Round<'_>) -> Vec<Pick> {
    let key: Vec<f64> = (0..round.len()).map(|c| -round.margin(c).abs()).collect();
    let chosen: Vec<(usize, f64)> = top_k(&key, round.ranking_len())
        .into_iter()
        .map(|(c, _)| (c, logit_entropy(round.margin(c))))
        .collect();
    round.picks(chosen)
}

/// `max-diff`: the `k` candidates with the largest `|m|`.
pub fn max_diff(round: &mut Round<'_>) -> Vec<Pick> {
    let key: Vec<f64> = (0..round.len()).map(|c| round.margin(c).abs()).collect();
    round.picks(top_k(&key, round.ranking_len()))
}

#[cfg(test)]
mod tests;
