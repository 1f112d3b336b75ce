//! The paper's protocol (docs/design.md §9) for one (strategy, seed) replicate, on the daemon's own code
//! paths: `features::Scaler` for scaling, `candidates::generate` for candidates, `selection::select` for the
//! choice, `Posterior::update`/`refit` for learning, `evaluation` for the metrics.
//!
//! Common random numbers: everything random except the strategy's own choice is a function of the seed
//! alone — the train/test split, the seed labels, each round's prompt draw and candidate set, and the
//! annotator's coin for a given pair (hashed from the seed and the two responses, see [`Annotator`]). Two
//! strategies on one seed therefore face the same pools, and a pair labelled by both gets the same label,
//! which makes their curves comparable with few seeds.
//!
//! Scale-out (`scale_out.instances` = N > 1, docs/scale-out.md): each round's pool is split across N
//! instances by prompt, as Kafka partitions the responses topic by its key (the prompt id); instance i
//! builds candidates from its own share only and picks its share of the batch (`k` split as evenly as
//! possible). With shared learners there is one posterior, instance i's selection conditions on the pairs
//! instances 0..i picked this round (passed as in-flight difference vectors, as the daemon passes its open
//! requests), and every label of the round is applied to it. With independent learners each instance has
//! its own posterior (all start from the same seed labels), selects with it, conditions only on its own
//! picks and learns only its own labels; the reported model is instance 0's. The prompt draw, the seed
//! labels and the annotator are the same as with one instance, so runs are paired across N and learners.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use faer::Mat;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::config::{Learners, Plan};
use super::dataset::Dataset;
use super::report::{Metric, Point};
use crate::candidates::{self, Pair};
use crate::evaluation;
use crate::features::Scaler;
use crate::linalg::sigmoid;
use crate::posterior::{EvidenceOptions, Posterior, RefitOptions};
use crate::selection::{self, scoring, SelectionInput, StrategyKind, UseBudget};

/// Independent random streams derived from the seed (tags keep them apart).
const STREAM_SPLIT: u64 = 1;
const STREAM_ROUND: u64 = 2;
const STREAM_STRATEGY: u64 = 3;
const STREAM_ANNOTATOR: u64 = 4;
const STREAM_PARTITION: u64 = 5;

/// The instance that pools the responses of prompt `prompt` among `instances` (a fixed hash of the key,
/// like Kafka's partitioner: the same prompt always lands on the same instance, whatever the seed).
pub fn instance_of(prompt: u64, instances: usize) -> usize {
    if instances <= 1 {
        return 0;
    }
    (mix(&[STREAM_PARTITION, prompt]) % instances as u64) as usize
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn mix(parts: &[u64]) -> u64 {
    parts
        .iter()
        .fold(0x5EED_u64, |h, &p| splitmix64(h ^ splitmix64(p)))
}

/// A reproducible generator for stream `tag`, item `index` of replicate `seed`.
pub fn stream(seed: u64, tag: u64, index: u64) -> StdRng {
    StdRng::seed_from_u64(mix(&[seed, tag, index]))
}

/// Time spent per phase, summed over rounds (and over replicates in a [`super::Summary`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    /// Split, scaler fit and scaling of every embedding (once per seed).
    pub prepare: Duration,
    /// Prompt draw, pool assembly and candidate generation.
    pub candidates: Duration,
    /// `selection::select` (whitening, scoring and the strategy's own work).
    pub select: Duration,
    /// Annotator and `Posterior::update`.
    pub update: Duration,
    /// `Posterior::refit`.
    pub refit: Duration,
    /// Held-out metrics.
    pub evaluate: Duration,
}

impl Timings {
    pub fn add(&mut self, o: &Timings) {
        self.prepare += o.prepare;
        self.candidates += o.candidates;
        self.select += o.select;
        self.update += o.update;
        self.refit += o.refit;
        self.evaluate += o.evaluate;
    }

    pub fn total(&self) -> Duration {
        self.prepare + self.candidates + self.select + self.update + self.refit + self.evaluate
    }
}

/// What every strategy shares for one seed: the split and the scaled embeddings.
pub struct Prepared<'d> {
    pub seed: u64,
    data: &'d Dataset,
    /// Train prompt groups (indices into `data.groups()`), ascending.
    train: Vec<usize>,
    /// Scaled embeddings of every response, d×n.
    x: Mat<f64>,
    test_x: Mat<f64>,
    test_golden: Vec<f64>,
    test_prompt: Vec<u64>,
    best_of_n: Vec<usize>,
    /// `2·mean ‖x − x̄‖²` over scaled train responses: the mean squared norm of a random difference
    /// vector, the `auto` prior's starting value.
    mean_sq_difference: f64,
    pub prepare_time: Duration,
}

impl<'d> Prepared<'d> {
    /// Splits prompts into train and test for `seed` and fits the scaler on train responses only (the
    /// warm-up sample of the daemon: statistics are then frozen).
    pub fn new(data: &'d Dataset, plan: &Plan, seed: u64) -> anyhow::Result<Self> {
        let start = Instant::now();
        let groups = data.groups();
        let p = groups.len();
        let mut order: Vec<usize> = (0..p).collect();
        order.shuffle(&mut stream(seed, STREAM_SPLIT, 0));
        let n_test = ((plan.protocol.test_fraction * p as f64).round() as usize).clamp(1, p - 1);
        let mut test: Vec<usize> = order[..n_test].to_vec();
        let mut train: Vec<usize> = order[n_test..].to_vec();
        test.sort_unstable();
        train.sort_unstable();

        let d = data.dim();
        let train_rows = train.iter().flat_map(|&g| groups[g].rows.iter().copied());
        let scaler = Scaler::fit(plan.scaling, train_rows.map(|i| data.embedding(i)), d)
            .context("fitting the feature scaler on train responses")?;
        let n = data.len();
        let mut x = Mat::<f64>::zeros(d, n);
        let mut buf = vec![0.0; d];
        for i in 0..n {
            scaler
                .transform(data.embedding(i), &mut buf)
                .with_context(|| format!("scaling response {i}"))?;
            x.col_mut(i)
                .iter_mut()
                .zip(&buf)
                .for_each(|(dst, &v)| *dst = v);
        }
        let train_rows: Vec<usize> = train
            .iter()
            .flat_map(|&g| groups[g].rows.iter().copied())
            .collect();
        let mut mean = vec![0.0; d];
        for &r in &train_rows {
            mean.iter_mut()
                .zip(x.col(r).iter())
                .for_each(|(m, v)| *m += v / train_rows.len() as f64);
        }
        let spread: f64 = train_rows
            .iter()
            .map(|&r| {
                x.col(r)
                    .iter()
                    .zip(&mean)
                    .map(|(v, m)| (v - m) * (v - m))
                    .sum::<f64>()
            })
            .sum::<f64>()
            / train_rows.len() as f64;
        let test_rows: Vec<usize> = test
            .iter()
            .flat_map(|&g| groups[g].rows.iter().copied())
            .collect();
        let test_x = Mat::from_fn(d, test_rows.len(), |i, j| x[(i, test_rows[j])]);
        let test_golden = test_rows.iter().map(|&i| data.reward()[i]).collect();
        let test_prompt = test_rows.iter().map(|&i| data.prompt()[i]).collect();
        Ok(Self {
            seed,
            data,
            train,
            x,
            test_x,
            test_golden,
            test_prompt,
            best_of_n: data.usable_best_of_n(&plan.protocol.best_of_n),
            mean_sq_difference: 2.0 * spread,
            prepare_time: start.elapsed(),
        })
    }

    /// Draws round `round`'s pool (same for every strategy): returns the global rows of the pool, ascending,
    /// and the candidate pairs over pool positions.
    fn draw_pool(&self, plan: &Plan, round: usize) -> (Vec<usize>, Vec<Pair>) {
        let mut shares = self.draw_shares(plan, round, 1);
        shares.pop().unwrap_or_default()
    }

    /// Draws round `round`'s pool and splits it across `instances` by prompt ([`instance_of`]): per
    /// instance, its global rows (ascending) and its candidate pairs over its own pool positions. The
    /// candidate sets are drawn one instance after the other from the round's stream, so one instance gets
    /// exactly [`Self::draw_pool`]'s pool and candidates.
    fn draw_shares(
        &self,
        plan: &Plan,
        round: usize,
        instances: usize,
    ) -> Vec<(Vec<usize>, Vec<Pair>)> {
        let mut rng = stream(self.seed, STREAM_ROUND, round as u64);
        let take = plan.protocol.prompts_per_round.min(self.train.len());
        let mut picked: Vec<usize> = rand::seq::index::sample(&mut rng, self.train.len(), take)
            .into_iter()
            .map(|i| self.train[i])
            .collect();
        picked.sort_unstable();
        let groups = self.data.groups();
        let rows: Vec<usize> = picked
            .iter()
            .flat_map(|&g| groups[g].rows.iter().copied())
            .collect();
        (0..instances)
            .map(|i| {
                let mine: Vec<usize> = rows
                    .iter()
                    .copied()
                    .filter(|&r| instance_of(self.data.prompt()[r], instances) == i)
                    .collect();
                let prompts: Vec<u64> = mine.iter().map(|&r| self.data.prompt()[r]).collect();
                let pairs = candidates::generate(&prompts, &plan.candidates, &mut rng);
                (mine, pairs)
            })
            .collect()
    }

    fn difference(&self, a: usize, b: usize) -> Vec<f64> {
        let (ca, cb) = (self.x.col(a), self.x.col(b));
        ca.iter().zip(cb.iter()).map(|(x, y)| x - y).collect()
    }
}

/// The simulated annotator `y ~ Bernoulli(σ(β (r*(a) − r*(b))))`.
///
/// The coin for the k-th label of an unordered pair {a, b} is a hash of (seed, min, max, k), so the same
/// pair gets the same label under every strategy (common random numbers) and repeated labels of a pair are
/// independent draws. With β = ∞ the better response always wins; an exact tie of golden rewards is then a
/// fair coin (the limit of σ(β·0) = ½), so labels are always 0 or 1.
pub struct Annotator<'r> {
    seed: u64,
    beta: f64,
    reward: &'r [f64],
    seen: HashMap<(usize, usize), u64>,
}

impl<'r> Annotator<'r> {
    pub fn new(seed: u64, beta: f64, reward: &'r [f64]) -> Self {
        Self {
            seed,
            beta,
            reward,
            seen: HashMap::new(),
        }
    }

    /// Label for "a beats b" (1.0 or 0.0); `a`, `b` are dataset rows.
    pub fn label(&mut self, a: usize, b: usize) -> f64 {
        let (lo, hi) = (a.min(b), a.max(b));
        let k = self.seen.entry((lo, hi)).or_insert(0);
        let u = (mix(&[self.seed, STREAM_ANNOTATOR, lo as u64, hi as u64, *k]) >> 11) as f64
            * (1.0 / (1u64 << 53) as f64);
        *k += 1;
        let gap = self.reward[lo] - self.reward[hi];
        let p_lo = if self.beta.is_infinite() {
            if gap > 0.0 {
                1.0
            } else if gap < 0.0 {
                0.0
            } else {
                0.5
            }
        } else {
            sigmoid(self.beta * gap)
        };
        let lo_wins = u < p_lo;
        if lo_wins == (a == lo) {
            1.0
        } else {
            0.0
        }
    }
}

/// Result of one replicate.
pub struct Replicate {
    pub points: Vec<Point>,
    pub timings: Timings,
}

/// Runs the protocol for `kind` on a prepared seed. `tick` is called after every evaluated round.
pub fn run_replicate(
    kind: StrategyKind,
    prep: &Prepared<'_>,
    plan: &Plan,
    tick: &(dyn Fn() + Sync),
) -> anyhow::Result<Replicate> {
    let proto = &plan.protocol;
    let data = prep.data;
    let auto = proto.prior_precision.is_auto();
    let scale = plan.scale_out;
    let instances = scale.instances;
    let independent = !scale.single() && scale.learners == Learners::Independent;
    // One posterior (one instance, or shared learners), or one per instance (independent learners).
    let mut posteriors = (0..if independent { instances } else { 1 })
        .map(|_| {
            Posterior::new(
                data.dim(),
                proto.prior_precision.initial(prep.mean_sq_difference),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut annotator = Annotator::new(prep.seed, proto.beta, data.reward());
    let mut t = Timings::default();
    let mut points = Vec::new();
    let refit_opts = RefitOptions::default();
    let evidence = EvidenceOptions::default();
    // Uses of each dataset row so far (the daemon's `pool.max_uses`: a used-up response leaves the pool).
    // Instances pool disjoint prompts, so one count per row serves all of them.
    let mut uses = vec![0u32; data.len()];
    // Labels the whole deployment paid for (seed labels counted once).
    let mut paid = 0usize;

    // A refit, with the evidence-chosen prior when it is `auto`.
    let refit = |posterior: &mut Posterior, t: &mut Timings| -> anyhow::Result<()> {
        let start = Instant::now();
        if auto {
            posterior
                .refit_evidence(refit_opts, &evidence)
                .context("refitting the posterior (evidence prior)")?;
        } else {
            posterior
                .refit(refit_opts)
                .context("refitting the posterior")?;
        }
        t.refit += start.elapsed();
        Ok(())
    };
    // The annotator's labels for `pairs` (each pair asked once; the uses are counted).
    let mut ask = |pairs: &[(usize, usize)], uses: &mut [u32], t: &mut Timings| {
        let start = Instant::now();
        let labelled: Vec<(usize, usize, f64)> = pairs
            .iter()
            .map(|&(a, b)| {
                uses[a] += 1;
                uses[b] += 1;
                (a, b, annotator.label(a, b))
            })
            .collect();
        t.update += start.elapsed();
        labelled
    };
    // Applies labelled pairs to one posterior, with its refit cadence.
    let fit = |posterior: &mut Posterior,
               labelled: &[(usize, usize, f64)],
               t: &mut Timings|
     -> anyhow::Result<()> {
        for &(a, b, y) in labelled {
            let start = Instant::now();
            posterior
                .update(&prep.difference(a, b), y)
                .with_context(|| format!("updating the posterior with rows ({a}, {b})"))?;
            t.update += start.elapsed();
            if proto.refit_every > 0 && posterior.label_count() % proto.refit_every == 0 {
                refit(posterior, t)?;
            }
        }
        // With `auto` and no refit cadence, the prior is re-chosen once per round.
        if auto && proto.refit_every == 0 && !labelled.is_empty() {
            refit(posterior, t)?;
        }
        Ok(())
    };

    // Round 0: the random seed labels, identical for every strategy (and, with independent learners,
    // given to every instance).
    let start = Instant::now();
    let (rows, pairs) = prep.draw_pool(plan, 0);
    let mut rng = stream(prep.seed, STREAM_STRATEGY, 0);
    let take = proto.seed_labels.min(pairs.len());
    let mut budget = UseBudget::new(&uses_left(proto.max_uses, &rows, &uses));
    let seed_pairs: Vec<(usize, usize)> =
        rand::seq::index::sample(&mut rng, pairs.len(), pairs.len())
            .into_iter()
            .filter(|&c| budget.as_mut().is_none_or(|b| b.take(pairs[c])))
            .take(take)
            .map(|c| (rows[pairs[c].a as usize], rows[pairs[c].b as usize]))
            .collect();
    t.candidates += start.elapsed();
    let labelled = ask(&seed_pairs, &mut uses, &mut t);
    paid += labelled.len();
    for posterior in &mut posteriors {
        fit(posterior, &labelled, &mut t)?;
    }
    evaluate(kind, prep, plan, &posteriors, 0, paid, &mut points, &mut t)?;
    tick();

    for round in 1..=proto.rounds {
        let start = Instant::now();
        let shares = prep.draw_shares(plan, round, instances);
        t.candidates += start.elapsed();
        // The strategy's stream of the round, used by the instances one after the other.
        let mut rng = stream(prep.seed, STREAM_STRATEGY, round as u64);
        let chosen = pick_round(
            kind,
            prep,
            plan,
            &shares,
            &posteriors,
            &uses,
            &mut rng,
            &mut t,
        )
        .with_context(|| format!("round {round}"))?;
        if independent {
            for (posterior, mine) in posteriors.iter_mut().zip(&chosen) {
                let labelled = ask(mine, &mut uses, &mut t);
                paid += labelled.len();
                fit(posterior, &labelled, &mut t)?;
            }
        } else {
            let all: Vec<(usize, usize)> = chosen.concat();
            let labelled = ask(&all, &mut uses, &mut t);
            paid += labelled.len();
            fit(&mut posteriors[0], &labelled, &mut t)?;
        }
        evaluate(
            kind,
            prep,
            plan,
            &posteriors,
            round,
            paid,
            &mut points,
            &mut t,
        )?;
        tick();
    }
    Ok(Replicate { points, timings: t })
}

/// One round's picks, per instance (global row pairs), the instances choosing one after the other from
/// their own share of the pool with `rng`. Shared learners: one posterior, and instance i conditions on the
/// pairs instances 0..i picked this round (passed as in-flight difference vectors, as the daemon passes the
/// open requests of every instance). Independent learners: instance i selects with `posteriors[i]` and
/// conditions on nothing of the others'.
#[allow(clippy::too_many_arguments)]
fn pick_round(
    kind: StrategyKind,
    prep: &Prepared<'_>,
    plan: &Plan,
    shares: &[(Vec<usize>, Vec<Pair>)],
    posteriors: &[Posterior],
    uses: &[u32],
    rng: &mut StdRng,
    t: &mut Timings,
) -> anyhow::Result<Vec<Vec<(usize, usize)>>> {
    let scale = plan.scale_out;
    let independent = posteriors.len() > 1;
    let data = prep.data;
    // Difference vectors of this round's picks so far: in flight for the next instance (shared).
    let mut in_flight: Vec<Vec<f64>> = Vec::new();
    let mut chosen: Vec<Vec<(usize, usize)>> = vec![Vec::new(); shares.len()];
    for (i, (rows, pairs)) in shares.iter().enumerate() {
        let k = if scale.single() {
            plan.protocol.k
        } else {
            scale.batch_share(plan.protocol.k, i)
        };
        // Like the daemon, an instance with fewer than two pooled responses or no candidate sends
        // nothing.
        if k == 0 || rows.len() < 2 || pairs.is_empty() {
            continue;
        }
        let start = Instant::now();
        let pool = Mat::from_fn(data.dim(), rows.len(), |r, j| prep.x[(r, rows[j])]);
        let prompts: Vec<u64> = rows.iter().map(|&r| data.prompt()[r]).collect();
        let targets = candidates::within_prompt(&prompts);
        let left = uses_left(plan.protocol.max_uses, rows, uses);
        t.candidates += start.elapsed();

        let start = Instant::now();
        let input = SelectionInput {
            posterior: &posteriors[if independent { i } else { 0 }],
            embeddings: pool.as_ref(),
            candidates: pairs,
            in_flight: if independent { &[] } else { &in_flight },
            k,
            targets: &targets,
            uses_left: &left,
        };
        let picks = selection::select(kind, input, &plan.params, &mut *rng).with_context(|| {
            if scale.single() {
                format!("strategy {kind}")
            } else {
                format!("strategy {kind}, instance {i}")
            }
        })?;
        t.select += start.elapsed();
        drop(pool);

        chosen[i] = picks
            .iter()
            .map(|p| (rows[p.pair.a as usize], rows[p.pair.b as usize]))
            .collect();
        if !independent && !scale.single() {
            in_flight.extend(chosen[i].iter().map(|&(a, b)| prep.difference(a, b)));
        }
    }
    Ok(chosen)
}

/// Uses left per row of `rows` (the selection input's `uses_left`; empty when uses are unlimited).
fn uses_left(max_uses: u32, rows: &[usize], uses: &[u32]) -> Vec<u32> {
    if max_uses == 0 {
        return Vec::new();
    }
    rows.iter()
        .map(|&r| max_uses.saturating_sub(uses[r]))
        .collect()
}

/// Mean per-prompt 1 − Spearman of a posterior mean on the test prompts.
fn one_minus_spearman(prep: &Prepared<'_>, posterior: &Posterior) -> anyhow::Result<f64> {
    let pred = scoring::rewards(posterior.theta(), prep.test_x.as_ref());
    let rho = evaluation::mean_prompt_spearman(&pred, &prep.test_golden, &prep.test_prompt)
        .context("evaluating Spearman on test prompts")?;
    // No defined Spearman anywhere means a constant prediction (θ = 0 before any label): no ranking
    // information, ρ = 0.
    Ok(1.0 - rho.mean.unwrap_or(0.0))
}

/// Held-out metrics of the reported model (`posteriors[0]`), appended as points; with one instance the
/// label count is the model's own, in scale-out runs `paid` (every instance's labels). Scale-out runs add
/// the labels of the reported model and, with independent learners, every instance model's labels and
/// 1 − Spearman and their mean.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    kind: StrategyKind,
    prep: &Prepared<'_>,
    plan: &Plan,
    posteriors: &[Posterior],
    round: usize,
    paid: usize,
    points: &mut Vec<Point>,
    t: &mut Timings,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let posterior = &posteriors[0];
    let labels = if plan.scale_out.single() {
        posterior.label_count()
    } else {
        paid
    };
    let mut push = |metric: Metric, value: f64| {
        points.push(Point {
            strategy: kind,
            seed: prep.seed,
            round,
            labels,
            metric,
            value,
        })
    };
    push(
        Metric::OneMinusSpearman,
        one_minus_spearman(prep, posterior)?,
    );
    let pred = scoring::rewards(posterior.theta(), prep.test_x.as_ref());
    let bon = evaluation::expected_best_of_n_many(
        &pred,
        &prep.test_golden,
        &prep.test_prompt,
        &prep.best_of_n,
    )
    .context("evaluating Best-of-N on test prompts")?;
    for (&n, m) in prep.best_of_n.iter().zip(bon) {
        if let Some(v) = m.mean {
            push(Metric::BestOfN(n), v);
        }
    }
    if let Some(l) = posterior.prior_precision() {
        push(Metric::PriorPrecision, l);
    }
    let pq = posterior.prequential();
    if let Some(v) = pq.log_loss() {
        push(Metric::PrequentialLogLoss, v);
    }
    if let Some(v) = pq.accuracy() {
        push(Metric::PrequentialAccuracy, v);
    }
    if !plan.scale_out.single() {
        push(Metric::ModelLabels, posterior.label_count() as f64);
        if posteriors.len() > 1 {
            let mut sum = 0.0;
            for (i, p) in posteriors.iter().enumerate() {
                push(Metric::InstanceLabels(i), p.label_count() as f64);
                let v = one_minus_spearman(prep, p)?;
                push(Metric::InstanceOneMinusSpearman(i), v);
                sum += v;
            }
            push(
                Metric::InstanceMeanOneMinusSpearman,
                sum / posteriors.len() as f64,
            );
        }
    }
    t.evaluate += start.elapsed();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotator_is_symmetric_reproducible_and_calibrated() {
        let reward = [0.0, 1.0, 1.0];
        let mut a = Annotator::new(3, 1.0, &reward);
        let mut b = Annotator::new(3, 1.0, &reward);
        let ya: Vec<f64> = (0..2000).map(|_| a.label(1, 0)).collect();
        // Same pair asked the other way round: the complementary label, draw by draw.
        let yb: Vec<f64> = (0..2000).map(|_| b.label(0, 1)).collect();
        assert!(ya.iter().zip(&yb).all(|(x, y)| x + y == 1.0));
        let rate = ya.iter().sum::<f64>() / 2000.0;
        assert!((rate - sigmoid(1.0)).abs() < 0.035, "{rate}");

        let mut noiseless = Annotator::new(3, f64::INFINITY, &reward);
        assert!((0..50).all(|_| noiseless.label(1, 0) == 1.0));
        let ties: f64 = (0..2000).map(|_| noiseless.label(1, 2)).sum::<f64>() / 2000.0;
        assert!((ties - 0.5).abs() < 0.05, "{ties}");
    }

    #[test]
    fn streams_differ_by_tag_and_index() {
        use rand::Rng;
        let x: u64 = stream(1, STREAM_ROUND, 1).random();
        assert_eq!(x, stream(1, STREAM_ROUND, 1).random::<u64>());
        assert_ne!(x, stream(1, STREAM_ROUND, 2).random::<u64>());
        assert_ne!(x, stream(1, STREAM_STRATEGY, 1).random::<u64>());
        assert_ne!(x, stream(2, STREAM_ROUND, 1).random::<u64>());
    }

    /// With shared learners each instance's selection conditions on the pairs the instances before it
    /// picked this round; independent learners do not see each other's picks. Every prompt here has the
    /// same four response embeddings, so every instance's share of the pool offers the same difference
    /// vectors: unconditioned, identical posteriors pick the same direction three times.
    #[test]
    fn shared_instances_condition_on_each_others_picks_and_independent_ones_do_not() {
        use crate::simulate::SimulateConfig;
        let base = [
            [1.0f32, 0.2, -0.5],
            [0.1, -1.0, 0.7],
            [-0.8, 0.4, 0.3],
            [0.5, 0.9, -1.2],
        ];
        let (mut emb, mut reward, mut prompt) = (Vec::new(), Vec::new(), Vec::new());
        for p in 0..60u64 {
            for e in &base {
                emb.extend_from_slice(e);
                reward.push(f64::from(e[0] - 0.5 * e[1] + 0.25 * e[2]));
                prompt.push(p);
            }
        }
        let data = Dataset::new(
            "same",
            std::path::Path::new("in-memory"),
            3,
            emb,
            reward,
            prompt,
            false,
        )
        .unwrap();
        let mut cfg = SimulateConfig::default();
        cfg.protocol.k = 3;
        cfg.protocol.prompts_per_round = 48;
        cfg.protocol.max_uses = 0;
        cfg.scale_out.instances = 3;
        let plan = cfg.plan().unwrap();
        let prep = Prepared::new(&data, &plan, 0).unwrap();
        let shares = prep.draw_shares(&plan, 1, 3);
        // The shares are disjoint, each prompt on the instance its hash names, and none is empty.
        for (i, (rows, pairs)) in shares.iter().enumerate() {
            assert!(!pairs.is_empty(), "instance {i} has no candidates");
            assert!(rows.iter().all(|&r| instance_of(data.prompt()[r], 3) == i));
        }
        // A weak prior (variances in the thousands): a direction in flight is then far less uncertain than
        // any other, and greedy D-optimality must turn to another.
        let lambda = 1e-3;
        // Unit difference direction of a pick, with a fixed sign.
        let direction = |&(a, b): &(usize, usize)| -> Vec<i64> {
            let v = prep.difference(a, b);
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            let sign = if v.iter().find(|x| x.abs() > 1e-9).copied().unwrap_or(0.0) < 0.0 {
                -1.0
            } else {
                1.0
            };
            v.iter()
                .map(|x| (sign * x / norm * 1e6).round() as i64)
                .collect()
        };
        let picks = |learners: usize| -> Vec<Vec<i64>> {
            let posteriors: Vec<Posterior> = (0..learners)
                .map(|_| Posterior::new(3, lambda).unwrap())
                .collect();
            let mut rng = stream(0, STREAM_STRATEGY, 1);
            let chosen = pick_round(
                StrategyKind::GreedyDopt,
                &prep,
                &plan,
                &shares,
                &posteriors,
                &vec![0; data.len()],
                &mut rng,
                &mut Timings::default(),
            )
            .unwrap();
            assert!(chosen.iter().all(|c| c.len() == 1), "{chosen:?}");
            chosen.iter().map(|c| direction(&c[0])).collect()
        };
        let shared = picks(1);
        assert!(
            shared[0] != shared[1] && shared[1] != shared[2] && shared[0] != shared[2],
            "shared instances picked a direction twice: {shared:?}"
        );
        let independent = picks(3);
        assert!(
            independent.iter().all(|d| *d == independent[0]),
            "independent learners with one posterior state should pick alike: {independent:?}"
        );
    }
}
