//! Selection strategies: which candidate pairs to send for labelling.
//!
//! Every strategy sees the same [`SelectionInput`] (posterior, pool embeddings, candidates, in-flight pairs,
//! batch size) and returns up to `k` [`Pick`]s with the score it ranked them by. Per-round quantities that
//! several strategies share (predicted gaps, whitened pool, pair variances) live in [`Round`] and are
//! computed only when a strategy asks for them.
//!
//! | name | rule |
//! |---|---|
//! | `random` | uniform without replacement |
//! | `entropy` | smallest \|m\| (most uncertain prediction) |
//! | `max-diff` | largest \|m\| |
//! | `xtx` | top-k of `vᵀ(Σ_pool vvᵀ + εI)⁻¹v` |
//! | `coreset` | Huggins et al. sensitivities, sampled ∝ sensitivity |
//! | `bald` / `batch-bald` | mutual information between label and θ (greedy joint MI for the batch) |
//! | `dopt` | top-k of `w·vᵀM⁻¹v`, `M = Σ_pool w vvᵀ + εI` (the paper) |
//! | `past-aware-dopt` | same with `M = H + Σ_pool w vvᵀ + εI` (the paper) |
//! | `greedy-dopt` | exact greedy maximiser of `log det(H + Σ_in-flight + Σ_batch)` with lazy evaluation |
//! | `targeted` | greedy reduction of the posterior variance of within-prompt reward gaps ([`targeted`]) |
//! | `targeted-info` | same, information form (mean nats per target gap) |

pub mod bald;
pub mod baselines;
pub mod coreset;
pub mod dopt;
pub mod scoring;
pub mod targeted;

use std::fmt;
use std::str::FromStr;

use faer::{Mat, MatRef};
use rand::Rng;

use crate::candidates::Pair;
use crate::error::CoreError;
use crate::linalg::sigmoid;
use crate::posterior::{Posterior, Prediction, Whitener};

/// The selection rules armd implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StrategyKind {
    Random,
    Entropy,
    MaxDiff,
    Xtx,
    Coreset,
    Bald,
    BatchBald,
    Dopt,
    PastAwareDopt,
    GreedyDopt,
    Targeted,
    TargetedInfo,
}

/// Names accepted in configuration, in documentation order.
pub const STRATEGY_NAMES: &str =
    "random, entropy, max-diff, xtx, coreset, bald, batch-bald, dopt, \
    past-aware-dopt, greedy-dopt, targeted, targeted-info";

impl StrategyKind {
    pub const ALL: [StrategyKind; 12] = [
        Self::Random,
        Self::Entropy,
        Self::MaxDiff,
        Self::Xtx,
        Self::Coreset,
        Self::Bald,
        Self::BatchBald,
        Self::Dopt,
        Self::PastAwareDopt,
        Self::GreedyDopt,
        Self::Targeted,
        Self::TargetedInfo,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Random => "random",
            Self::Entropy => "entropy",
            Self::MaxDiff => "max-diff",
            Self::Xtx => "xtx",
            Self::Coreset => "coreset",
            Self::Bald => "bald",
            Self::BatchBald => "batch-bald",
            Self::Dopt => "dopt",
            Self::PastAwareDopt => "past-aware-dopt",
            Self::GreedyDopt => "greedy-dopt",
            Self::Targeted => "targeted",
            Self::TargetedInfo => "targeted-info",
        }
    }
}

impl FromStr for StrategyKind {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, CoreError> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| CoreError::UnknownName {
                what: "strategy",
                name: s.to_string(),
                expected: STRATEGY_NAMES,
            })
    }
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Tuning knobs of the strategies that have any.
#[derive(Clone, Copy, Debug)]
pub struct SelectionParams {
    /// Ridge `ε` added to the design matrices of `xtx`, `dopt` and `past-aware-dopt`.
    pub epsilon: f64,
    /// Gauss–Hermite nodes for the BALD integral.
    pub gauss_hermite_nodes: usize,
    /// Posterior samples for BatchBALD's joint entropy.
    pub batch_bald_samples: usize,
    /// BatchBALD runs its greedy over this many top-BALD candidates (its cost grows with the batch).
    pub batch_bald_shortlist: usize,
    /// k-means clusters for the coreset sensitivities.
    pub coreset_clusters: usize,
    /// Radius `R` in the Huggins et al. sensitivity bound.
    pub coreset_radius: f64,
    /// `targeted` estimates its target matrix from at most this many within-prompt pairs of the pool
    /// (a uniform sample); a candidate costs O(this) to score.
    pub targeted_targets: usize,
}

impl Default for SelectionParams {
    fn default() -> Self {
        Self {
            epsilon: 1e-6,
            gauss_hermite_nodes: 32,
            batch_bald_samples: 256,
            batch_bald_shortlist: 1000,
            coreset_clusters: 16,
            coreset_radius: 1.0,
            targeted_targets: 256,
        }
    }
}

impl SelectionParams {
    /// Rejects values no strategy can work with; names the parameter.
    pub fn validate(&self) -> Result<(), CoreError> {
        let bad = |name, value: String, reason| {
            Err(CoreError::Parameter {
                name,
                value,
                reason,
            })
        };
        if !(self.epsilon.is_finite() && self.epsilon > 0.0) {
            return bad(
                "epsilon",
                self.epsilon.to_string(),
                "must be finite and > 0",
            );
        }
        if self.gauss_hermite_nodes == 0 || self.gauss_hermite_nodes > 100 {
            return bad(
                "gauss_hermite_nodes",
                self.gauss_hermite_nodes.to_string(),
                "must be in 1..=100",
            );
        }
        if self.batch_bald_samples == 0 {
            return bad("batch_bald_samples", "0".into(), "must be > 0");
        }
        if self.batch_bald_shortlist == 0 {
            return bad("batch_bald_shortlist", "0".into(), "must be > 0");
        }
        if self.coreset_clusters == 0 {
            return bad("coreset_clusters", "0".into(), "must be > 0");
        }
        if self.targeted_targets == 0 {
            return bad("targeted_targets", "0".into(), "must be > 0");
        }
        if !(self.coreset_radius.is_finite() && self.coreset_radius >= 0.0) {
            return bad(
                "coreset_radius",
                self.coreset_radius.to_string(),
                "must be finite and >= 0",
            );
        }
        Ok(())
    }
}

/// What a selection round works on.
#[derive(Clone, Copy)]
pub struct SelectionInput<'a> {
    pub posterior: &'a Posterior,
    /// Scaled embeddings of the pool, d×N, one response per column.
    pub embeddings: MatRef<'a, f64>,
    pub candidates: &'a [Pair],
    /// Difference vectors of requests sent but not yet answered; `greedy-dopt` and `targeted` treat them
    /// as picked.
    pub in_flight: &'a [Vec<f64>],
    /// How many pairs to pick (fewer when there are fewer candidates).
    pub k: usize,
    /// The comparisons the model is meant to get right: within-prompt pairs of the pool
    /// ([`crate::candidates::within_prompt`]). `targeted` reduces the posterior variance of their reward
    /// gaps; empty means "the candidates themselves". The other strategies ignore it.
    pub targets: &'a [Pair],
    /// How many more times each pool response may be used (`pool.max_uses` minus its uses so far), or
    /// empty for no limit. Every strategy honours it: a pick that would overuse a response is never made,
    /// and greedy strategies condition only on picks they make.
    pub uses_left: &'a [u32],
}

/// One chosen pair.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pick {
    /// Index into `SelectionInput::candidates`.
    pub candidate: usize,
    pub pair: Pair,
    /// The value the strategy ranked by (information gain in nats for `greedy-dopt`).
    pub score: f64,
    /// The posterior's prediction for the pair when it was picked.
    pub prediction: Prediction,
}

/// Lazily computed per-round quantities shared by the strategies.
pub struct Round<'a> {
    pub input: SelectionInput<'a>,
    /// Remaining uses per response, consumed by [`Round::picks`]; `None` without a limit.
    budget: Option<UseBudget>,
    rewards: Vec<f64>,
    whitener: Option<Whitener<'a>>,
    whitened: Option<(Mat<f64>, Vec<f64>)>,
    variances: Option<Vec<f64>>,
}

impl<'a> Round<'a> {
    /// Validates the input and computes the predicted reward of every pooled response.
    pub fn new(input: SelectionInput<'a>) -> Result<Self, CoreError> {
        let d = input.posterior.dim();
        if input.embeddings.nrows() != d {
            return Err(CoreError::Dimension {
                what: "pool embeddings",
                expected: d,
                got: input.embeddings.nrows(),
            });
        }
        let n = input.embeddings.ncols();
        for (what, pairs) in [
            ("candidate pair", input.candidates),
            ("target pair", input.targets),
        ] {
            if let Some(worst) = pairs.iter().map(|p| p.a.max(p.b) as usize).max() {
                if worst >= n {
                    return Err(CoreError::Index {
                        what,
                        index: worst,
                        len: n,
                    });
                }
            }
        }
        if !input.uses_left.is_empty() {
            crate::error::check_dim("remaining uses per response", n, input.uses_left.len())?;
        }
        for v in input.in_flight {
            crate::error::check_dim("in-flight difference vector", d, v.len())?;
            crate::error::check_finite("in-flight difference vector", v)?;
        }
        let rewards = scoring::rewards(input.posterior.theta(), input.embeddings);
        crate::error::check_finite("pool embeddings (θᵀx)", &rewards)?;
        let budget = UseBudget::new(input.uses_left);
        Ok(Self {
            input,
            budget,
            rewards,
            whitener: None,
            whitened: None,
            variances: None,
        })
    }

    pub fn len(&self) -> usize {
        self.input.candidates.len()
    }

    /// How many of a strategy's best-ranked candidates to hand to [`Self::picks`]: `k` without a use limit,
    /// every candidate with one (some of the best may be refused).
    pub fn ranking_len(&self) -> usize {
        if self.budget.is_some() {
            self.len()
        } else {
            self.input.k
        }
    }

    /// A fresh copy of the round's use limit, for greedy strategies that must know during the greedy
    /// which picks will be refused (they then condition only on picks that are made).
    pub fn budget(&self) -> Option<UseBudget> {
        self.budget.clone()
    }

    pub fn is_empty(&self) -> bool {
        self.input.candidates.is_empty()
    }

    /// Predicted reward gap `θᵀ(x_a − x_b)` of candidate `c`.
    pub fn margin(&self, c: usize) -> f64 {
        let p = self.input.candidates[c];
        self.rewards[p.a as usize] - self.rewards[p.b as usize]
    }

    /// Fisher weight `p(1 − p)` of candidate `c` at the current mode.
    pub fn weight(&self, c: usize) -> f64 {
        let p = sigmoid(self.margin(c));
        p * (1.0 - p)
    }

    /// The round's whitening map, built on first use. Every whitened vector of a round must come from
    /// it: two whitening maps of the same posterior differ by a rotation.
    pub fn whitener(&mut self) -> &Whitener<'a> {
        let posterior = self.input.posterior;
        self.whitener.get_or_insert_with(|| posterior.whitener())
    }

    /// Whitened pool `Z = FᵀX` (`F Fᵀ = H⁻¹`, see [`Whitener`]) and its squared column norms.
    pub fn whitened(&mut self) -> (&Mat<f64>, &[f64]) {
        if self.whitened.is_none() {
            let x = self.input.embeddings;
            let z = self.whitener().whiten(x);
            let norms = scoring::column_sq_norms(z.as_ref());
            self.whitened = Some((z, norms));
        }
        let (z, n) = self.whitened.as_ref().expect("just set");
        (z, n)
    }

    /// Posterior variance `vᵀH⁻¹v` of every candidate's reward gap.
    pub fn variances(&mut self) -> &[f64] {
        if self.variances.is_none() {
            let pairs = self.input.candidates;
            let (z, norms) = self.whitened();
            let s = scoring::pair_sq_distances(z.as_ref(), norms, pairs);
            self.variances = Some(s);
        }
        self.variances.as_deref().expect("just set")
    }

    /// The prediction reported with a pick (variance only when already computed, else NaN-free 0 is
    /// misleading, so strategies that never whiten compute it for their picks alone).
    pub fn prediction(&mut self, c: usize) -> Prediction {
        let mean = self.margin(c);
        let variance = match &self.variances {
            Some(s) => s[c],
            None => {
                let p = self.input.candidates[c];
                let v: Vec<f64> = (0..self.input.embeddings.nrows())
                    .map(|i| {
                        self.input.embeddings[(i, p.a as usize)]
                            - self.input.embeddings[(i, p.b as usize)]
                    })
                    .collect();
                self.input
                    .posterior
                    .predict(&v)
                    .map(|pr| pr.variance)
                    .unwrap_or(f64::NAN)
            }
        };
        Prediction {
            mean,
            variance,
            p: sigmoid(mean),
        }
    }

    /// The in-flight difference vectors whitened by the round's map, like the pool.
    pub fn whitened_in_flight(&mut self) -> Vec<Vec<f64>> {
        let in_flight = self.input.in_flight;
        let whitener = self.whitener();
        in_flight
            .iter()
            .map(|v| {
                let mut u = v.clone();
                whitener.whiten_vec(&mut u);
                u
            })
            .collect()
    }

    /// Difference vector of candidate `c`.
    pub fn difference(&self, c: usize) -> Vec<f64> {
        let p = self.input.candidates[c];
        let x = self.input.embeddings;
        (0..x.nrows())
            .map(|i| x[(i, p.a as usize)] - x[(i, p.b as usize)])
            .collect()
    }

    /// Turns (candidate, score) pairs, best first, into at most `k` picks, skipping any that would use a
    /// response more often than the use limit allows.
    pub fn picks(&mut self, chosen: impl IntoIterator<Item = (usize, f64)>) -> Vec<Pick> {
        let k = self.input.k;
        let mut out = Vec::with_capacity(k.min(self.len()));
        for (c, score) in chosen {
            if out.len() == k {
                break;
            }
            let pair = self.input.candidates[c];
            if let Some(b) = &mut self.budget {
                if !b.take(pair) {
                    continue;
                }
            }
            out.push(Pick {
                candidate: c,
                pair,
                score,
                prediction: self.prediction(c),
            });
        }
        out
    }
}

/// Remaining uses of each pool response within a round.
#[derive(Clone, Debug)]
pub struct UseBudget {
    left: Vec<u32>,
}

impl UseBudget {
    /// `None` when `uses_left` is empty (no limit).
    pub fn new(uses_left: &[u32]) -> Option<Self> {
        (!uses_left.is_empty()).then(|| Self {
            left: uses_left.to_vec(),
        })
    }

    /// Whether both responses of `pair` can still be used.
    pub fn allows(&self, pair: Pair) -> bool {
        self.left[pair.a as usize] > 0 && self.left[pair.b as usize] > 0 && pair.a != pair.b
    }

    /// Uses both responses of `pair` if [`Self::allows`] it.
    pub fn take(&mut self, pair: Pair) -> bool {
        if !self.allows(pair) {
            return false;
        }
        self.left[pair.a as usize] -= 1;
        self.left[pair.b as usize] -= 1;
        true
    }
}

/// [`UseBudget::allows`] for an optional budget (no budget allows everything).
pub fn allowed(budget: &Option<UseBudget>, pair: Pair) -> bool {
    budget.as_ref().is_none_or(|b| b.allows(pair))
}

/// Indices of the `k` largest scores, best first; ties go to the lower index so results are reproducible.
pub fn top_k(scores: &[f64], k: usize) -> Vec<(usize, f64)> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    let cmp = |&a: &usize, &b: &usize| scores[b].total_cmp(&scores[a]).then(a.cmp(&b));
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(cmp);
    idx.into_iter().map(|i| (i, scores[i])).collect()
}

/// Runs the strategy `kind` on `input`.
pub fn select(
    kind: StrategyKind,
    input: SelectionInput<'_>,
    params: &SelectionParams,
    rng: &mut impl Rng,
) -> Result<Vec<Pick>, CoreError> {
    params.validate()?;
    let mut round = Round::new(input)?;
    if round.is_empty() || input.k == 0 {
        return Ok(Vec::new());
    }
    match kind {
        StrategyKind::Random => Ok(baselines::random(&mut round, rng)),
        StrategyKind::Entropy => Ok(baselines::entropy(&mut round)),
        StrategyKind::MaxDiff => Ok(baselines::max_diff(&mut round)),
        StrategyKind::Xtx => dopt::xtx(&mut round, params),
        StrategyKind::Coreset => coreset::coreset(&mut round, params, rng),
        StrategyKind::Bald => Ok(bald::bald(&mut round, params)),
        StrategyKind::BatchBald => bald::batch_bald(&mut round, params, rng),
        StrategyKind::Dopt => dopt::dopt(&mut round, params, false),
        StrategyKind::PastAwareDopt => dopt::dopt(&mut round, params, true),
        StrategyKind::GreedyDopt => dopt::greedy(&mut round, dopt::Evaluation::Lazy),
        StrategyKind::Targeted => {
            targeted::targeted(&mut round, params, targeted::TargetScore::Variance, rng)
        }
        StrategyKind::TargetedInfo => {
            targeted::targeted(&mut round, params, targeted::TargetScore::Information, rng)
        }
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Small random selection problems shared by the strategy tests.
    use super::*;
    use crate::candidates::{cross_prompt, within_prompt};
    use rand::{rngs::StdRng, SeedableRng};

    pub struct Problem {
        pub posterior: Posterior,
        pub x: Mat<f64>,
        pub pairs: Vec<Pair>,
        pub in_flight: Vec<Vec<f64>>,
        /// Within-prompt pairs (prompts of 4 responses).
        pub targets: Vec<Pair>,
        pub uses_left: Vec<u32>,
    }

    impl Problem {
        pub fn input(&self, k: usize) -> SelectionInput<'_> {
            SelectionInput {
                posterior: &self.posterior,
                embeddings: self.x.as_ref(),
                candidates: &self.pairs,
                in_flight: &self.in_flight,
                k,
                targets: &self.targets,
                uses_left: &self.uses_left,
            }
        }
    }

    /// d dims, `n` responses in prompts of 4, a posterior trained on `labels` random labels.
    pub fn problem(d: usize, n: usize, labels: usize, seed: u64) -> Problem {
        let mut rng = StdRng::seed_from_u64(seed);
        let x = Mat::<f64>::from_fn(d, n, |_, _| rng.random_range(-1.0..1.0));
        let prompts: Vec<u64> = (0..n as u64).map(|i| i / 4).collect();
        let targets = within_prompt(&prompts);
        let mut pairs = targets.clone();
        pairs.extend(cross_prompt(&prompts, 3 * n, &mut rng));
        pairs.sort_unstable();
        pairs.dedup();
        let mut posterior = Posterior::new(d, 1.0).unwrap();
        let truth: Vec<f64> = (0..d).map(|_| rng.random_range(-2.0..2.0)).collect();
        for _ in 0..labels {
            let v: Vec<f64> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
            let y = if rng.random::<f64>() < sigmoid(crate::linalg::dot(&truth, &v)) {
                1.0
            } else {
                0.0
            };
            posterior.update(&v, y).unwrap();
        }
        Problem {
            posterior,
            x,
            pairs,
            in_flight: Vec::new(),
            targets,
            uses_left: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategy_names_round_trip_and_unknown_is_clear() {
        for k in StrategyKind::ALL {
            assert_eq!(k.name().parse::<StrategyKind>().unwrap(), k);
        }
        let err = "d-opt".parse::<StrategyKind>().unwrap_err().to_string();
        assert!(
            err.contains("unknown strategy 'd-opt'") && err.contains("greedy-dopt"),
            "{err}"
        );
    }

    #[test]
    fn top_k_is_sorted_and_tie_stable() {
        let s = [1.0, 3.0, 3.0, 2.0, f64::NEG_INFINITY];
        assert_eq!(top_k(&s, 3), vec![(1, 3.0), (2, 3.0), (3, 2.0)]);
        assert_eq!(top_k(&s, 10).len(), 5);
        assert!(top_k(&s, 0).is_empty());
    }

    #[test]
    fn bad_input_is_rejected_with_a_named_error() {
        let p = testutil::problem(3, 8, 0, 1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        use rand::SeedableRng;
        let bad_pairs = [Pair::new(0, 99)];
        let input = SelectionInput {
            candidates: &bad_pairs,
            ..p.input(2)
        };
        let e = select(
            StrategyKind::GreedyDopt,
            input,
            &SelectionParams::default(),
            &mut rng,
        );
        assert!(matches!(e, Err(CoreError::Index { index: 99, .. })));
        let fl = vec![vec![1.0; 2]];
        let input = SelectionInput {
            in_flight: &fl,
            ..p.input(2)
        };
        let e = select(
            StrategyKind::GreedyDopt,
            input,
            &SelectionParams::default(),
            &mut rng,
        );
        assert!(matches!(e, Err(CoreError::Dimension { .. })));
        let params = SelectionParams {
            epsilon: -1.0,
            ..Default::default()
        };
        assert!(select(StrategyKind::Dopt, p.input(2), &params, &mut rng).is_err());
    }
}
