//! End-to-end tests of `armd simulate` through its library entry point `simulate::run`: determinism,
//! strategy ranking on the synthetic generator, and clear errors for bad inputs.

use std::path::{Path, PathBuf};

use armd::simulate::{self, dataset, SimulateConfig};

/// A small, fast configuration on the synthetic generator writing into `out`.
fn small(out: &Path) -> SimulateConfig {
    let mut c = SimulateConfig {
        out_dir: out.to_path_buf(),
        strategies: vec!["dopt".into(), "greedy-dopt".into()],
        seeds: vec![0, 1],
        ..Default::default()
    };
    c.synthetic.n_prompts = 60;
    c.synthetic.responses_per_prompt = 5;
    c.synthetic.dim = 24;
    c.synthetic.latent_dim = 8;
    c.protocol.rounds = 3;
    c.protocol.k = 5;
    c.protocol.prompts_per_round = 20;
    c.protocol.seed_labels = 5;
    c.protocol.max_cross_pairs = 2000;
    c
}

fn read(p: PathBuf) -> Vec<u8> {
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn same_config_and_seed_give_byte_identical_points_csv() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let mut ca = small(a.path());
    ca.protocol.candidates = "both".into();
    ca.protocol.refit_every = 7;
    let mut cb = ca.clone();
    cb.out_dir = b.path().to_path_buf();
    // Sequential execution must not change a single byte either.
    let mut cc = ca.clone();
    cc.out_dir = c.path().to_path_buf();
    cc.output.parallel = false;
    let sa = simulate::run(ca, false).unwrap();
    simulate::run(cb, false).unwrap();
    simulate::run(cc, false).unwrap();
    let (pa, pb, pc) = (
        read(a.path().join("points.csv")),
        read(b.path().join("points.csv")),
        read(c.path().join("points.csv")),
    );
    assert_eq!(pa, pb);
    assert_eq!(pa, pc);
    // 2 strategies × 2 seeds × (3 rounds + seed round), each with 1 − Spearman.
    let text = String::from_utf8(pa).unwrap();
    assert_eq!(text.matches("one_minus_spearman").count(), 2 * 2 * 4);
    assert!(text.starts_with("strategy,seed,round,labels,metric,value\n"));
    assert_eq!(
        read(a.path().join("summary.md")),
        read(b.path().join("summary.md"))
    );
    for f in ["one_minus_spearman.svg", "best_of_5.svg", "figure.svg"] {
        assert!(a.path().join(f).is_file(), "{f} missing");
    }
    // The last round used all labels: 5 seed labels + 3 × 5.
    assert_eq!(
        sa.row(armd::selection::StrategyKind::GreedyDopt)
            .unwrap()
            .final_labels,
        20.0
    );
}

#[test]
fn a_different_seed_gives_different_points() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ca = small(a.path());
    let mut cb = small(b.path());
    cb.seeds = vec![0, 2];
    simulate::run(ca, false).unwrap();
    simulate::run(cb, false).unwrap();
    assert_ne!(
        read(a.path().join("points.csv")),
        read(b.path().join("points.csv"))
    );
}

/// Writes a small valid dataset to `dir` and returns a config reading it.
fn npy_config(dir: &Path, out: &Path) -> SimulateConfig {
    let mut c = small(out);
    let data = simulate::synthetic::generate(&c.synthetic).unwrap();
    dataset::write_npy_dir(dir, &data).unwrap();
    c.dataset.source = "npy".into();
    c.dataset.path = dir.to_path_buf();
    c.seeds = vec![0];
    c.protocol.rounds = 1;
    c
}

fn error_of(c: SimulateConfig) -> String {
    format!("{:#}", simulate::run(c, false).unwrap_err())
}

fn write_npy<T: npyz::AutoSerialize + Copy>(path: &Path, shape: &[u64], values: &[T]) {
    use npyz::WriterBuilder;
    let f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut w = npyz::WriteOptions::<T>::new()
        .default_dtype()
        .shape(shape)
        .writer(f)
        .begin_nd()
        .unwrap();
    w.extend(values.iter().copied()).unwrap();
    w.finish().unwrap();
}

#[test]
fn npy_dataset_loads_and_matches_the_in_memory_run() {
    let (d, o1, o2) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let c = npy_config(d.path(), o1.path());
    let mut mem = c.clone();
    mem.dataset.source = "synthetic".into();
    mem.out_dir = o2.path().to_path_buf();
    simulate::run(c, false).unwrap();
    simulate::run(mem, false).unwrap();
    assert_eq!(
        read(o1.path().join("points.csv")),
        read(o2.path().join("points.csv"))
    );
}

#[test]
fn bad_inputs_end_with_an_error_naming_the_file_or_key() {
    let out = tempfile::tempdir().unwrap();

    // Missing file.
    let d = tempfile::tempdir().unwrap();
    let c = npy_config(d.path(), out.path());
    std::fs::remove_file(d.path().join("reward.npy")).unwrap();
    let e = error_of(c);
    assert!(e.contains("not found") && e.contains("reward.npy"), "{e}");

    // Row counts that differ between files.
    let d = tempfile::tempdir().unwrap();
    let c = npy_config(d.path(), out.path());
    write_npy(&d.path().join("reward.npy"), &[299], &vec![0.5f64; 299]);
    let e = error_of(c);
    assert!(
        e.contains("reward.npy has 299 rows") && e.contains("embeddings.npy"),
        "{e}"
    );

    // NaN in the embeddings, with its position.
    let d = tempfile::tempdir().unwrap();
    let c = npy_config(d.path(), out.path());
    let mut emb = vec![1.0f32; 300 * 24];
    emb[5 * 24 + 3] = f32::NAN;
    write_npy(&d.path().join("embeddings.npy"), &[300, 24], &emb);
    let e = error_of(c);
    assert!(
        e.contains("embeddings.npy") && e.contains("row 5, column 3"),
        "{e}"
    );

    // A prompt with a single response: an error by default, dropped on request.
    let d = tempfile::tempdir().unwrap();
    let c = npy_config(d.path(), out.path());
    let mut prompts: Vec<i64> = (0..300).map(|i| i / 5).collect();
    prompts[299] = 1000;
    write_npy(&d.path().join("prompt.npy"), &[300], &prompts);
    let e = error_of(c.clone());
    assert!(
        e.contains("prompt.npy") && e.contains("prompt 1000 has a single response"),
        "{e}"
    );
    let mut dropping = c;
    dropping.dataset.single_response_prompts = "drop".into();
    simulate::run(dropping, false).unwrap();

    // Unsupported dtype (integer embeddings).
    let d = tempfile::tempdir().unwrap();
    let c = npy_config(d.path(), out.path());
    write_npy(
        &d.path().join("embeddings.npy"),
        &[300, 24],
        &vec![1i32; 300 * 24],
    );
    let e = error_of(c);
    assert!(
        e.contains("embeddings.npy") && e.contains("unsupported dtype"),
        "{e}"
    );

    // Embeddings that are not a matrix.
    let d = tempfile::tempdir().unwrap();
    let c = npy_config(d.path(), out.path());
    write_npy(&d.path().join("embeddings.npy"), &[300], &vec![1f32; 300]);
    let e = error_of(c);
    assert!(
        e.contains("embeddings.npy") && e.contains("2-dimensional"),
        "{e}"
    );

    // Not a .npy file at all.
    let d = tempfile::tempdir().unwrap();
    let c = npy_config(d.path(), out.path());
    std::fs::write(d.path().join("prompt.npy"), b"prompt,0\n").unwrap();
    let e = error_of(c);
    assert!(
        e.contains("prompt.npy") && e.contains("not a valid .npy"),
        "{e}"
    );

    // int32 prompt ids and float32 rewards are accepted.
    let d = tempfile::tempdir().unwrap();
    let c = npy_config(d.path(), out.path());
    let prompts: Vec<i32> = (0..300).map(|i| i / 5).collect();
    write_npy(&d.path().join("prompt.npy"), &[300], &prompts);
    write_npy(&d.path().join("reward.npy"), &[300], &vec![0.25f32; 300]);
    simulate::run(c, false).unwrap();

    // Unknown strategy name.
    let mut c = small(out.path());
    c.strategies = vec!["random".into(), "d-optimal".into()];
    let e = error_of(c);
    assert!(
        e.contains("strategies[1]") && e.contains("unknown strategy 'd-optimal'"),
        "{e}"
    );

    // A bad value names its key.
    let mut c = small(out.path());
    c.protocol.candidates = "all".into();
    let e = error_of(c);
    assert!(e.contains("protocol.candidates"), "{e}");
}

/// The claim armd is built on, on the synthetic generator: D-optimal selection learns the reward faster
/// per label than random labelling. 12 seeds (common random numbers), d = 48, 600 responses, 10 seed labels
/// + 8 rounds × 10 pairs, cross-prompt candidates.
///
/// Measured with this exact configuration and the defaults (`auto` prior, each response used at most once),
/// mean final 1 − Spearman over the 12 seeds: random 0.385, greedy-dopt 0.324, targeted-info 0.334 —
/// gaps of 0.061 and 0.051 (seed-to-seed sd ≈ 0.05–0.08, so the standard error of a 12-seed mean is
/// ≈ 0.02). The test asks for about two thirds of the measured gaps against random with the same
/// evidence-chosen prior.
#[test]
fn active_strategies_beat_random_with_the_same_auto_prior() {
    let out = tempfile::tempdir().unwrap();
    let mut c = SimulateConfig {
        out_dir: out.path().to_path_buf(),
        strategies: vec![
            "random".into(),
            "greedy-dopt".into(),
            "targeted-info".into(),
        ],
        seeds: (0..12).collect(),
        ..Default::default()
    };
    c.synthetic.n_prompts = 100;
    c.synthetic.responses_per_prompt = 6;
    c.synthetic.dim = 48;
    c.synthetic.latent_dim = 16;
    c.protocol.rounds = 8;
    c.protocol.k = 10;
    c.protocol.prompts_per_round = 40;
    c.protocol.seed_labels = 10;
    c.output.plots = false;
    let s = simulate::run(c, false).unwrap();
    use armd::selection::StrategyKind::*;
    let last = |k| {
        let r = s.row(k).unwrap();
        assert_eq!(r.final_labels, 90.0);
        r.final_one_minus_spearman.unwrap().mean
    };
    let (random, greedy, targeted) = (last(Random), last(GreedyDopt), last(TargetedInfo));
    eprintln!(
        "final 1 − Spearman: random {random:.4}, greedy-dopt {greedy:.4}, targeted-info {targeted:.4}"
    );
    assert!(
        random - greedy >= 0.04,
        "greedy-dopt {greedy} vs random {random}"
    );
    assert!(
        random - targeted >= 0.034,
        "targeted-info {targeted} vs random {random}"
    );
}
