//! The paper's evaluation metrics (docs/design.md §9.2), computed from predicted and golden rewards.
//!
//! - **Per-prompt Spearman**: for each test prompt, the rank correlation between predicted and golden rewards
//!   of its responses, averaged over prompts. Reports plot `1 − mean`.
//! - **Best-of-N**: for each test prompt, the golden reward of the response the model ranks highest among N
//!   random responses, averaged over prompts. [`expected_best_of_n`] gives the exact expectation over all
//!   N-subsets (deterministic, what the simulator reports); [`best_of_n`] draws one subset per prompt and
//!   exists to cross-check it and to mirror the paper's sampling procedure.
//!
//! Inputs are parallel slices: `predicted[i]`, `golden[i]` and `prompt[i]` describe response `i`. Prompt ids
//! need not be contiguous or sorted. Bad input (length mismatch, NaN/Inf) is a typed [`CoreError`]; nothing
//! here panics on user data. Pure Rust: no I/O, no async.

use crate::error::{check_dim, check_finite, CoreError};
use rand::Rng;

/// The N values of the paper's Best-of-N curves (docs/design.md §9.2). A prompt contributes to `N` only
/// when it has at least `N` responses, so large N are reported on fewer prompts (see
/// [`PromptMetric::prompts`]).
pub const BEST_OF_N: [usize; 7] = [5, 10, 30, 50, 100, 300, 500];

/// A metric averaged over prompts, with how many prompts it covers: an average over 3 prompts is not
/// comparable with one over 300, so callers should report the count beside the mean.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PromptMetric {
    /// Mean over the counted prompts; `None` when no prompt qualified.
    pub mean: Option<f64>,
    /// Prompts the mean is taken over.
    pub prompts: usize,
    /// Prompts left out (too few responses, or a metric undefined on them such as Spearman on constant
    /// rewards).
    pub skipped: usize,
}

impl PromptMetric {
    fn from_values(values: &[f64], skipped: usize) -> Self {
        let mean = if values.is_empty() {
            None
        } else {
            Some(values.iter().sum::<f64>() / values.len() as f64)
        };
        PromptMetric {
            mean,
            prompts: values.len(),
            skipped,
        }
    }
}

/// 1-based ranks, ties sharing the average of the ranks they span (the convention that makes Spearman the
/// Pearson correlation of ranks). `-0.0` and `0.0` tie. NaN never panics (it sorts by `total_cmp` and never
/// ties) but gives meaningless ranks; the metric functions reject NaN before ranking.
pub fn average_ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&i, &j| values[i].total_cmp(&values[j]));
    let mut ranks = vec![0.0; values.len()];
    let mut start = 0;
    while start < order.len() {
        // `total_cmp` puts -0.0 and 0.0 next to each other, so a run of `==` values is contiguous.
        let mut end = start + 1;
        while end < order.len() && values[order[end]] == values[order[start]] {
            end += 1;
        }
        // Positions start..end hold ranks start+1..=end; their average is (start + 1 + end) / 2.
        let rank = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        start = end;
    }
    ranks
}

/// Pearson correlation; `None` when either side has zero variance. Clamped to [-1, 1] against rounding.
fn pearson(a: &[f64], b: &[f64]) -> Option<f64> {
    let n = a.len() as f64;
    let mean_a = a.iter().sum::<f64>() / n;
    let mean_b = b.iter().sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x - mean_a, y - mean_b);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    if saa <= 0.0 || sbb <= 0.0 {
        return None;
    }
    Some((sab / (saa * sbb).sqrt()).clamp(-1.0, 1.0))
}

/// Spearman rank correlation with average ranks for ties, or the reason the input is invalid.
///
/// `Ok(None)` when the correlation is undefined: fewer than 2 values, or either side constant.
/// Errors: lengths differ ([`CoreError::Dimension`]) or a value is NaN/Inf ([`CoreError::NonFinite`]).
pub fn try_spearman(a: &[f64], b: &[f64]) -> Result<Option<f64>, CoreError> {
    check_dim("spearman: second sample length", a.len(), b.len())?;
    check_finite("spearman: first sample", a)?;
    check_finite("spearman: second sample", b)?;
    Ok(spearman_unchecked(a, b))
}

/// Spearman rank correlation (Pearson correlation of average ranks), in [-1, 1].
///
/// `None` when it is undefined (fewer than 2 values, a constant side) and also on invalid input (length
/// mismatch, NaN/Inf); use [`try_spearman`] to tell these apart.
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    try_spearman(a, b).ok().flatten()
}

fn spearman_unchecked(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() < 2 {
        return None;
    }
    pearson(&average_ranks(a), &average_ranks(b))
}

/// Checks the three parallel inputs of the per-prompt metrics.
fn check_inputs(predicted: &[f64], golden: &[f64], prompt: &[u64]) -> Result<(), CoreError> {
    check_dim("golden rewards length", predicted.len(), golden.len())?;
    check_dim("prompt ids length", predicted.len(), prompt.len())?;
    check_finite("predicted rewards", predicted)?;
    check_finite("golden rewards", golden)
}

/// Response indices grouped by prompt: groups in ascending prompt id, members in input order, so results
/// (and the random draws of [`best_of_n`]) do not depend on hash order.
fn group_by_prompt(prompt: &[u64]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..prompt.len()).collect();
    order.sort_by_key(|&i| prompt[i]); // stable: members keep input order
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (pos, &i) in order.iter().enumerate() {
        if pos == 0 || prompt[order[pos - 1]] != prompt[i] {
            groups.push(Vec::new());
        }
        if let Some(group) = groups.last_mut() {
            group.push(i);
        }
    }
    groups
}

/// Mean per-prompt Spearman correlation between predicted and golden rewards (the paper's ranking metric;
/// report `1 − mean`).
///
/// Prompts with fewer than 2 responses or constant predicted/golden rewards have no Spearman and are
/// counted in `skipped`. A constant prediction is thus *not* scored as 0: check `prompts` against the
/// number of test prompts.
pub fn mean_prompt_spearman(
    predicted: &[f64],
    golden: &[f64],
    prompt: &[u64],
) -> Result<PromptMetric, CoreError> {
    check_inputs(predicted, golden, prompt)?;
    let mut values = Vec::new();
    let mut skipped = 0;
    let (mut p, mut g) = (Vec::new(), Vec::new());
    for group in group_by_prompt(prompt) {
        p.clear();
        g.clear();
        p.extend(group.iter().map(|&i| predicted[i]));
        g.extend(group.iter().map(|&i| golden[i]));
        match spearman_unchecked(&p, &g) {
            Some(rho) => values.push(rho),
            None => skipped += 1,
        }
    }
    Ok(PromptMetric::from_values(&values, skipped))
}

fn check_n(n: usize) -> Result<(), CoreError> {
    if n == 0 {
        return Err(CoreError::Parameter {
            name: "best-of-n N",
            value: n.to_string(),
            reason: "must be at least 1",
        });
    }
    Ok(())
}

/// Best-of-N by sampling: for each prompt with at least `n` responses, draw `n` distinct responses
/// uniformly, keep the golden reward of the one with the highest predicted reward, and average over prompts.
///
/// Ties in the predicted maximum are broken uniformly at random (so a model that cannot distinguish
/// responses scores like random choice, not like whichever response happens to come first). One draw per
/// prompt: noisy; prefer [`expected_best_of_n`], its exact expectation. Prompts with fewer than `n`
/// responses are `skipped`. Errors: `n == 0`, length mismatch, NaN/Inf.
pub fn best_of_n<R: Rng + ?Sized>(
    predicted: &[f64],
    golden: &[f64],
    prompt: &[u64],
    n: usize,
    rng: &mut R,
) -> Result<PromptMetric, CoreError> {
    check_n(n)?;
    check_inputs(predicted, golden, prompt)?;
    let mut values = Vec::new();
    let mut skipped = 0;
    let mut best: Vec<usize> = Vec::new();
    for group in group_by_prompt(prompt) {
        if group.len() < n {
            skipped += 1;
            continue;
        }
        best.clear();
        let mut top = f64::NEG_INFINITY;
        for k in rand::seq::index::sample(rng, group.len(), n) {
            let i = group[k];
            if predicted[i] > top {
                top = predicted[i];
                best.clear();
                best.push(i);
            } else if predicted[i] == top {
                best.push(i);
            }
        }
        // Finite inputs and n >= 1 guarantee at least one best; only spend randomness on real ties.
        let pick = match best.len() {
            0 => continue,
            1 => best[0],
            len => best[rng.random_range(0..len)],
        };
        values.push(golden[pick]);
    }
    Ok(PromptMetric::from_values(&values, skipped))
}

/// Exact Best-of-N: the expectation of [`best_of_n`] over all `n`-subsets and tie-breaks, in closed form.
///
/// Sort a prompt's `m` responses by predicted reward, best first. The response at 0-based position `i` is
/// the top of a uniformly random `n`-subset with probability `C(m−1−i, n−1) / C(m, n)` (the subset must
/// contain it and draw its other `n−1` members from the `m−1−i` below it). For ties the positions are an
/// arbitrary fixed order, and since a uniform tie-break picks every tied member of the subset with equal
/// chance, a run of tied predictions contributes its total probability times the mean golden reward of the
/// run. Deterministic, O(m log m) per prompt, no sampling noise: what the simulator reports.
pub fn expected_best_of_n(
    predicted: &[f64],
    golden: &[f64],
    prompt: &[u64],
    n: usize,
) -> Result<PromptMetric, CoreError> {
    let mut all = expected_best_of_n_many(predicted, golden, prompt, &[n])?;
    all.pop().ok_or(CoreError::Empty {
        what: "best-of-n results",
    })
}

/// [`expected_best_of_n`] for several N at once (e.g. [`BEST_OF_N`]), grouping and sorting each prompt
/// once. Returns one [`PromptMetric`] per entry of `ns`, in order.
pub fn expected_best_of_n_many(
    predicted: &[f64],
    golden: &[f64],
    prompt: &[u64],
    ns: &[usize],
) -> Result<Vec<PromptMetric>, CoreError> {
    for &n in ns {
        check_n(n)?;
    }
    check_inputs(predicted, golden, prompt)?;
    let mut values: Vec<Vec<f64>> = vec![Vec::new(); ns.len()];
    let mut skipped = vec![0usize; ns.len()];
    let mut top_probs = Vec::new();
    for mut group in group_by_prompt(prompt) {
        // Best predicted first; the stable sort keeps input order among ties (any fixed order works).
        group.sort_by(|&i, &j| predicted[j].total_cmp(&predicted[i]));
        for (k, &n) in ns.iter().enumerate() {
            if group.len() < n {
                skipped[k] += 1;
                continue;
            }
            top_probabilities(group.len(), n, &mut top_probs);
            values[k].push(tie_averaged_expectation(
                &group, &top_probs, predicted, golden,
            ));
        }
    }
    Ok(values
        .iter()
        .zip(skipped)
        .map(|(v, s)| PromptMetric::from_values(v, s))
        .collect())
}

/// `out[i] = C(m−1−i, n−1) / C(m, n)` for `i in 0..m`, requires `1 <= n <= m`. Uses the ratio recursion
/// `out[0] = n/m`, `out[i+1] = out[i]·(m−n−i)/(m−1−i)`: every factor is in [0, 1], so there is no overflow
/// for any m (binomials themselves overflow f64 past m ≈ 1000), and the tail reaches exactly 0 at i = m−n+1.
fn top_probabilities(m: usize, n: usize, out: &mut Vec<f64>) {
    out.clear();
    let mut p = n as f64 / m as f64;
    for i in 0..m {
        out.push(p);
        if i + 1 < m {
            // m - n - i may be negative once p is already 0; saturate to keep it exactly 0.
            let num = (m - n).saturating_sub(i) as f64;
            p *= num / (m - 1 - i) as f64;
        }
    }
}

/// Σ over runs of tied predictions of (run probability × run's mean golden reward); `sorted` is the prompt
/// sorted by predicted reward, best first.
fn tie_averaged_expectation(
    sorted: &[usize],
    probs: &[f64],
    predicted: &[f64],
    golden: &[f64],
) -> f64 {
    let mut total = 0.0;
    let mut start = 0;
    while start < sorted.len() {
        let mut end = start + 1;
        while end < sorted.len() && predicted[sorted[end]] == predicted[sorted[start]] {
            end += 1;
        }
        let prob: f64 = probs[start..end].iter().sum();
        if prob > 0.0 {
            let mean_golden =
                sorted[start..end].iter().map(|&i| golden[i]).sum::<f64>() / (end - start) as f64;
            total += prob * mean_golden;
        }
        start = end;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Independent O(n²) ranks: 1 + #smaller + (#equal others)/2.
    fn brute_ranks(v: &[f64]) -> Vec<f64> {
        v.iter()
            .enumerate()
            .map(|(i, &x)| {
                let smaller = v.iter().filter(|&&y| y < x).count() as f64;
                let equal_others = v
                    .iter()
                    .enumerate()
                    .filter(|&(j, &y)| j != i && y == x)
                    .count() as f64;
                1.0 + smaller + equal_others / 2.0
            })
            .collect()
    }

    /// Independent Pearson via the raw-moment formula (different from the centred one in the module).
    fn brute_pearson(a: &[f64], b: &[f64]) -> Option<f64> {
        let n = a.len() as f64;
        let sa: f64 = a.iter().sum();
        let sb: f64 = b.iter().sum();
        let saa: f64 = a.iter().map(|x| x * x).sum();
        let sbb: f64 = b.iter().map(|x| x * x).sum();
        let sab: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let va = n * saa - sa * sa;
        let vb = n * sbb - sb * sb;
        if va.abs() < 1e-9 || vb.abs() < 1e-9 {
            return None;
        }
        Some((n * sab - sa * sb) / (va * vb).sqrt())
    }

    fn small_ints(rng: &mut StdRng, len: usize, levels: u32) -> Vec<f64> {
        (0..len)
            .map(|_| rng.random_range(0..levels) as f64)
            .collect()
    }

    #[test]
    fn average_ranks_known_values() {
        assert_eq!(
            average_ranks(&[10.0, 20.0, 20.0, 30.0]),
            vec![1.0, 2.5, 2.5, 4.0]
        );
        assert_eq!(average_ranks(&[3.0, 1.0, 2.0]), vec![3.0, 1.0, 2.0]);
        assert_eq!(average_ranks(&[5.0, 5.0, 5.0]), vec![2.0, 2.0, 2.0]);
        assert_eq!(average_ranks(&[0.0, -0.0]), vec![1.5, 1.5]);
        assert!(average_ranks(&[]).is_empty());
    }

    #[test]
    fn average_ranks_match_brute_force_with_ties() {
        let mut rng = StdRng::seed_from_u64(1);
        for len in 1..12 {
            for _ in 0..50 {
                let v = small_ints(&mut rng, len, 4);
                assert_eq!(average_ranks(&v), brute_ranks(&v), "{v:?}");
            }
        }
    }

    #[test]
    fn spearman_textbook_value() {
        // Wikipedia's "Spearman's rank correlation coefficient" example (IQ vs hours of TV): ρ = −29/165.
        let iq = [
            106.0, 100.0, 86.0, 101.0, 99.0, 103.0, 97.0, 113.0, 112.0, 110.0,
        ];
        let tv = [7.0, 27.0, 2.0, 50.0, 28.0, 29.0, 20.0, 12.0, 6.0, 17.0];
        let rho = spearman(&iq, &tv).expect("defined");
        assert!((rho - (-29.0 / 165.0)).abs() < 1e-12, "{rho}");
    }

    #[test]
    fn spearman_matches_classic_formula_without_ties() {
        // ρ = 1 − 6 Σ d² / (n (n² − 1)) holds exactly when there are no ties.
        let mut rng = StdRng::seed_from_u64(2);
        for len in 2..15 {
            let a: Vec<f64> = (0..len).map(|_| rng.random::<f64>()).collect();
            let b: Vec<f64> = (0..len).map(|_| rng.random::<f64>()).collect();
            let (ra, rb) = (brute_ranks(&a), brute_ranks(&b));
            let d2: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - y) * (x - y)).sum();
            let n = len as f64;
            let classic = 1.0 - 6.0 * d2 / (n * (n * n - 1.0));
            let rho = spearman(&a, &b).expect("defined");
            assert!((rho - classic).abs() < 1e-12, "{rho} vs {classic}");
        }
    }

    #[test]
    fn spearman_matches_brute_force_with_ties() {
        let mut rng = StdRng::seed_from_u64(3);
        for len in 2..12 {
            for _ in 0..50 {
                let a = small_ints(&mut rng, len, 3);
                let b = small_ints(&mut rng, len, 3);
                let expected = brute_pearson(&brute_ranks(&a), &brute_ranks(&b));
                match (spearman(&a, &b), expected) {
                    (Some(x), Some(y)) => assert!((x - y).abs() < 1e-12, "{a:?} {b:?}"),
                    (None, None) => {}
                    other => panic!("{a:?} {b:?}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn spearman_hand_example_with_ties() {
        // Ranks a = [1, 2.5, 2.5, 4], b = [1, 2, 3, 4]: centred a = [-1.5, 0, 0, 1.5], b = [-1.5, -.5, .5, 1.5];
        // Σab = 4.5, Σa² = 4.5, Σb² = 5  →  ρ = 4.5 / sqrt(22.5) = 0.9486832980505138.
        let rho = spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 2.0, 3.0, 4.0]).expect("defined");
        assert!((rho - 4.5 / 22.5f64.sqrt()).abs() < 1e-15);
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[30.0, 20.0, 10.0]), Some(-1.0));
    }

    #[test]
    fn spearman_undefined_and_invalid() {
        assert_eq!(spearman(&[], &[]), None);
        assert_eq!(spearman(&[1.0], &[2.0]), None);
        assert_eq!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), None);
        assert_eq!(try_spearman(&[1.0, 2.0], &[3.0, 3.0]), Ok(None));
        assert!(matches!(
            try_spearman(&[1.0, 2.0], &[1.0]),
            Err(CoreError::Dimension {
                expected: 2,
                got: 1,
                ..
            })
        ));
        assert!(matches!(
            try_spearman(&[1.0, f64::NAN], &[1.0, 2.0]),
            Err(CoreError::NonFinite { index: 1, .. })
        ));
        assert!(matches!(
            try_spearman(&[1.0, 2.0], &[f64::INFINITY, 2.0]),
            Err(CoreError::NonFinite { index: 0, .. })
        ));
        assert_eq!(spearman(&[1.0, f64::NAN], &[1.0, 2.0]), None);
    }

    #[test]
    fn mean_prompt_spearman_by_hand() {
        // Prompt 7: perfect order (ρ = 1). Prompt 3: reversed (ρ = −1). Prompt 9: the tie example (ρ = 0.9487).
        // Prompt 5: a single response (skipped). Prompt 1: constant golden (skipped). Interleaved on purpose.
        let rows: [(u64, f64, f64); 13] = [
            (7, 0.1, 1.0),
            (3, 1.0, 5.0),
            (9, 1.0, 1.0),
            (5, 0.3, 0.3),
            (7, 0.2, 2.0),
            (1, 0.1, 4.0),
            (3, 2.0, 4.0),
            (9, 2.0, 2.0),
            (7, 0.3, 3.0),
            (1, 0.2, 4.0),
            (3, 3.0, 3.0),
            (9, 2.0, 3.0),
            (9, 3.0, 4.0),
        ];
        let prompt: Vec<u64> = rows.iter().map(|r| r.0).collect();
        let predicted: Vec<f64> = rows.iter().map(|r| r.1).collect();
        let golden: Vec<f64> = rows.iter().map(|r| r.2).collect();
        let m = mean_prompt_spearman(&predicted, &golden, &prompt).expect("valid");
        assert_eq!(m.prompts, 3);
        assert_eq!(m.skipped, 2);
        let expected = (1.0 - 1.0 + 4.5 / 22.5f64.sqrt()) / 3.0;
        assert!((m.mean.expect("some prompts") - expected).abs() < 1e-15);
    }

    #[test]
    fn mean_prompt_spearman_edge_cases() {
        let empty = mean_prompt_spearman(&[], &[], &[]).expect("valid");
        assert_eq!(
            empty,
            PromptMetric {
                mean: None,
                prompts: 0,
                skipped: 0
            }
        );
        let singletons = mean_prompt_spearman(&[1.0, 2.0], &[1.0, 2.0], &[1, 2]).expect("valid");
        assert_eq!(singletons.mean, None);
        assert_eq!(singletons.skipped, 2);
        assert!(matches!(
            mean_prompt_spearman(&[1.0, 2.0], &[1.0, 2.0], &[1]),
            Err(CoreError::Dimension { .. })
        ));
        assert!(matches!(
            mean_prompt_spearman(&[1.0, 2.0], &[1.0], &[1, 1]),
            Err(CoreError::Dimension { .. })
        ));
        assert!(matches!(
            mean_prompt_spearman(&[1.0, 2.0], &[f64::NAN, 2.0], &[1, 1]),
            Err(CoreError::NonFinite { .. })
        ));
    }

    /// Expected Best-of-N by enumerating every n-subset of `0..m` and, within each, averaging the golden
    /// reward over the tied predicted maxima (the expectation of a uniform tie-break).
    fn brute_expected_best_of_n(predicted: &[f64], golden: &[f64], n: usize) -> f64 {
        let m = predicted.len();
        let (mut total, mut count) = (0.0, 0usize);
        for mask in 0u32..(1 << m) {
            if mask.count_ones() as usize != n {
                continue;
            }
            let members: Vec<usize> = (0..m).filter(|&i| mask & (1 << i) != 0).collect();
            let top = members
                .iter()
                .map(|&i| predicted[i])
                .fold(f64::NEG_INFINITY, f64::max);
            let tied: Vec<usize> = members
                .into_iter()
                .filter(|&i| predicted[i] == top)
                .collect();
            total += tied.iter().map(|&i| golden[i]).sum::<f64>() / tied.len() as f64;
            count += 1;
        }
        total / count as f64
    }

    #[test]
    fn top_probabilities_sum_to_one() {
        let mut probs = Vec::new();
        for (m, n) in [
            (1, 1),
            (5, 1),
            (5, 5),
            (10, 3),
            (1000, 500),
            (5000, 5),
            (600, 300),
        ] {
            top_probabilities(m, n, &mut probs);
            let sum: f64 = probs.iter().sum();
            assert!((sum - 1.0).abs() < 1e-12, "m={m} n={n} sum={sum}");
            assert!(probs.iter().all(|p| (0.0..=1.0).contains(p)));
            assert!(probs[m - n + 1..].iter().all(|&p| p == 0.0));
        }
    }

    #[test]
    fn expected_best_of_n_matches_subset_enumeration() {
        let mut rng = StdRng::seed_from_u64(4);
        for m in 1..=9 {
            for trial in 0..20 {
                // Half the trials use coarse predictions so ties are common.
                let levels = if trial % 2 == 0 { 3 } else { 1000 };
                let predicted = small_ints(&mut rng, m, levels);
                let golden: Vec<f64> = (0..m).map(|_| rng.random_range(-2.0..2.0)).collect();
                let prompt = vec![42u64; m];
                for n in 1..=m {
                    let got = expected_best_of_n(&predicted, &golden, &prompt, n)
                        .expect("valid")
                        .mean
                        .expect("prompt has n responses");
                    let want = brute_expected_best_of_n(&predicted, &golden, n);
                    assert!((got - want).abs() < 1e-12, "m={m} n={n}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn expected_best_of_n_limits_and_counts() {
        let predicted = [0.5, 0.1, 0.9, 0.3, 0.9];
        let golden = [1.0, 2.0, 3.0, 4.0, 5.0];
        let prompt = [1, 1, 1, 1, 1];
        // N = 1 is a uniform random response: the mean golden reward.
        let one = expected_best_of_n(&predicted, &golden, &prompt, 1).expect("valid");
        assert!((one.mean.expect("defined") - 3.0).abs() < 1e-15);
        // N = m always contains the top predictions, tied at 0.9: the mean of golden 3 and 5.
        let all = expected_best_of_n(&predicted, &golden, &prompt, 5).expect("valid");
        assert!((all.mean.expect("defined") - 4.0).abs() < 1e-15);
        let too_many = expected_best_of_n(&predicted, &golden, &prompt, 6).expect("valid");
        assert_eq!(
            too_many,
            PromptMetric {
                mean: None,
                prompts: 0,
                skipped: 1
            }
        );
        // Several prompts and several N at once agree with one-N calls.
        let predicted = [0.2, 0.8, 0.5, 0.1, 0.9, 0.4, 0.3];
        let golden = [1.0, 3.0, 2.0, 0.0, 1.0, 2.0, 5.0];
        let prompt = [1, 1, 1, 2, 2, 2, 2];
        let many =
            expected_best_of_n_many(&predicted, &golden, &prompt, &[1, 3, 4]).expect("valid");
        for (k, &n) in [1, 3, 4].iter().enumerate() {
            let single = expected_best_of_n(&predicted, &golden, &prompt, n).expect("valid");
            assert_eq!(many[k], single);
        }
        assert_eq!((many[2].prompts, many[2].skipped), (1, 1));
        // Prompt 1 at N = 3 picks golden 3.0; prompt 2 at N = 3: sorted golden [1, 2, 5, 0] with top
        // probabilities [3/4, 1/4, 0, 0] gives 1.25; mean 2.125.
        assert!((many[1].mean.expect("defined") - 2.125).abs() < 1e-15);
    }

    #[test]
    fn best_of_n_rejects_bad_input() {
        let mut rng = StdRng::seed_from_u64(5);
        let p = [1.0, 2.0];
        assert!(matches!(
            best_of_n(&p, &p, &[1, 1], 0, &mut rng),
            Err(CoreError::Parameter { .. })
        ));
        assert!(matches!(
            expected_best_of_n(&p, &p, &[1, 1], 0),
            Err(CoreError::Parameter { .. })
        ));
        assert!(matches!(
            best_of_n(&p, &[1.0], &[1, 1], 1, &mut rng),
            Err(CoreError::Dimension { .. })
        ));
        assert!(matches!(
            expected_best_of_n(&[1.0, f64::NEG_INFINITY], &p, &[1, 1], 1),
            Err(CoreError::NonFinite { index: 1, .. })
        ));
    }

    #[test]
    fn monte_carlo_best_of_n_converges_to_exact() {
        // 50 prompts of 12 responses with coarse (tied) predictions; golden in [0, 1] so one draw has standard
        // deviation ≤ 0.5. 400 repetitions × 50 prompts = 20 000 draws per N: standard error ≤ 0.0036, and
        // the tolerance 0.015 is > 4 standard errors. The seed makes the test deterministic.
        let mut rng = StdRng::seed_from_u64(6);
        let (prompts, per) = (50, 12);
        let prompt: Vec<u64> = (0..prompts * per).map(|i| (i % prompts) as u64).collect();
        let golden: Vec<f64> = (0..prompts * per).map(|_| rng.random::<f64>()).collect();
        // Predictions correlate with golden but are noisy and rounded (ties).
        let predicted: Vec<f64> = golden
            .iter()
            .map(|g| ((g + rng.random_range(-0.5..0.5)) * 4.0).round())
            .collect();
        for n in [1, 3, 5, 12] {
            let exact = expected_best_of_n(&predicted, &golden, &prompt, n)
                .expect("valid")
                .mean
                .expect("defined");
            let reps = 400;
            let mut sum = 0.0;
            for _ in 0..reps {
                let draw = best_of_n(&predicted, &golden, &prompt, n, &mut rng).expect("valid");
                assert_eq!((draw.prompts, draw.skipped), (prompts, 0));
                sum += draw.mean.expect("defined");
            }
            let mc = sum / reps as f64;
            assert!(
                (mc - exact).abs() < 0.015,
                "n={n}: MC {mc} vs exact {exact}"
            );
        }
        // A better-than-random model should gain from larger N.
        let at = |n| {
            expected_best_of_n(&predicted, &golden, &prompt, n)
                .expect("valid")
                .mean
                .expect("defined")
        };
        assert!(at(5) > at(1));
    }

    /// Values on a small integer grid so that ties are frequent and monotone maps keep them distinct.
    fn paired_samples() -> impl Strategy<Value = (Vec<f64>, Vec<f64>)> {
        (0usize..20).prop_flat_map(|len| {
            (
                prop::collection::vec((-30i32..30).prop_map(f64::from), len),
                prop::collection::vec((-30i32..30).prop_map(f64::from), len),
            )
        })
    }

    proptest! {
        #[test]
        fn spearman_is_bounded((a, b) in paired_samples()) {
            if let Some(rho) = spearman(&a, &b) {
                prop_assert!((-1.0..=1.0).contains(&rho));
            }
        }

        #[test]
        fn spearman_is_symmetric((a, b) in paired_samples()) {
            prop_assert_eq!(spearman(&a, &b), spearman(&b, &a));
        }

        #[test]
        fn spearman_is_invariant_under_monotone_maps((a, b) in paired_samples()) {
            let rho = spearman(&a, &b);
            let increasing: Vec<f64> = a.iter().map(|x| (x / 7.0).exp() + x.powi(3)).collect();
            let affine: Vec<f64> = b.iter().map(|y| 2.5 * y - 100.0).collect();
            let decreasing: Vec<f64> = b.iter().map(|y| -y.powi(3)).collect();
            match (rho, spearman(&increasing, &affine), spearman(&a, &decreasing)) {
                (Some(r), Some(s), Some(t)) => {
                    prop_assert!((r - s).abs() < 1e-12);
                    prop_assert!((r + t).abs() < 1e-12);
                }
                (None, None, None) => {}
                other => prop_assert!(false, "definedness changed: {:?}", other),
            }
        }
    }
}
