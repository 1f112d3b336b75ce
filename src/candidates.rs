//! Candidate pairs: which comparisons a selection round may choose from.
//!
//! Responses are referred to by their index in the round's pool (a column of the d×N embedding matrix).
//! Within-prompt pairs are all pairs among one prompt's responses. Cross-prompt pairs are sampled, because
//! there are O(N²) of them; the paper finds them more label-efficient.
//!
//! Cross-prompt pairs are a uniform random sample of all pairs of pooled responses to different prompts, so
//! every response can be reached in every round however few candidates are asked for. (An earlier
//! version drew whole 64×64 blocks of the pool for the sake of the pair scorer's dense tiles: with a few
//! thousand candidates that showed the selector one block pair, about 128 of the pool's responses, and
//! cost label efficiency. The scorer handles scattered pairs with direct dot products instead.)

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use rand::seq::SliceRandom;
use rand::Rng;

use crate::error::CoreError;

/// A candidate comparison between pool responses `a` and `b` (`a < b`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pair {
    pub a: u32,
    pub b: u32,
}

impl Pair {
    /// Orders the endpoints so equal pairs compare equal.
    pub fn new(a: u32, b: u32) -> Self {
        if a <= b {
            Self { a, b }
        } else {
            Self { a: b, b: a }
        }
    }
}

/// Which pairs to consider.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CandidateMode {
    /// All pairs of responses to the same prompt.
    Within,
    /// Sampled pairs of responses to different prompts.
    Cross,
    /// Both of the above.
    Both,
}

impl FromStr for CandidateMode {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, CoreError> {
        match s {
            "within" | "within-prompt" => Ok(Self::Within),
            "cross" | "cross-prompt" => Ok(Self::Cross),
            "both" => Ok(Self::Both),
            _ => Err(CoreError::UnknownName {
                what: "candidate mode",
                name: s.to_string(),
                expected: "within, cross, both",
            }),
        }
    }
}

impl fmt::Display for CandidateMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Within => "within",
            Self::Cross => "cross",
            Self::Both => "both",
        })
    }
}

/// How many candidates to build.
#[derive(Clone, Copy, Debug)]
pub struct CandidateOptions {
    pub mode: CandidateMode,
    /// Upper bound on sampled cross-prompt pairs per round.
    pub max_cross_pairs: usize,
    /// Upper bound on within-prompt pairs per round (a random subset is kept beyond it).
    pub max_within_pairs: usize,
}

impl Default for CandidateOptions {
    fn default() -> Self {
        Self {
            mode: CandidateMode::Both,
            max_cross_pairs: 200_000,
            max_within_pairs: 200_000,
        }
    }
}

/// Builds the candidate set for a pool whose response `i` belongs to prompt `prompts[i]`.
/// The result is sorted and free of duplicates.
pub fn generate(prompts: &[u64], opts: &CandidateOptions, rng: &mut impl Rng) -> Vec<Pair> {
    let mut out = Vec::new();
    if matches!(opts.mode, CandidateMode::Within | CandidateMode::Both) {
        let mut within = within_prompt(prompts);
        if within.len() > opts.max_within_pairs {
            within.shuffle(rng);
            within.truncate(opts.max_within_pairs);
        }
        out.extend(within);
    }
    if matches!(opts.mode, CandidateMode::Cross | CandidateMode::Both) {
        out.extend(cross_prompt(prompts, opts.max_cross_pairs, rng));
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// All pairs among the responses of each prompt.
pub fn within_prompt(prompts: &[u64]) -> Vec<Pair> {
    let mut groups: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for (i, &p) in prompts.iter().enumerate() {
        groups.entry(p).or_default().push(i as u32);
    }
    let mut out = Vec::new();
    for members in groups.values() {
        for (x, &a) in members.iter().enumerate() {
            for &b in &members[x + 1..] {
                out.push(Pair::new(a, b));
            }
        }
    }
    out
}

/// Up to `max_pairs` distinct pairs of responses to different prompts, drawn uniformly at random from all
/// such pairs of the pool (see the module doc). When the pool has no more than `max_pairs` cross pairs, all
/// are returned.
pub fn cross_prompt(prompts: &[u64], max_pairs: usize, rng: &mut impl Rng) -> Vec<Pair> {
    let n = prompts.len();
    if n < 2 || max_pairs == 0 {
        return Vec::new();
    }
    let mut sizes: HashMap<u64, usize> = HashMap::new();
    for &p in prompts {
        *sizes.entry(p).or_default() += 1;
    }
    let same: usize = sizes.values().map(|&s| s * (s - 1) / 2).sum();
    let total = n * (n - 1) / 2 - same;
    if total == 0 {
        return Vec::new();
    }
    // Dense request (at least a third of all cross pairs): enumerate and keep a uniform subset.
    if max_pairs.saturating_mul(3) >= total {
        let mut all = Vec::with_capacity(total);
        for a in 0..n {
            for b in a + 1..n {
                if prompts[a] != prompts[b] {
                    all.push(Pair::new(a as u32, b as u32));
                }
            }
        }
        if all.len() > max_pairs {
            all.shuffle(rng);
            all.truncate(max_pairs);
        }
        return all;
    }
    // Sparse request: rejection sampling of uniform unordered pairs. Each accepted draw is uniform over
    // the cross pairs not yet drawn, so the set is a uniform sample without replacement; at most a third
    // of the pairs are taken, so the expected number of draws stays below 1.5 per pair (plus the share of
    // same-prompt draws, small when prompts are many).
    let mut seen: HashSet<Pair> = HashSet::with_capacity(max_pairs);
    let mut out = Vec::with_capacity(max_pairs);
    while out.len() < max_pairs {
        let a = rng.random_range(0..n);
        let b = rng.random_range(0..n);
        if a == b || prompts[a] == prompts[b] {
            continue;
        }
        let p = Pair::new(a as u32, b as u32);
        if seen.insert(p) {
            out.push(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};
    use std::collections::HashSet;

    fn prompts(groups: &[usize]) -> Vec<u64> {
        groups
            .iter()
            .enumerate()
            .flat_map(|(p, &n)| std::iter::repeat_n(p as u64, n))
            .collect()
    }

    #[test]
    fn within_is_all_same_prompt_pairs() {
        let pr = prompts(&[3, 1, 4]);
        let pairs = within_prompt(&pr);
        let brute: HashSet<Pair> = (0..pr.len())
            .flat_map(|a| (a + 1..pr.len()).map(move |b| (a, b)))
            .filter(|&(a, b)| pr[a] == pr[b])
            .map(|(a, b)| Pair::new(a as u32, b as u32))
            .collect();
        assert_eq!(pairs.len(), 3 + 6);
        assert_eq!(pairs.into_iter().collect::<HashSet<_>>(), brute);
    }

    #[test]
    fn cross_pairs_are_distinct_cross_prompt_and_bounded() {
        let pr = prompts(&vec![7; 60]); // 420 responses, 7 blocks
        let mut rng = StdRng::seed_from_u64(1);
        let all_cross = (420 * 419) / 2 - 60 * 21;
        let everything = cross_prompt(&pr, usize::MAX, &mut rng);
        assert_eq!(everything.len(), all_cross);
        let some = cross_prompt(&pr, 5000, &mut rng);
        assert_eq!(some.len(), 5000);
        let set: HashSet<Pair> = some.iter().copied().collect();
        assert_eq!(set.len(), 5000);
        assert!(some
            .iter()
            .all(|p| pr[p.a as usize] != pr[p.b as usize] && p.a < p.b));
    }

    #[test]
    fn cross_sampling_covers_pairs_uniformly() {
        // Every pair should be drawn with the same probability: compare the hit rate of two far-apart
        // pairs over many draws.
        let pr: Vec<u64> = (0..200).collect();
        let target = 2000;
        let total = 200 * 199 / 2;
        let mut hits = [0u32; 2];
        let probes = [Pair::new(0, 1), Pair::new(70, 190)];
        for seed in 0..400 {
            let mut rng = StdRng::seed_from_u64(seed);
            let s: HashSet<Pair> = cross_prompt(&pr, target, &mut rng).into_iter().collect();
            for (h, p) in hits.iter_mut().zip(&probes) {
                *h += u32::from(s.contains(p));
            }
        }
        let expect = 400.0 * target as f64 / total as f64; // ≈ 40
        for h in hits {
            assert!(
                (h as f64 - expect).abs() < 4.0 * expect.sqrt() + 4.0,
                "{h} vs {expect}"
            );
        }
    }

    #[test]
    fn generate_merges_modes_without_duplicates() {
        let pr = prompts(&[4, 4, 4]);
        let mut rng = StdRng::seed_from_u64(2);
        let opts = CandidateOptions {
            mode: CandidateMode::Both,
            ..Default::default()
        };
        let both = generate(&pr, &opts, &mut rng);
        assert_eq!(both.len(), 12 * 11 / 2);
        assert!("nope".parse::<CandidateMode>().is_err());
        assert_eq!(
            "cross".parse::<CandidateMode>().unwrap(),
            CandidateMode::Cross
        );
    }
}

#[cfg(test)]
mod coverage_tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};
    use std::collections::HashSet;

    #[test]
    fn few_cross_candidates_still_reach_the_whole_pool() {
        // 1,000 responses, 4,500 candidates (about 1 % of the pairs): uniform pairs touch almost every
        // response (expected 1000·(1 − e⁻⁹)); the old block sampler showed about 128 of them.
        let prompts: Vec<u64> = (0..1000u64).map(|i| i / 10).collect();
        let mut rng = StdRng::seed_from_u64(5);
        let pairs = cross_prompt(&prompts, 4500, &mut rng);
        assert_eq!(pairs.len(), 4500);
        let touched: HashSet<u32> = pairs.iter().flat_map(|p| [p.a, p.b]).collect();
        assert!(touched.len() > 990, "{} responses reachable", touched.len());
    }
}
