//! The daemon's durable state in one file, written atomically.
//!
//! What is in it: the posterior (prior, θ, Cholesky factor, stored labels and their weights, counters,
//! prequential scores), the frozen feature scaler, a pending refit's snapshot point, the in-flight requests
//! (as the request messages plus labels received and annotators seen), recently closed request ids, the
//! next offset of every labels-topic partition, the requests-topic offsets from which start-up must scan
//! for requests issued after this checkpoint, and the request sequence counter.
//!
//! Because the consumed label offsets and the posterior they produced are written in one atomic rename,
//! a restart seeks the labels consumer to exactly the first label the posterior has not seen: every label
//! is applied exactly once across crashes.
//!
//! File layout (all integers little-endian):
//!
//! ```text
//! magic "ARMDCKPT" (8 bytes) | format version u32 | body length u64 | body | CRC-32 of body u32
//! ```
//!
//! The body is a fixed sequence of fields; f64/f32 arrays are raw little-endian (bit-exact round trip; the
//! d×d factor is binary, not JSON text). Only the lower triangle of the Cholesky factor is stored.
//!
//! Writing: a temporary file in the same directory, `fsync`, `rename` over the old file, `fsync` of the
//! directory. A failed write never touches the old file. Loading checks magic, version, length, checksum
//! and every shape, and fails with a message naming the file; it never silently starts empty.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::features::Scaling;
use crate::posterior::{Label, PosteriorParts, Prequential};

const MAGIC: &[u8; 8] = b"ARMDCKPT";
/// Bumped whenever the body layout changes; older files are refused with a clear message.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8;

/// A frozen feature scaler's statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct ScalerState {
    pub scaling: Scaling,
    pub mean: Vec<f64>,
    pub inv_std: Vec<f64>,
}

/// An issued request that has not collected all its labels and is not forgotten yet.
#[derive(Clone, Debug, PartialEq)]
pub struct InFlightState {
    /// The request exactly as published (JSON text of `messages::LabelRequest`).
    pub request_json: String,
    pub labels_received: u32,
    /// Annotators whose label was applied (`""` for anonymous).
    pub annotators: Vec<String>,
}

/// Why a request id was closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// Collected all its labels: further labels are `duplicate_label`.
    Labelled,
    /// Expired (past its grace period): further labels are `expired_request`.
    Expired,
}

/// Everything a restarted daemon needs; see the module doc.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub instance_id: String,
    pub written_at_ms: i64,
    pub posterior: PosteriorParts,
    /// `None` while a standardising scaler is still warming up.
    pub scaler: Option<ScalerState>,
    /// Label-store length at which a refit snapshot was taken that was not installed yet.
    pub pending_refit: Option<u64>,
    pub next_sequence: u64,
    /// Next offset to consume per labels-topic partition.
    pub label_offsets: Vec<(i32, i64)>,
    /// Per requests-topic partition: start-up scans from here to find requests issued after this checkpoint.
    pub request_scan_from: Vec<(i32, i64)>,
    pub in_flight: Vec<InFlightState>,
    pub closed: Vec<(String, Closed)>,
}

impl Checkpoint {
    pub fn dim(&self) -> usize {
        self.posterior.theta.len()
    }

    /// Serialises to the on-disk format (header, body, checksum).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.str(&self.instance_id);
        w.i64(self.written_at_ms);
        let p = &self.posterior;
        let d = p.theta.len();
        w.u64(d as u64);
        w.f64s(&p.prior_mean);
        match &p.prior_dense {
            None => w.u8(0),
            Some(h) => {
                w.u8(1);
                w.f64s(h);
            }
        }
        w.f64(p.prior_lambda);
        w.f64s(&p.theta);
        // Lower triangle of the factor, column by column.
        let mut lower = Vec::with_capacity(d * (d + 1) / 2);
        for j in 0..d {
            lower.extend_from_slice(&p.chol[j * d + j..(j + 1) * d]);
        }
        w.f64s(&lower);
        w.u64(p.labels.len() as u64);
        for l in &p.labels {
            w.f64(l.y);
            w.f64s(&l.v);
        }
        w.f64s(&p.weights);
        w.u64(p.version);
        w.u64(p.labels_applied);
        w.u64(p.refactorizations);
        w.u64(p.prequential.labels);
        w.f64(p.prequential.log_loss_sum);
        w.u64(p.prequential.decided);
        w.u64(p.prequential.correct);
        match &self.scaler {
            None => w.u8(0),
            Some(s) => {
                w.u8(1);
                w.str(s.scaling.name());
                w.f64s(&s.mean);
                w.f64s(&s.inv_std);
            }
        }
        match self.pending_refit {
            None => w.u8(0),
            Some(n) => {
                w.u8(1);
                w.u64(n);
            }
        }
        w.u64(self.next_sequence);
        for offsets in [&self.label_offsets, &self.request_scan_from] {
            w.u64(offsets.len() as u64);
            for &(part, off) in offsets {
                w.i64(i64::from(part));
                w.i64(off);
            }
        }
        w.u64(self.in_flight.len() as u64);
        for r in &self.in_flight {
            w.str(&r.request_json);
            w.u64(u64::from(r.labels_received));
            w.u64(r.annotators.len() as u64);
            for a in &r.annotators {
                w.str(a);
            }
        }
        w.u64(self.closed.len() as u64);
        for (id, why) in &self.closed {
            w.str(id);
            w.u8(match why {
                Closed::Labelled => 0,
                Closed::Expired => 1,
            });
        }
        let body = w.0;
        let mut out = Vec::with_capacity(HEADER_LEN + body.len() + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out
    }

    /// Parses the on-disk format; every failure says what is wrong (the caller adds the file name).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < HEADER_LEN {
            if !MAGIC.starts_with(&bytes[..bytes.len().min(8)]) {
                bail!("not an armd checkpoint (wrong magic bytes)");
            }
            bail!(
                "truncated: {} bytes, shorter than the {HEADER_LEN}-byte header",
                bytes.len()
            );
        }
        if &bytes[..8] != MAGIC {
            bail!("not an armd checkpoint (wrong magic bytes)");
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            bail!(
                "checkpoint format version {version} is not supported (this armd reads version {FORMAT_VERSION})"
            );
        }
        let body_len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
        let have = (bytes.len() - HEADER_LEN) as u64;
        if have < body_len.saturating_add(4) {
            bail!(
                "truncated: header announces a {body_len}-byte body plus checksum, file has {have} bytes after the header"
            );
        }
        if have > body_len + 4 {
            bail!(
                "{} unexpected trailing bytes after the checksum",
                have - body_len - 4
            );
        }
        let body = &bytes[HEADER_LEN..HEADER_LEN + body_len as usize];
        let stored = u32::from_le_bytes(
            bytes[HEADER_LEN + body_len as usize..]
                .try_into()
                .expect("4 bytes"),
        );
        let actual = crc32fast::hash(body);
        if stored != actual {
            bail!(
                "checksum mismatch (stored {stored:08x}, computed {actual:08x}): the file is corrupt or was modified"
            );
        }
        let mut r = Reader { buf: body, pos: 0 };
        let instance_id = r.str("instance_id")?;
        let written_at_ms = r.i64("written_at_ms")?;
        let d = r.u64("dimension")? as usize;
        let prior_mean = r.f64s("prior mean")?;
        let prior_dense = match r.u8("prior kind")? {
            0 => None,
            1 => Some(r.f64s("prior precision")?),
            k => bail!("invalid prior kind {k}"),
        };
        let prior_lambda = r.f64("prior lambda")?;
        let theta = r.f64s("theta")?;
        let lower = r.f64s("cholesky factor")?;
        if theta.len() != d || prior_mean.len() != d || lower.len() != d * (d + 1) / 2 {
            bail!(
                "inconsistent shapes: dimension {d}, theta {}, prior mean {}, factor {} (want {})",
                theta.len(),
                prior_mean.len(),
                lower.len(),
                d * (d + 1) / 2
            );
        }
        let mut chol = vec![0.0; d * d];
        let mut k = 0;
        for j in 0..d {
            for i in j..d {
                chol[j * d + i] = lower[k];
                k += 1;
            }
        }
        let n = r.count("label count", 8 * (d + 1))?;
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let y = r.f64("label outcome")?;
            let v = r.f64s("label vector")?;
            if v.len() != d {
                bail!("stored label {i} has dimension {}, expected {d}", v.len());
            }
            labels.push(Label { v, y });
        }
        let weights = r.f64s("label weights")?;
        let version = r.u64("model version")?;
        let labels_applied = r.u64("labels applied")?;
        let refactorizations = r.u64("refactorizations")?;
        let prequential = Prequential {
            labels: r.u64("prequential labels")?,
            log_loss_sum: r.f64("prequential log loss")?,
            decided: r.u64("prequential decided")?,
            correct: r.u64("prequential correct")?,
        };
        let scaler = match r.u8("scaler flag")? {
            0 => None,
            1 => {
                let name = r.str("scaling")?;
                let scaling = name
                    .parse::<Scaling>()
                    .map_err(|e| anyhow::anyhow!("stored scaler: {e}"))?;
                Some(ScalerState {
                    scaling,
                    mean: r.f64s("scaler mean")?,
                    inv_std: r.f64s("scaler inverse std")?,
                })
            }
            k => bail!("invalid scaler flag {k}"),
        };
        let pending_refit = match r.u8("pending refit flag")? {
            0 => None,
            1 => Some(r.u64("pending refit")?),
            k => bail!("invalid pending refit flag {k}"),
        };
        let next_sequence = r.u64("next sequence")?;
        let mut offsets = [Vec::new(), Vec::new()];
        for o in &mut offsets {
            let m = r.count("partition count", 16)?;
            for _ in 0..m {
                let part = r.i64("partition")?;
                let part = i32::try_from(part)
                    .map_err(|_| anyhow::anyhow!("partition {part} out of range"))?;
                o.push((part, r.i64("offset")?));
            }
        }
        let [label_offsets, request_scan_from] = offsets;
        let m = r.count("in-flight count", 8 * 3)?;
        let mut in_flight = Vec::with_capacity(m);
        for _ in 0..m {
            let request_json = r.str("in-flight request")?;
            let labels_received = u32::try_from(r.u64("labels received")?)
                .map_err(|_| anyhow::anyhow!("labels received out of range"))?;
            let a = r.count("annotator count", 8)?;
            let mut annotators = Vec::with_capacity(a);
            for _ in 0..a {
                annotators.push(r.str("annotator")?);
            }
            in_flight.push(InFlightState {
                request_json,
                labels_received,
                annotators,
            });
        }
        let m = r.count("closed count", 9)?;
        let mut closed = Vec::with_capacity(m);
        for _ in 0..m {
            let id = r.str("closed id")?;
            let why = match r.u8("closed reason")? {
                0 => Closed::Labelled,
                1 => Closed::Expired,
                k => bail!("invalid closed reason {k}"),
            };
            closed.push((id, why));
        }
        if r.pos != body.len() {
            bail!("{} unread bytes at the end of the body", body.len() - r.pos);
        }
        Ok(Checkpoint {
            instance_id,
            written_at_ms,
            posterior: PosteriorParts {
                prior_mean,
                prior_dense,
                prior_lambda,
                theta,
                chol,
                labels,
                weights,
                version,
                labels_applied,
                refactorizations,
                prequential,
            },
            scaler,
            pending_refit,
            next_sequence,
            label_offsets,
            request_scan_from,
            in_flight,
            closed,
        })
    }

    /// Writes atomically: temp file, fsync, rename, fsync of the directory. On error the previous file is
    /// untouched (the temporary file is removed).
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.encode())
            .with_context(|| format!("cannot write checkpoint {}", path.display()))
    }

    /// Reads `path`. `Ok(None)` when the file does not exist (first start); any other problem is an error
    /// naming the file.
    pub fn read(path: &Path) -> Result<Option<Self>> {
        let mut f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot open checkpoint {}", path.display()))
            }
        };
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)
            .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
        Self::decode(&bytes).map(Some).with_context(|| {
            format!(
                "checkpoint {} is unusable (refusing to start; move it away to start from scratch)",
                path.display()
            )
        })
    }
}

/// The directory of `path` and the prefix of [`write_atomic`]'s temporary files for it (`.<name>.tmp-`).
fn temp_prefix(path: &Path) -> Result<(PathBuf, String)> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("{} has no file name", path.display()))?;
    Ok((dir, format!(".{}.tmp-", name.to_string_lossy())))
}

/// Removes the temporary files that writers killed mid-write (`kill -9`, power loss) left next to
/// `path`; a process's own temporary file is kept. Without this every crash during a checkpoint or
/// export write would leave a file as large as the checkpoint behind for good. Returns how many were
/// removed; a missing directory is not an error.
pub fn remove_stale_temp_files(path: &Path) -> Result<usize> {
    let (dir, prefix) = temp_prefix(path)?;
    remove_stale_temp_files_in(&dir, |name| name.starts_with(&prefix))
}

/// Removes the files of `dir` whose name `is_temp` accepts and that are not this process's own (their
/// name ends in `.tmp-<pid>`; see [`write_atomic`]). Returns how many; a missing directory is not an
/// error.
pub fn remove_stale_temp_files_in(dir: &Path, is_temp: impl Fn(&str) -> bool) -> Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    let own = format!(".tmp-{}", std::process::id());
    let mut removed = 0;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if is_temp(&name) && !name.ends_with(&own) {
            fs::remove_file(entry.path()).with_context(|| {
                format!(
                    "cannot remove stale temporary file {}",
                    entry.path().display()
                )
            })?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Writes `bytes` to `path` atomically (see [`Checkpoint::write`]); also used for model exports.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let (dir, prefix) = temp_prefix(path)?;
    fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create directory {}", dir.display()))?;
    let tmp = dir.join(format!("{prefix}{}", std::process::id()));
    let result = (|| -> Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("cannot fsync {}", tmp.display()))?;
        drop(f);
        fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        // Make the rename itself durable.
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot fsync directory {}", dir.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f64(&mut self, v: f64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f64s(&mut self, v: &[f64]) {
        self.u64(v.len() as u64);
        self.0.reserve(v.len() * 8);
        for x in v {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
    }
    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.buf.len() - self.pos < n {
            bail!(
                "body ends inside field `{what}` (at byte {}, need {n} more, {} left)",
                self.pos,
                self.buf.len() - self.pos
            );
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
    fn i64(&mut self, what: &str) -> Result<i64> {
        Ok(i64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
    fn f64(&mut self, what: &str) -> Result<f64> {
        Ok(f64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
    /// A length prefix, checked against the bytes left so a corrupt count cannot trigger a huge allocation.
    fn count(&mut self, what: &str, min_item_bytes: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_item_bytes.max(1) as u64) > left {
            bail!("field `{what}` = {n} exceeds the remaining {left} bytes");
        }
        Ok(n as usize)
    }
    fn f64s(&mut self, what: &str) -> Result<Vec<f64>> {
        let n = self.count(what, 8)?;
        let b = self.take(n * 8, what)?;
        Ok(b.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }
    fn str(&mut self, what: &str) -> Result<String> {
        let n = self.count(what, 1)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| anyhow::anyhow!("field `{what}` is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stale_temp_files_of_killed_writers_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("armd.ckpt");
        assert_eq!(remove_stale_temp_files(&path).unwrap(), 0);
        let own = dir
            .path()
            .join(format!(".armd.ckpt.tmp-{}", std::process::id()));
        let stale = dir.path().join(".armd.ckpt.tmp-4294967295");
        let other = dir.path().join(".model.npy.tmp-4294967295");
        for f in [&path, &own, &stale, &other] {
            fs::write(f, b"x").unwrap();
        }
        assert_eq!(remove_stale_temp_files(&path).unwrap(), 1);
        assert!(!stale.exists());
        assert!(path.exists() && own.exists() && other.exists());
        // A directory that does not exist yet (first start) has nothing to clean.
        let missing = dir.path().join("no/such/dir/armd.ckpt");
        assert_eq!(remove_stale_temp_files(&missing).unwrap(), 0);
    }

    use super::*;
    use crate::posterior::Posterior;

    fn sample(d: usize, labels: usize, consolidate: bool) -> Checkpoint {
        let mut post = Posterior::new(d, 0.7).unwrap();
        let mut s = 1u64;
        let mut rnd = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        };
        for i in 0..labels {
            let v: Vec<f64> = (0..d).map(|_| rnd()).collect();
            post.update(&v, if i % 3 == 0 { 0.0 } else { 1.0 }).unwrap();
            if consolidate && i == labels / 2 {
                post.consolidate();
            }
        }
        Checkpoint {
            instance_id: "armd-0".into(),
            written_at_ms: 1_700_000_000_000,
            posterior: post.to_parts(),
            scaler: Some(ScalerState {
                scaling: Scaling::Standardize,
                mean: (0..d).map(|i| i as f64 * 0.1).collect(),
                inv_std: (0..d).map(|i| 1.0 / (1.0 + i as f64)).collect(),
            }),
            pending_refit: Some(3),
            next_sequence: 42,
            label_offsets: vec![(0, 17), (1, 0), (2, 99)],
            request_scan_from: vec![(0, 5)],
            in_flight: vec![InFlightState {
                request_json: "{\"request_id\":\"x\"}".into(),
                labels_received: 1,
                annotators: vec!["ann-1".into(), "".into()],
            }],
            closed: vec![
                ("a-1-00".into(), Closed::Labelled),
                ("a-2-00".into(), Closed::Expired),
            ],
        }
    }

    #[test]
    fn round_trip_is_bit_exact() {
        for consolidate in [false, true] {
            let c = sample(7, 12, consolidate);
            let back = Checkpoint::decode(&c.encode()).unwrap();
            assert_eq!(back, c);
            // PartialEq on f64 treats -0.0 == 0.0; compare bits explicitly.
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&back.posterior.chol), bits(&c.posterior.chol));
            assert_eq!(bits(&back.posterior.theta), bits(&c.posterior.theta));
            // And the posterior rebuilt from it predicts identically.
            let p1 = Posterior::from_parts(c.posterior.clone()).unwrap();
            let p2 = Posterior::from_parts(back.posterior).unwrap();
            assert_eq!(p1.log_det().to_bits(), p2.log_det().to_bits());
        }
    }

    #[test]
    fn empty_state_round_trips() {
        let c = Checkpoint {
            instance_id: "i".into(),
            written_at_ms: 0,
            posterior: Posterior::new(3, 1.0).unwrap().to_parts(),
            scaler: None,
            pending_refit: None,
            next_sequence: 0,
            label_offsets: vec![],
            request_scan_from: vec![],
            in_flight: vec![],
            closed: vec![],
        };
        assert_eq!(Checkpoint::decode(&c.encode()).unwrap(), c);
    }

    fn decode_err(bytes: &[u8]) -> String {
        format!("{:#}", Checkpoint::decode(bytes).unwrap_err())
    }

    #[test]
    fn every_corruption_is_detected() {
        let good = sample(5, 6, false).encode();
        // Truncation anywhere.
        for cut in [0, 3, 8, 19, 20, 100, good.len() - 1] {
            let e = decode_err(&good[..cut]);
            assert!(
                e.contains("truncated") || e.contains("magic"),
                "cut {cut}: {e}"
            );
        }
        // A flipped bit anywhere in the body or checksum.
        for pos in [
            HEADER_LEN,
            HEADER_LEN + 50,
            good.len() / 2,
            good.len() - 5,
            good.len() - 1,
        ] {
            let mut bad = good.clone();
            bad[pos] ^= 0x10;
            assert!(decode_err(&bad).contains("checksum"), "pos {pos}");
        }
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(decode_err(&bad).contains("magic"));
        let mut bad = good.clone();
        bad[8] = 2;
        let e = decode_err(&bad);
        assert!(e.contains("version 2") && e.contains("version 1"), "{e}");
        let mut bad = good.clone();
        bad.push(0);
        assert!(decode_err(&bad).contains("trailing"));
        let mut bad = good.clone();
        bad[12] ^= 0x01; // body length
        let e = decode_err(&bad);
        assert!(e.contains("truncated") || e.contains("trailing"), "{e}");
    }

    #[test]
    fn consistent_checksum_but_garbage_body_is_rejected() {
        // A body with a valid checksum that does not parse (e.g. written by a buggy tool).
        let body = vec![0xffu8; 40];
        let mut bytes = Vec::new();
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&body);
        bytes.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        let e = decode_err(&bytes);
        assert!(e.contains("exceeds") || e.contains("ends inside"), "{e}");
    }

    #[test]
    fn write_is_atomic_and_read_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.ckpt");
        assert!(Checkpoint::read(&path).unwrap().is_none());
        let c = sample(4, 3, false);
        c.write(&path).unwrap();
        assert_eq!(Checkpoint::read(&path).unwrap().unwrap(), c);
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // A failed write (target is a directory) leaves the old file and no temp file.
        let blocked = dir.path().join("sub");
        assert!(c.write(&blocked).is_err());
        assert_eq!(Checkpoint::read(&path).unwrap().unwrap(), c);
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
        // Corrupt file: the error names it.
        let mut bytes = fs::read(&path).unwrap();
        let n = bytes.len();
        bytes.truncate(n - 10);
        fs::write(&path, &bytes).unwrap();
        let e = format!("{:#}", Checkpoint::read(&path).unwrap_err());
        assert!(
            e.contains(&path.display().to_string()) && e.contains("truncated"),
            "{e}"
        );
    }
}
