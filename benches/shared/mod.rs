//! The synthetic selection workload shared by the `core` and `strategies` benches: a pool of random
//! embeddings (scaled like standardised ones), a posterior trained on random labels, and cross-prompt
//! candidate pairs.

use armd::candidates::{self, CandidateMode, CandidateOptions};
use armd::posterior::Posterior;
use armd::selection::SelectionInput;
use faer::Mat;
use rand::{rngs::StdRng, Rng, SeedableRng};

pub fn random_vec(d: usize, rng: &mut StdRng) -> Vec<f64> {
    (0..d)
        .map(|_| rng.random_range(-1.0..1.0) / (d as f64).sqrt())
        .collect()
}

/// A posterior with `n` labels applied (non-trivial θ and H).
pub fn trained(d: usize, n: usize, rng: &mut StdRng) -> Posterior {
    let mut p = Posterior::new(d, 1.0).unwrap();
    for _ in 0..n {
        let v = random_vec(d, rng);
        let y = if rng.random::<bool>() { 1.0 } else { 0.0 };
        p.update(&v, y).unwrap();
    }
    p
}

pub struct Pool {
    pub posterior: Posterior,
    pub x: Mat<f64>,
    pub pairs: Vec<candidates::Pair>,
    /// Within-prompt pairs (prompts of 10 responses), the `targeted` strategy's targets.
    pub targets: Vec<candidates::Pair>,
}

pub fn pool(d: usize, n: usize, max_cross: usize, labels: usize) -> Pool {
    let mut rng = StdRng::seed_from_u64(7);
    let posterior = trained(d, labels, &mut rng);
    let x = Mat::<f64>::from_fn(d, n, |_, _| rng.random_range(-1.0..1.0) / (d as f64).sqrt());
    let prompts: Vec<u64> = (0..n as u64).map(|i| i / 10).collect();
    let opts = CandidateOptions {
        mode: CandidateMode::Cross,
        max_cross_pairs: max_cross,
        max_within_pairs: 0,
    };
    let pairs = candidates::generate(&prompts, &opts, &mut rng);
    let targets = candidates::within_prompt(&prompts);
    Pool {
        posterior,
        x,
        pairs,
        targets,
    }
}

pub fn input(p: &Pool, k: usize) -> SelectionInput<'_> {
    SelectionInput {
        posterior: &p.posterior,
        embeddings: p.x.as_ref(),
        candidates: &p.pairs,
        in_flight: &[],
        k,
        targets: &p.targets,
        uses_left: &[],
    }
}
