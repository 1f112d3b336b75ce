//! Configuration of `armd simulate`: the TOML file (`config/simulate.toml` documents every key), its
//! validation, and the command-line overrides.
//!
//! The file deserialises into [`SimulateConfig`] (unknown keys are rejected, so a typo never silently falls
//! back to a default); [`SimulateConfig::validate`] then checks every value once and names the offending key,
//! and [`SimulateConfig::plan`] turns names into typed values ([`StrategyKind`], [`CandidateMode`],
//! [`Scaling`]). Command-line flags overwrite file values *before* validation, so a bad flag is reported
//! like a bad key.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use crate::candidates::{CandidateMode, CandidateOptions};
use crate::features::Scaling;
use crate::posterior::PriorSetting;
use crate::selection::{SelectionParams, StrategyKind};

/// A bad key of the simulation's configuration: the same typed error as `armd run`'s configuration.
pub use crate::error::ConfigError;

/// The whole simulation: which strategies, which seeds, on what data, with which protocol.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulateConfig {
    /// Strategies to compare, by their armd names (see `selection::STRATEGY_NAMES`).
    pub strategies: Vec<String>,
    /// One replicate per seed. A seed fixes the train/test split, the seed labels, every round's prompt
    /// draw and candidate set, and the annotator's coin flips, identically for every strategy.
    pub seeds: Vec<u64>,
    /// Directory for `points.csv`, `summary.md` and the SVG plots (created if missing).
    pub out_dir: PathBuf,
    pub dataset: DatasetConfig,
    pub synthetic: SyntheticConfig,
    pub protocol: ProtocolConfig,
    pub selection: SelectionConfig,
    pub output: OutputConfig,
    pub scale_out: ScaleOutConfig,
}

impl Default for SimulateConfig {
    fn default() -> Self {
        Self {
            strategies: ["random", "greedy-dopt", "targeted-info"]
                .map(String::from)
                .to_vec(),
            seeds: vec![0, 1, 2],
            out_dir: PathBuf::from("out/simulate"),
            dataset: DatasetConfig::default(),
            synthetic: SyntheticConfig::default(),
            protocol: ProtocolConfig::default(),
            selection: SelectionConfig::default(),
            output: OutputConfig::default(),
            scale_out: ScaleOutConfig::default(),
        }
    }
}

/// Where the responses come from.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatasetConfig {
    /// `"synthetic"` (the built-in generator, see `[synthetic]`) or `"npy"` (the directory `path`).
    pub source: String,
    /// Directory with `embeddings.npy`, `reward.npy`, `prompt.npy` (see `simulate::dataset`). Relative
    /// paths are taken from the working directory.
    pub path: PathBuf,
    /// What to do with a prompt that has a single response (it can be neither compared within its prompt
    /// nor ranked): `"error"` stops with the prompt id, `"drop"` removes it and says so on stderr.
    pub single_response_prompts: String,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        Self {
            source: "synthetic".into(),
            path: PathBuf::from("data/realtext"),
            single_response_prompts: "error".into(),
        }
    }
}

/// The built-in generator (see `simulate::synthetic`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticConfig {
    pub n_prompts: usize,
    pub responses_per_prompt: usize,
    /// Embedding dimension d.
    pub dim: usize,
    /// Seed of the dataset itself (independent of the replicate seeds: every replicate sees one dataset).
    pub seed: u64,
    /// Prompt clusters (topics).
    pub clusters: usize,
    /// Dimension of the latent space the embeddings are a noisy linear image of (anisotropy).
    pub latent_dim: usize,
    /// Dimensions with a large offset and a large spread, like the massive activations of LLM hidden states.
    pub outlier_dims: usize,
    /// Share of the golden reward's variance that is non-linear in the latent (0: linear, 1: all non-linear).
    pub nonlinearity: f64,
    /// Standard deviation of the golden reward over all responses.
    pub reward_scale: f64,
    /// Isotropic noise added to every embedding coordinate.
    pub noise: f64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            n_prompts: 300,
            responses_per_prompt: 8,
            dim: 64,
            seed: 7,
            clusters: 8,
            latent_dim: 32,
            outlier_dims: 4,
            nonlinearity: 0.3,
            reward_scale: 3.0,
            noise: 0.3,
        }
    }
}

/// The paper's protocol (docs/design.md §9.1).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProtocolConfig {
    /// Fraction of prompts held out for evaluation (never labelled).
    pub test_fraction: f64,
    /// Feature scaling: `none`, `l2`, `standardize`, `standardize+l2`; statistics from train responses.
    pub scaling: String,
    /// Prior precision λ₀ of `θ ~ N(0, λ₀⁻¹ I)`, on the scaled features: a number, or `"auto"` for
    /// evidence maximisation at every refit (once per round when `refit_every` is 0).
    pub prior_precision: PriorSetting,
    /// Uniformly random labels before the first round (identical for every strategy).
    pub seed_labels: usize,
    /// Selection rounds after the seed labels.
    pub rounds: usize,
    /// Train prompts drawn (without replacement) into each round's pool.
    pub prompts_per_round: usize,
    /// Pairs labelled per round (the batch size).
    pub k: usize,
    /// Candidate pairs: `within`, `cross` or `both`.
    pub candidates: String,
    /// Upper bound on sampled cross-prompt candidates per round.
    pub max_cross_pairs: usize,
    /// Upper bound on within-prompt candidates per round.
    pub max_within_pairs: usize,
    /// Annotator rationality β in `P(a ≻ b) = σ(β (r*(a) − r*(b)))`; `inf` (or `"inf"`) is noiseless.
    #[serde(deserialize_with = "float_or_inf")]
    pub beta: f64,
    /// Exact MAP refit every this many labels (0: never; the online update only).
    pub refit_every: usize,
    /// How often one response may be compared, over the whole run (the daemon's `pool.max_uses`: a used
    /// response leaves its pool); 0 means no limit.
    pub max_uses: u32,
    /// N of the Best-of-N metric; an N is reported when at least half of the prompts have N responses.
    pub best_of_n: Vec<usize>,
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        Self {
            test_fraction: 0.2,
            scaling: "standardize".into(),
            prior_precision: PriorSetting::Auto,
            seed_labels: 20,
            rounds: 10,
            prompts_per_round: 100,
            k: 20,
            candidates: "cross".into(),
            max_cross_pairs: 20_000,
            max_within_pairs: 20_000,
            beta: 1.0,
            refit_every: 0,
            max_uses: 1,
            best_of_n: crate::evaluation::BEST_OF_N.to_vec(),
        }
    }
}

/// Strategy knobs, passed to `selection::select` unchanged (same meaning as in the daemon's config).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SelectionConfig {
    pub epsilon: f64,
    pub gauss_hermite_nodes: usize,
    pub batch_bald_samples: usize,
    pub batch_bald_shortlist: usize,
    pub coreset_clusters: usize,
    pub coreset_radius: f64,
    pub targeted_targets: usize,
}

impl Default for SelectionConfig {
    fn default() -> Self {
        let p = SelectionParams::default();
        Self {
            epsilon: p.epsilon,
            gauss_hermite_nodes: p.gauss_hermite_nodes,
            batch_bald_samples: p.batch_bald_samples,
            batch_bald_shortlist: p.batch_bald_shortlist,
            coreset_clusters: p.coreset_clusters,
            coreset_radius: p.coreset_radius,
            targeted_targets: p.targeted_targets,
        }
    }
}

impl SelectionConfig {
    pub fn params(&self) -> SelectionParams {
        SelectionParams {
            epsilon: self.epsilon,
            gauss_hermite_nodes: self.gauss_hermite_nodes,
            batch_bald_samples: self.batch_bald_samples,
            batch_bald_shortlist: self.batch_bald_shortlist,
            coreset_clusters: self.coreset_clusters,
            coreset_radius: self.coreset_radius,
            targeted_targets: self.targeted_targets,
        }
    }
}

/// What to write besides `points.csv`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    /// Write SVG plots (`one_minus_spearman.svg`, `best_of_<N>.svg`).
    pub plots: bool,
    /// Title prefix of the plots (defaults to the dataset's name).
    pub title: String,
    /// Run (strategy, seed) replicates in parallel on the rayon pool; results are identical either way.
    pub parallel: bool,
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self {
            plots: true,
            title: String::new(),
            parallel: true,
        }
    }
}

/// Several daemon instances in one consumer group (docs/scale-out.md): each round's pool is split across
/// them by prompt (the responses topic is keyed by prompt id, so one prompt's responses share a partition),
/// and each picks its share of the batch from its own share of the pool.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScaleOutConfig {
    /// Number of instances (1: a single daemon, the classic protocol).
    pub instances: usize,
    /// `"shared"`: every instance applies every label to one shared posterior and conditions its selection
    /// on the other instances' open requests. `"independent"`: each instance applies only the labels of its
    /// own requests to its own posterior (the reported model is instance 0's).
    pub learners: String,
}

impl Default for ScaleOutConfig {
    fn default() -> Self {
        Self {
            instances: 1,
            learners: "shared".into(),
        }
    }
}

/// How the instances of a scale-out run learn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Learners {
    /// One posterior: every label goes to it; selection conditions on every instance's in-flight picks.
    Shared,
    /// One posterior per instance, fed only that instance's labels (and the seed labels).
    Independent,
}

impl fmt::Display for Learners {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Learners::Shared => "shared",
            Learners::Independent => "independent",
        })
    }
}

/// The validated `[scale_out]` section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScaleOut {
    pub instances: usize,
    pub learners: Learners,
}

impl ScaleOut {
    /// One instance: the classic single-daemon protocol.
    pub fn single(&self) -> bool {
        self.instances == 1
    }

    /// The batch share of instance `i` when `k` pairs are picked per round: `k` split as evenly as
    /// possible, the first `k mod instances` instances taking one more.
    pub fn batch_share(&self, k: usize, i: usize) -> usize {
        k / self.instances + usize::from(i < k % self.instances)
    }
}

/// Accepts a TOML float (including TOML's own `inf`), an integer, or the strings `"inf"`/`"infinity"`.
fn float_or_inf<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        F(f64),
        I(i64),
        S(String),
    }
    match Raw::deserialize(d)? {
        Raw::F(f) => Ok(f),
        Raw::I(i) => Ok(i as f64),
        Raw::S(s) => parse_float_or_inf(&s).map_err(serde::de::Error::custom),
    }
}

/// `"inf"`, `"infinity"` (any case) or a decimal number.
pub fn parse_float_or_inf(s: &str) -> Result<f64, String> {
    let t = s.trim().to_ascii_lowercase();
    match t.as_str() {
        "inf" | "+inf" | "infinity" => Ok(f64::INFINITY),
        _ => t
            .parse::<f64>()
            .map_err(|_| format!("'{s}' is neither a number nor \"inf\"")),
    }
}

/// The dataset source after validation.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    Synthetic(SyntheticConfig),
    Npy {
        dir: PathBuf,
        drop_single_response_prompts: bool,
    },
}

/// A validated configuration with typed values; what [`super::run`] executes.
#[derive(Clone, Debug)]
pub struct Plan {
    pub strategies: Vec<StrategyKind>,
    pub seeds: Vec<u64>,
    pub out_dir: PathBuf,
    pub source: Source,
    pub scaling: Scaling,
    pub candidates: CandidateOptions,
    pub params: SelectionParams,
    pub protocol: ProtocolConfig,
    pub output: OutputConfig,
    pub scale_out: ScaleOut,
}

impl SimulateConfig {
    /// Parses a TOML document; unknown keys and wrong types are errors naming the key.
    pub fn from_toml_str(text: &str) -> anyhow::Result<Self> {
        toml::from_str(text).map_err(|e| anyhow::anyhow!("invalid simulate config: {e}"))
    }

    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("invalid config file {}: {e}", path.display()))
    }

    /// Checks every value and converts names into typed values. The error names the first bad key.
    pub fn plan(&self) -> Result<Plan, ConfigError> {
        if self.strategies.is_empty() {
            return Err(ConfigError::new("strategies", "must list at least one"));
        }
        let mut strategies = Vec::new();
        for (i, name) in self.strategies.iter().enumerate() {
            let kind: StrategyKind = name
                .trim()
                .parse()
                .map_err(|e| ConfigError::new(format!("strategies[{i}]"), e))?;
            if strategies.contains(&kind) {
                return Err(ConfigError::new(
                    format!("strategies[{i}]"),
                    format!("'{name}' is listed twice"),
                ));
            }
            strategies.push(kind);
        }
        if self.seeds.is_empty() {
            return Err(ConfigError::new("seeds", "must list at least one seed"));
        }
        let mut sorted = self.seeds.clone();
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[0] == w[1]) {
            return Err(ConfigError::new("seeds", "a seed is listed twice"));
        }
        if self.out_dir.as_os_str().is_empty() {
            return Err(ConfigError::new("out_dir", "must not be empty"));
        }

        let source = match self.dataset.source.as_str() {
            "synthetic" => {
                self.synthetic.validate()?;
                Source::Synthetic(self.synthetic.clone())
            }
            "npy" => {
                if self.dataset.path.as_os_str().is_empty() {
                    return Err(ConfigError::new(
                        "dataset.path",
                        "must name a directory when dataset.source = \"npy\"",
                    ));
                }
                let drop = match self.dataset.single_response_prompts.as_str() {
                    "error" => false,
                    "drop" => true,
                    other => {
                        return Err(ConfigError::new(
                            "dataset.single_response_prompts",
                            format!("unknown value '{other}' (expected \"error\" or \"drop\")"),
                        ))
                    }
                };
                Source::Npy {
                    dir: self.dataset.path.clone(),
                    drop_single_response_prompts: drop,
                }
            }
            other => {
                return Err(ConfigError::new(
                    "dataset.source",
                    format!("unknown source '{other}' (expected \"synthetic\" or \"npy\")"),
                ))
            }
        };

        let p = &self.protocol;
        if !(p.test_fraction > 0.0 && p.test_fraction < 1.0) {
            return Err(ConfigError::new(
                "protocol.test_fraction",
                format!("{} must be in (0, 1)", p.test_fraction),
            ));
        }
        let scaling: Scaling = p
            .scaling
            .parse()
            .map_err(|e| ConfigError::new("protocol.scaling", e))?;
        p.prior_precision
            .validate()
            .map_err(|e| ConfigError::new("protocol.prior_precision", e))?;
        if p.prompts_per_round == 0 {
            return Err(ConfigError::new(
                "protocol.prompts_per_round",
                "must be > 0",
            ));
        }
        if p.rounds > 0 && p.k == 0 {
            return Err(ConfigError::new("protocol.k", "must be > 0"));
        }
        let mode: CandidateMode = p
            .candidates
            .parse()
            .map_err(|e| ConfigError::new("protocol.candidates", e))?;
        if matches!(mode, CandidateMode::Cross | CandidateMode::Both) && p.max_cross_pairs == 0 {
            return Err(ConfigError::new(
                "protocol.max_cross_pairs",
                "must be > 0 with cross-prompt candidates",
            ));
        }
        if matches!(mode, CandidateMode::Within | CandidateMode::Both) && p.max_within_pairs == 0 {
            return Err(ConfigError::new(
                "protocol.max_within_pairs",
                "must be > 0 with within-prompt candidates",
            ));
        }
        if p.beta.is_nan() || p.beta <= 0.0 {
            return Err(ConfigError::new(
                "protocol.beta",
                format!("{} must be > 0 (use inf for a noiseless annotator)", p.beta),
            ));
        }
        if let Some(i) = p.best_of_n.iter().position(|&n| n == 0) {
            return Err(ConfigError::new(
                format!("protocol.best_of_n[{i}]"),
                "N must be at least 1",
            ));
        }
        let params = self.selection.params();
        params.validate().map_err(|e| match e {
            crate::CoreError::Parameter { name, .. } => {
                ConfigError::new(format!("selection.{name}"), e)
            }
            other => ConfigError::new("selection", other),
        })?;

        let scale_out = self.scale_out.validate(p)?;

        let mut protocol = p.clone();
        protocol.best_of_n.sort_unstable();
        protocol.best_of_n.dedup();
        Ok(Plan {
            strategies,
            seeds: self.seeds.clone(),
            out_dir: self.out_dir.clone(),
            source,
            scaling,
            candidates: CandidateOptions {
                mode,
                max_cross_pairs: p.max_cross_pairs,
                max_within_pairs: p.max_within_pairs,
            },
            params,
            protocol,
            output: self.output.clone(),
            scale_out,
        })
    }

    /// Alias of [`Self::plan`] for callers that only want the check.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.plan().map(|_| ())
    }
}

impl ScaleOutConfig {
    /// Checks the section against the protocol (every instance must get at least one pair per round).
    pub fn validate(&self, protocol: &ProtocolConfig) -> Result<ScaleOut, ConfigError> {
        if self.instances == 0 {
            return Err(ConfigError::new("scale_out.instances", "must be >= 1"));
        }
        if protocol.rounds > 0 && self.instances > protocol.k {
            return Err(ConfigError::new(
                "scale_out.instances",
                format!(
                    "{} exceeds protocol.k = {} (every instance picks at least one pair per round)",
                    self.instances, protocol.k
                ),
            ));
        }
        let learners = match self.learners.trim() {
            "shared" => Learners::Shared,
            "independent" => Learners::Independent,
            other => {
                return Err(ConfigError::new(
                    "scale_out.learners",
                    format!("unknown value '{other}' (expected \"shared\" or \"independent\")"),
                ))
            }
        };
        Ok(ScaleOut {
            instances: self.instances,
            learners,
        })
    }
}

impl SyntheticConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("synthetic.n_prompts", self.n_prompts),
            ("synthetic.dim", self.dim),
            ("synthetic.clusters", self.clusters),
            ("synthetic.latent_dim", self.latent_dim),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(ConfigError::new(key, "must be > 0"));
            }
        }
        if self.n_prompts < 2 {
            return Err(ConfigError::new(
                "synthetic.n_prompts",
                "need at least 2 prompts (one to train, one to test)",
            ));
        }
        if self.responses_per_prompt < 2 {
            return Err(ConfigError::new(
                "synthetic.responses_per_prompt",
                "must be at least 2 (a prompt with one response cannot be ranked)",
            ));
        }
        if self.outlier_dims > self.dim {
            return Err(ConfigError::new(
                "synthetic.outlier_dims",
                format!("{} exceeds synthetic.dim = {}", self.outlier_dims, self.dim),
            ));
        }
        if !(0.0..=1.0).contains(&self.nonlinearity) {
            return Err(ConfigError::new(
                "synthetic.nonlinearity",
                format!("{} must be in [0, 1]", self.nonlinearity),
            ));
        }
        for (key, v) in [
            ("synthetic.reward_scale", self.reward_scale),
            ("synthetic.noise", self.noise),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ConfigError::new(
                    key,
                    format!("{v} must be finite and >= 0"),
                ));
            }
        }
        if self.reward_scale == 0.0 {
            return Err(ConfigError::new("synthetic.reward_scale", "must be > 0"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_file_parses_to_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/simulate.toml");
        let cfg = SimulateConfig::load(&path).unwrap();
        assert_eq!(cfg, SimulateConfig::default());
        cfg.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let e = SimulateConfig::from_toml_str("[protocol]\nkk = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("kk"), "{e}");
    }

    #[test]
    fn beta_accepts_inf_in_three_spellings() {
        for text in ["beta = inf", "beta = \"inf\"", "beta = \"Infinity\""] {
            let cfg = SimulateConfig::from_toml_str(&format!("[protocol]\n{text}\n")).unwrap();
            assert_eq!(cfg.protocol.beta, f64::INFINITY, "{text}");
        }
        let cfg = SimulateConfig::from_toml_str("[protocol]\nbeta = 2\n").unwrap();
        assert_eq!(cfg.protocol.beta, 2.0);
    }

    #[test]
    fn validation_names_the_key() {
        type Mutation = Box<dyn Fn(&mut SimulateConfig)>;
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "strategies[1]",
                Box::new(|c| c.strategies = vec!["random".into(), "d-opt".into()]),
            ),
            ("seeds", Box::new(|c| c.seeds.clear())),
            ("protocol.k", Box::new(|c| c.protocol.k = 0)),
            ("protocol.beta", Box::new(|c| c.protocol.beta = -1.0)),
            (
                "protocol.candidates",
                Box::new(|c| c.protocol.candidates = "diagonal".into()),
            ),
            (
                "protocol.scaling",
                Box::new(|c| c.protocol.scaling = "zscore".into()),
            ),
            (
                "protocol.test_fraction",
                Box::new(|c| c.protocol.test_fraction = 1.0),
            ),
            (
                "dataset.source",
                Box::new(|c| c.dataset.source = "csv".into()),
            ),
            ("selection.epsilon", Box::new(|c| c.selection.epsilon = 0.0)),
            (
                "synthetic.responses_per_prompt",
                Box::new(|c| c.synthetic.responses_per_prompt = 1),
            ),
            (
                "scale_out.instances",
                Box::new(|c| c.scale_out.instances = 0),
            ),
            (
                "scale_out.instances",
                Box::new(|c| c.scale_out.instances = c.protocol.k + 1),
            ),
            (
                "scale_out.learners",
                Box::new(|c| c.scale_out.learners = "federated".into()),
            ),
        ];
        for (key, mutate) in cases {
            let mut cfg = SimulateConfig::default();
            mutate(&mut cfg);
            let e = cfg.plan().unwrap_err();
            assert_eq!(e.key, key, "{e}");
        }
        let cfg = SimulateConfig {
            strategies: vec!["greedy-dopt".into(), "bogus".into()],
            ..Default::default()
        };
        let msg = cfg.plan().unwrap_err().to_string();
        assert!(
            msg.contains("strategies[1]") && msg.contains("unknown strategy 'bogus'"),
            "{msg}"
        );
    }
}
