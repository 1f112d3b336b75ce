//! A built-in synthetic dataset that looks like LLM embeddings where it matters to the method.
//!
//! Each response has a latent vector `h ∈ R^r` (`r = latent_dim`):
//! `h = μ_cluster + 0.5·ξ_prompt + diag(s)·g`, with cluster centres and prompt offsets shared by a prompt's
//! responses and a decaying per-direction spread `s_j ∝ (j+1)^(−1/2)` (normalised to mean square 1) for the
//! response's own part. The embedding is a noisy linear image of it, `x = B h + noise·ε` with `B` a random
//! d×r matrix — so embeddings are **clustered** (topics, prompts) and **anisotropic** (a few directions carry
//! most of the variance, as in real hidden states). A few **outlier dimensions** get an offset of ±40 and a
//! ×8 copy of one latent direction, like the massive activations of LLM hidden states: they dominate raw
//! norms (50–100, docs/design.md §2.2) and make feature scaling matter.
//!
//! The golden reward is partly linear and partly not in the latent: with `u = aᵀh` and `t = bᵀh`,
//! `r* = scale·(√(1−ν)·std(u) + √ν·std(tanh(t) + ½(cᵀh)²/‖c‖²))` where `std(·)` standardises over the dataset
//! and `ν = nonlinearity`. A linear head on the embeddings can therefore learn the linear share well and the
//! rest only approximately — as with a real reward model's last layer.

use std::path::Path;

use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::StandardNormal;

use super::config::SyntheticConfig;
use super::dataset::{Dataset, DatasetError};

/// Generates the dataset described in the module doc. Deterministic in `cfg` (including `cfg.seed`).
pub fn generate(cfg: &SyntheticConfig) -> Result<Dataset, DatasetError> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let (d, r) = (cfg.dim, cfg.latent_dim);
    let m = cfg.responses_per_prompt;
    let n = cfg.n_prompts * m;
    let normal = |rng: &mut StdRng| -> f64 { rng.sample(StandardNormal) };

    let spread: Vec<f64> = {
        let raw: Vec<f64> = (0..r).map(|j| ((j + 1) as f64).powf(-0.5)).collect();
        let ms = raw.iter().map(|s| s * s).sum::<f64>() / r as f64;
        raw.iter().map(|s| s / ms.sqrt()).collect()
    };
    let centres: Vec<Vec<f64>> = (0..cfg.clusters)
        .map(|_| (0..r).map(|_| normal(&mut rng)).collect())
        .collect();
    // B: d×r, row-major, entries N(0, 1/r) so that ‖Bh‖² ≈ ‖h‖² · d/r.
    let scale_b = 1.0 / (r as f64).sqrt();
    let b: Vec<f64> = (0..d * r).map(|_| normal(&mut rng) * scale_b).collect();
    let outliers: Vec<(usize, f64, usize)> = {
        let dims = rand::seq::index::sample(&mut rng, d, cfg.outlier_dims).into_vec();
        dims.into_iter()
            .map(|o| {
                let sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
                (o, 40.0 * sign, rng.random_range(0..r))
            })
            .collect()
    };
    let a: Vec<f64> = (0..r).map(|_| normal(&mut rng)).collect();
    let bt: Vec<f64> = (0..r)
        .map(|_| normal(&mut rng) / (r as f64).sqrt())
        .collect();
    let c: Vec<f64> = (0..r).map(|_| normal(&mut rng)).collect();
    let c_sq: f64 = c.iter().map(|x| x * x).sum();

    let mut embeddings = Vec::with_capacity(n * d);
    let mut lin = Vec::with_capacity(n);
    let mut nonlin = Vec::with_capacity(n);
    let mut prompt = Vec::with_capacity(n);
    let mut h = vec![0.0; r];
    for p in 0..cfg.n_prompts {
        let centre = &centres[rng.random_range(0..cfg.clusters)];
        let offset: Vec<f64> = (0..r).map(|_| 0.5 * normal(&mut rng)).collect();
        for _ in 0..m {
            for j in 0..r {
                h[j] = centre[j] + offset[j] + spread[j] * normal(&mut rng);
            }
            let start = embeddings.len();
            for i in 0..d {
                let row = &b[i * r..(i + 1) * r];
                let bh: f64 = row.iter().zip(&h).map(|(x, y)| x * y).sum();
                embeddings.push((bh + cfg.noise * normal(&mut rng)) as f32);
            }
            for &(o, offset, dir) in &outliers {
                embeddings[start + o] += (offset + 8.0 * h[dir]) as f32;
            }
            let dot = |w: &[f64]| w.iter().zip(&h).map(|(x, y)| x * y).sum::<f64>();
            lin.push(dot(&a));
            nonlin.push(dot(&bt).tanh() + 0.5 * dot(&c).powi(2) / c_sq);
            prompt.push(p as u64);
        }
    }
    standardise(&mut lin);
    standardise(&mut nonlin);
    let nu = cfg.nonlinearity;
    let reward: Vec<f64> = lin
        .iter()
        .zip(&nonlin)
        .map(|(l, q)| cfg.reward_scale * ((1.0 - nu).sqrt() * l + nu.sqrt() * q))
        .collect();
    let name = format!(
        "synthetic (P={}, m={}, d={}, seed={})",
        cfg.n_prompts, m, d, cfg.seed
    );
    Dataset::new(
        name,
        Path::new("synthetic"),
        d,
        embeddings,
        reward,
        prompt,
        false,
    )
}

/// Zero mean, unit variance (left as is when constant).
fn standardise(v: &mut [f64]) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    let sd = if var > 0.0 { var.sqrt() } else { 1.0 };
    v.iter_mut().for_each(|x| *x = (*x - mean) / sd);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SyntheticConfig {
        SyntheticConfig {
            n_prompts: 40,
            responses_per_prompt: 5,
            dim: 24,
            latent_dim: 8,
            ..Default::default()
        }
    }

    #[test]
    fn deterministic_shaped_and_heavy_tailed() {
        let a = generate(&cfg()).unwrap();
        let b = generate(&cfg()).unwrap();
        assert_eq!(a.len(), 200);
        assert_eq!(a.dim(), 24);
        assert_eq!(a.groups().len(), 40);
        assert!((0..a.len()).all(|i| a.embedding(i) == b.embedding(i)));
        assert_eq!(a.reward(), b.reward());
        // Reward standard deviation is reward_scale (up to the correlation of the two parts).
        let r = a.reward();
        let mean = r.iter().sum::<f64>() / r.len() as f64;
        let sd = (r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / r.len() as f64).sqrt();
        assert!(sd > 1.5 && sd < 4.5, "{sd}");
        // Outlier dimensions dominate the raw norm.
        let norm = |i: usize| {
            a.embedding(i)
                .iter()
                .map(|x| f64::from(*x).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        assert!(norm(0) > 50.0, "{}", norm(0));
        let other = generate(&SyntheticConfig { seed: 8, ..cfg() }).unwrap();
        assert_ne!(other.reward(), a.reward());
    }
}
