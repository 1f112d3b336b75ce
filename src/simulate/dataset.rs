//! The simulator's input: responses with an embedding, a golden reward and a prompt id.
//!
//! # On-disk layout (`dataset.source = "npy"`)
//!
//! A directory with three NumPy `.npy` files (as written by `numpy.save`; C or Fortran order, either
//! endianness), one row per response, rows aligned across files:
//!
//! | file | shape | dtype | meaning |
//! |---|---|---|---|
//! | `embeddings.npy` | `[n, d]` | `float32` (or `float64`) | raw response embedding (any scale; the simulator scales it) |
//! | `reward.npy` | `[n]` | `float64` or `float32` | golden reward r* of the response (higher is better) |
//! | `prompt.npy` | `[n]` | `int64`, `int32`, `uint64` or `uint32` | prompt id; responses with equal ids answer the same prompt |
//!
//! An optional `meta.json` is ignored by the loader (the dataset builder in `tools/dataset/` writes one).
//! Rows need not be grouped by prompt, and prompt ids need not be contiguous.
//!
//! # Validation
//!
//! Every problem ends in a [`DatasetError`] naming the file: a missing file, an unsupported dtype, a wrong
//! number of dimensions, row counts that differ between files, a NaN/Inf embedding or reward (with its row),
//! an empty dataset, fewer than two usable prompts, and a prompt with a single response. Such a prompt cannot
//! be ranked (Spearman needs two responses) nor compared within itself; by default it is an error
//! (`dataset.single_response_prompts = "error"`), and with `"drop"` its row is removed with a warning.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use npyz::{DType, NpyFile, Order, TypeChar};

/// A dataset problem, always naming the file (or the in-memory input) it comes from. The fix is in the data
/// or in the builder that wrote it.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("dataset file not found: {path} (expected embeddings.npy, reward.npy and prompt.npy in the dataset directory)")]
    Missing { path: PathBuf },
    #[error("{path}: cannot read: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: unsupported dtype {dtype} (expected {expected})")]
    Dtype {
        path: PathBuf,
        dtype: String,
        expected: &'static str,
    },
    #[error("{path}: expected a {expected}-dimensional array, got shape {shape:?}")]
    Shape {
        path: PathBuf,
        expected: usize,
        shape: Vec<u64>,
    },
    #[error("{path} has {got} rows but {reference} has {expected}: the files must describe the same responses")]
    RowMismatch {
        path: PathBuf,
        got: usize,
        reference: PathBuf,
        expected: usize,
    },
    #[error("{path}: non-finite value {value} at row {row}, column {column}")]
    NonFinite {
        path: PathBuf,
        row: usize,
        column: usize,
        value: f64,
    },
    #[error("{path}: the dataset is empty (n = {n}, d = {d})")]
    Empty { path: PathBuf, n: usize, d: usize },
    #[error("{path}: prompt {prompt} has a single response (row {row}); a prompt needs at least 2 responses to be ranked — remove it, or set dataset.single_response_prompts = \"drop\" ({count} such prompts)")]
    SingleResponse {
        path: PathBuf,
        prompt: u64,
        row: usize,
        count: usize,
    },
    #[error("{path}: only {prompts} prompt(s) with at least 2 responses; the protocol needs 2 or more (train and test)")]
    TooFewPrompts { path: PathBuf, prompts: usize },
}

/// Responses in memory: row `i` has embedding `embedding(i)`, golden reward `reward[i]`, prompt `prompt[i]`.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Human-readable name (directory name or `synthetic(...)`), for titles and the summary.
    pub name: String,
    dim: usize,
    /// Row-major `n × dim`.
    embeddings: Vec<f32>,
    reward: Vec<f64>,
    prompt: Vec<u64>,
    /// Prompt groups in ascending prompt id, rows ascending within a group.
    groups: Vec<Group>,
    /// Prompts removed because they had a single response.
    pub dropped_prompts: usize,
}

/// One prompt's responses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub prompt: u64,
    pub rows: Vec<usize>,
}

impl Dataset {
    /// Validates and groups in-memory data. `origin` names the source in errors (a file or `synthetic`).
    pub fn new(
        name: impl Into<String>,
        origin: &Path,
        dim: usize,
        embeddings: Vec<f32>,
        reward: Vec<f64>,
        prompt: Vec<u64>,
        drop_single_response_prompts: bool,
    ) -> Result<Self, DatasetError> {
        let n = reward.len();
        if n == 0 || dim == 0 {
            return Err(DatasetError::Empty {
                path: origin.to_path_buf(),
                n,
                d: dim,
            });
        }
        let emb_path = origin.join("embeddings.npy");
        if embeddings.len() != n * dim {
            return Err(DatasetError::RowMismatch {
                path: emb_path,
                got: embeddings.len() / dim,
                reference: origin.join("reward.npy"),
                expected: n,
            });
        }
        if prompt.len() != n {
            return Err(DatasetError::RowMismatch {
                path: origin.join("prompt.npy"),
                got: prompt.len(),
                reference: origin.join("reward.npy"),
                expected: n,
            });
        }
        if let Some(i) = embeddings.iter().position(|v| !v.is_finite()) {
            return Err(DatasetError::NonFinite {
                path: emb_path,
                row: i / dim,
                column: i % dim,
                value: f64::from(embeddings[i]),
            });
        }
        if let Some(i) = reward.iter().position(|v| !v.is_finite()) {
            return Err(DatasetError::NonFinite {
                path: origin.join("reward.npy"),
                row: i,
                column: 0,
                value: reward[i],
            });
        }
        let mut by_prompt: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, &p) in prompt.iter().enumerate() {
            by_prompt.entry(p).or_default().push(i);
        }
        let singles: Vec<(u64, usize)> = by_prompt
            .iter()
            .filter(|(_, rows)| rows.len() == 1)
            .map(|(&p, rows)| (p, rows[0]))
            .collect();
        let mut data = Self {
            name: name.into(),
            dim,
            embeddings,
            reward,
            prompt,
            groups: Vec::new(),
            dropped_prompts: 0,
        };
        if let Some(&(p, row)) = singles.first() {
            if !drop_single_response_prompts {
                return Err(DatasetError::SingleResponse {
                    path: origin.join("prompt.npy"),
                    prompt: p,
                    row,
                    count: singles.len(),
                });
            }
            let keep: Vec<usize> = (0..n)
                .filter(|&i| by_prompt[&data.prompt[i]].len() > 1)
                .collect();
            data = data.subset(&keep);
            data.dropped_prompts = singles.len();
            by_prompt.retain(|_, rows| rows.len() > 1);
            // Rows were renumbered by the subset.
            by_prompt.clear();
            for (i, &p) in data.prompt.iter().enumerate() {
                by_prompt.entry(p).or_default().push(i);
            }
        }
        if by_prompt.len() < 2 {
            return Err(DatasetError::TooFewPrompts {
                path: origin.join("prompt.npy"),
                prompts: by_prompt.len(),
            });
        }
        data.groups = by_prompt
            .into_iter()
            .map(|(prompt, rows)| Group { prompt, rows })
            .collect();
        Ok(data)
    }

    fn subset(&self, rows: &[usize]) -> Self {
        let mut embeddings = Vec::with_capacity(rows.len() * self.dim);
        for &i in rows {
            embeddings.extend_from_slice(self.embedding(i));
        }
        Self {
            name: self.name.clone(),
            dim: self.dim,
            embeddings,
            reward: rows.iter().map(|&i| self.reward[i]).collect(),
            prompt: rows.iter().map(|&i| self.prompt[i]).collect(),
            groups: Vec::new(),
            dropped_prompts: self.dropped_prompts,
        }
    }

    /// Loads the `.npy` layout described in the module doc from `dir`.
    pub fn load_npy_dir(
        dir: &Path,
        drop_single_response_prompts: bool,
    ) -> Result<Self, DatasetError> {
        let emb_path = dir.join("embeddings.npy");
        let reward_path = dir.join("reward.npy");
        let prompt_path = dir.join("prompt.npy");
        for p in [&emb_path, &reward_path, &prompt_path] {
            if !p.is_file() {
                return Err(DatasetError::Missing { path: p.clone() });
            }
        }
        let (emb_shape, embeddings) = read_floats_f32(&emb_path)?;
        if emb_shape.len() != 2 {
            return Err(DatasetError::Shape {
                path: emb_path,
                expected: 2,
                shape: emb_shape,
            });
        }
        let (n, d) = (emb_shape[0] as usize, emb_shape[1] as usize);
        let (reward_shape, reward) = read_floats_f64(&reward_path)?;
        let reward_rows = vector_len(&reward_path, &reward_shape)?;
        if reward_rows != n {
            return Err(DatasetError::RowMismatch {
                path: reward_path,
                got: reward_rows,
                reference: emb_path,
                expected: n,
            });
        }
        let (prompt_shape, prompt) = read_ids(&prompt_path)?;
        let prompt_rows = vector_len(&prompt_path, &prompt_shape)?;
        if prompt_rows != n {
            return Err(DatasetError::RowMismatch {
                path: prompt_path,
                got: prompt_rows,
                reference: emb_path,
                expected: n,
            });
        }
        let name = dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        if n == 0 || d == 0 {
            return Err(DatasetError::Empty {
                path: emb_path,
                n,
                d,
            });
        }
        Self::new(
            name,
            dir,
            d,
            embeddings,
            reward,
            prompt,
            drop_single_response_prompts,
        )
    }

    pub fn len(&self) -> usize {
        self.reward.len()
    }
    pub fn is_empty(&self) -> bool {
        self.reward.is_empty()
    }
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// Raw embedding of row `i`.
    pub fn embedding(&self, i: usize) -> &[f32] {
        &self.embeddings[i * self.dim..(i + 1) * self.dim]
    }
    pub fn reward(&self) -> &[f64] {
        &self.reward
    }
    pub fn prompt(&self) -> &[u64] {
        &self.prompt
    }
    /// Prompts in ascending id with their rows.
    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    /// The N of `wanted` that at least half of the prompts have enough responses for.
    pub fn usable_best_of_n(&self, wanted: &[usize]) -> Vec<usize> {
        wanted
            .iter()
            .copied()
            .filter(|&n| {
                2 * self.groups.iter().filter(|g| g.rows.len() >= n).count() >= self.groups.len()
            })
            .collect()
    }
}

fn open(path: &Path) -> Result<NpyFile<BufReader<File>>, DatasetError> {
    let file = File::open(path).map_err(|e| DatasetError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    NpyFile::new(BufReader::new(file)).map_err(|e| DatasetError::Io {
        path: path.to_path_buf(),
        message: format!("not a valid .npy file: {e}"),
    })
}

fn io_err(path: &Path, e: std::io::Error) -> DatasetError {
    DatasetError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// (type char, size in bytes) of a plain dtype, or a description of a non-plain one.
fn plain(dtype: &DType) -> Result<(TypeChar, u64), String> {
    match dtype {
        DType::Plain(ts) => Ok((ts.type_char(), ts.size_field())),
        other => Err(other.descr()),
    }
}

fn dtype_error(path: &Path, dtype: &DType, expected: &'static str) -> DatasetError {
    DatasetError::Dtype {
        path: path.to_path_buf(),
        dtype: dtype.descr(),
        expected,
    }
}

/// Reads the whole array and converts Fortran order to row-major (C) order.
fn read_all<T: npyz::Deserialize + Copy + Default>(
    path: &Path,
    npy: NpyFile<BufReader<File>>,
) -> Result<(Vec<u64>, Vec<T>), DatasetError> {
    let shape = npy.shape().to_vec();
    let order = npy.order();
    let data: Vec<T> = npy.into_vec().map_err(|e| io_err(path, e))?;
    let expected: u64 = shape.iter().product();
    if data.len() as u64 != expected {
        return Err(DatasetError::Io {
            path: path.to_path_buf(),
            message: format!(
                "holds {} values, shape {shape:?} needs {expected}",
                data.len()
            ),
        });
    }
    if order == Order::Fortran && shape.len() == 2 {
        let (rows, cols) = (shape[0] as usize, shape[1] as usize);
        let mut c = vec![T::default(); data.len()];
        for j in 0..cols {
            for i in 0..rows {
                c[i * cols + j] = data[j * rows + i];
            }
        }
        return Ok((shape, c));
    }
    Ok((shape, data))
}

const FLOAT_EXPECTED: &str = "float32 or float64";

fn read_floats_f32(path: &Path) -> Result<(Vec<u64>, Vec<f32>), DatasetError> {
    let npy = open(path)?;
    let dtype = npy.dtype();
    match plain(&dtype) {
        Ok((TypeChar::Float, 4)) => read_all::<f32>(path, npy),
        Ok((TypeChar::Float, 8)) => {
            let (shape, v) = read_all::<f64>(path, npy)?;
            Ok((shape, v.into_iter().map(|x| x as f32).collect()))
        }
        _ => Err(dtype_error(path, &dtype, FLOAT_EXPECTED)),
    }
}

fn read_floats_f64(path: &Path) -> Result<(Vec<u64>, Vec<f64>), DatasetError> {
    let npy = open(path)?;
    let dtype = npy.dtype();
    match plain(&dtype) {
        Ok((TypeChar::Float, 4)) => {
            let (shape, v) = read_all::<f32>(path, npy)?;
            Ok((shape, v.into_iter().map(f64::from).collect()))
        }
        Ok((TypeChar::Float, 8)) => read_all::<f64>(path, npy),
        _ => Err(dtype_error(path, &dtype, FLOAT_EXPECTED)),
    }
}

/// Prompt ids of any 32/64-bit integer dtype, as u64 (negative ids keep their bit pattern: only equality
/// matters).
fn read_ids(path: &Path) -> Result<(Vec<u64>, Vec<u64>), DatasetError> {
    const EXPECTED: &str = "int64, int32, uint64 or uint32";
    let npy = open(path)?;
    let dtype = npy.dtype();
    match plain(&dtype) {
        Ok((TypeChar::Int, 8)) => {
            let (s, v) = read_all::<i64>(path, npy)?;
            Ok((s, v.into_iter().map(|x| x as u64).collect()))
        }
        Ok((TypeChar::Int, 4)) => {
            let (s, v) = read_all::<i32>(path, npy)?;
            Ok((s, v.into_iter().map(|x| i64::from(x) as u64).collect()))
        }
        Ok((TypeChar::Uint, 8)) => read_all::<u64>(path, npy),
        Ok((TypeChar::Uint, 4)) => {
            let (s, v) = read_all::<u32>(path, npy)?;
            Ok((s, v.into_iter().map(u64::from).collect()))
        }
        _ => Err(dtype_error(path, &dtype, EXPECTED)),
    }
}

/// Length of a 1-D array; `[n, 1]` is accepted as a column vector.
fn vector_len(path: &Path, shape: &[u64]) -> Result<usize, DatasetError> {
    match shape {
        [n] | [n, 1] => Ok(*n as usize),
        _ => Err(DatasetError::Shape {
            path: path.to_path_buf(),
            expected: 1,
            shape: shape.to_vec(),
        }),
    }
}

/// Writes a dataset in the layout above (used by tests and to export the synthetic generator's output).
pub fn write_npy_dir(dir: &Path, data: &Dataset) -> std::io::Result<()> {
    use npyz::WriterBuilder;
    std::fs::create_dir_all(dir)?;
    let n = data.len() as u64;
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&[n, data.dim() as u64])
        .writer(std::io::BufWriter::new(File::create(
            dir.join("embeddings.npy"),
        )?))
        .begin_nd()?;
    w.extend(data.embeddings.iter().copied())?;
    w.finish()?;
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&[n])
        .writer(std::io::BufWriter::new(File::create(
            dir.join("reward.npy"),
        )?))
        .begin_nd()?;
    w.extend(data.reward.iter().copied())?;
    w.finish()?;
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&[n])
        .writer(std::io::BufWriter::new(File::create(
            dir.join("prompt.npy"),
        )?))
        .begin_nd()?;
    w.extend(data.prompt.iter().map(|&p| p as i64))?;
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(prompts: Vec<u64>, drop: bool) -> Result<Dataset, DatasetError> {
        let n = prompts.len();
        let emb: Vec<f32> = (0..n * 3).map(|i| i as f32).collect();
        let reward: Vec<f64> = (0..n).map(|i| i as f64).collect();
        Dataset::new("t", Path::new("mem"), 3, emb, reward, prompts, drop)
    }

    #[test]
    fn groups_are_sorted_and_single_response_prompts_error_or_drop() {
        let d = tiny(vec![5, 2, 5, 2, 9, 9], false).unwrap();
        let g: Vec<(u64, Vec<usize>)> = d
            .groups()
            .iter()
            .map(|g| (g.prompt, g.rows.clone()))
            .collect();
        assert_eq!(g, vec![(2, vec![1, 3]), (5, vec![0, 2]), (9, vec![4, 5])]);

        let e = tiny(vec![1, 1, 2, 3, 3], false).unwrap_err();
        assert!(
            matches!(
                e,
                DatasetError::SingleResponse {
                    prompt: 2,
                    row: 2,
                    ..
                }
            ),
            "{e}"
        );
        let d = tiny(vec![1, 1, 2, 3, 3], true).unwrap();
        assert_eq!(d.len(), 4);
        assert_eq!(d.dropped_prompts, 1);
        assert_eq!(d.embedding(2), &[9.0, 10.0, 11.0]); // row 3 of the input
        assert!(matches!(
            tiny(vec![1, 1, 2], true).unwrap_err(),
            DatasetError::TooFewPrompts { prompts: 1, .. }
        ));
    }

    #[test]
    fn usable_best_of_n_needs_half_the_prompts() {
        let d = tiny(vec![1, 1, 1, 2, 2, 3, 3], false).unwrap();
        assert_eq!(d.usable_best_of_n(&[2, 3, 5]), vec![2]);
    }

    #[test]
    fn npy_round_trip_and_fortran_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = tiny(vec![1, 1, 2, 2], false).unwrap();
        write_npy_dir(dir.path(), &d).unwrap();
        let back = Dataset::load_npy_dir(dir.path(), false).unwrap();
        assert_eq!(back.embeddings, d.embeddings);
        assert_eq!(back.reward, d.reward);
        assert_eq!(back.prompt, d.prompt);

        // A Fortran-ordered float64 embeddings file is transposed into row-major order.
        use npyz::WriterBuilder;
        let f = File::create(dir.path().join("embeddings.npy")).unwrap();
        let mut w = npyz::WriteOptions::<f64>::new()
            .default_dtype()
            .order(Order::Fortran)
            .shape(&[4, 3])
            .writer(f)
            .begin_nd()
            .unwrap();
        // column-major of the row-major 0..12 matrix
        for j in 0..3 {
            for i in 0..4 {
                w.push(&((i * 3 + j) as f64)).unwrap();
            }
        }
        w.finish().unwrap();
        let back = Dataset::load_npy_dir(dir.path(), false).unwrap();
        assert_eq!(back.embeddings, d.embeddings);
    }
}
