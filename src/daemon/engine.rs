//! The engine: the one owner of model state. It runs on its own std thread (see `daemon::run`), never
//! on the async runtime, and is driven by plain method calls, so every rule below is unit-tested
//! without Kafka.
//!
//! - **Pool** ([`super::pool`]): validated responses; before the scaler is frozen they also feed the
//!   scaler's warm-up statistics.
//! - **Selection rounds** ([`Engine::run_round`]): when the scaler is frozen, the in-flight budget
//!   (`max_in_flight`) has room, the pool holds `min_pool` responses and `round_interval_ms` passed since
//!   the last round ended. Picks up to `min(batch_size, free budget)` pairs with the configured strategy
//!   (`greedy-dopt` conditions on the in-flight pairs as already picked), issues one request per pick and
//!   takes the used responses out of the pool (`pool.max_uses`).
//! - **Requests** ([`super::ledger`]): ids, the label join, expiry and recovery rules live in the
//!   [`Ledger`]; the engine applies what it decides. Every request of the group read from the requests
//!   topic ([`Engine::on_request`]) is registered, so every label is applied by every instance. Unknown,
//!   expired and duplicate labels are rejected with their reason; the dead letter is written by the
//!   instance that issued the request (by its id), or by every instance when no issuer can be read.
//! - **Labels wait for their request** ([`Engine::on_label`]): a label may be read before the request it
//!   names (two topics, two consumers). A label for a request this instance does not know yet is held —
//!   and every labels-topic message after it, so the order of application is the topic's — until the
//!   request arrives or the requests topic has been read to its end as of a moment after the label was
//!   read ([`Engine::on_requests_caught_up`]); only then is it unknown.
//! - **The group's scaler** ([`super::learner`]): this instance's warm-up becomes an `armd.scaler.v1`
//!   proposal published on the labels topic ([`Engine::maybe_propose_scaler`]); the first proposal read
//!   there is adopted ([`Engine::on_scaler`]). Requests read before that wait, unscaled.
//! - **Learning** ([`super::learner`]): the scaler, the posterior update, refits and consolidation
//!   live in the [`Learner`]; the engine hands it each joined label's difference vector.
//! - **Checkpoint and export state** ([`Engine::checkpoint`], [`Engine::export`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use faer::Mat;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::Value;

use super::checkpoint::{Checkpoint, InFlightState};
use super::config::Config;
use super::input::{DecodedScaler, LabelInput};
use super::learner::Learner;
use super::ledger::{InFlight, Join, Ledger};
use super::messages::{
    self, encode_f32_b64, encode_f64_b64, parse_request_id, DeadLetter, LabelMsg, LabelRequest,
    ModelSnapshot, Reason, Rejection, RequestSide, Response, ScalerMsg, SourcePosition,
    REQUEST_SCHEMA, SCALER_SCHEMA,
};
use super::pool::{Evicted, Pool, PoolEntry};
use super::telemetry::Metrics;
use crate::candidates::{self, CandidateOptions};
use crate::features::Scaler;
use crate::posterior::{Posterior, PosteriorParts};
use crate::selection::{self, SelectionInput};

/// Something the engine wants published.
#[derive(Clone, Debug)]
pub enum Output {
    /// A label request; key it by request id.
    Request(Box<LabelRequest>),
    DeadLetter(Box<DeadLetter>),
    Model(Box<ModelSnapshot>),
    /// This instance's scaling proposal: append it to partition 0 of the labels topic.
    Scaler(Box<ScalerMsg>),
}

/// What happened to one label message.
#[derive(Clone, Debug, PartialEq)]
pub enum LabelOutcome {
    /// Applied to the posterior; `closed` when the request now has all its labels.
    Applied {
        request_id: String,
        closed: bool,
    },
    /// Its request is not known yet: held, with every labels-topic message after it, until it is.
    Held,
    Rejected(Reason),
}

/// What waits behind a held label, in labels-topic order.
enum Held {
    Label(LabelInput),
    Scaler(
        std::result::Result<DecodedScaler, Rejection>,
        Option<Vec<u8>>,
        SourcePosition,
    ),
    CaughtUp(i64),
}

/// How long a scaling proposal that was not read back from the labels topic waits before it is sent
/// again (a failed delivery must not leave the group without a scaler).
const PROPOSAL_RETRY_MS: i64 = 10_000;

/// The daemon's model state and the rules that change it. See the module doc.
pub struct Engine {
    cfg: Arc<Config>,
    m: Arc<Metrics>,
    learner: Learner,
    pool: Pool,
    ledger: Ledger,
    label_offsets: BTreeMap<i32, i64>,
    /// Labels-topic messages waiting for a label's request (see the module doc).
    held: VecDeque<Held>,
    /// Wall time (ms) up to which the requests topic has been read to its end; `None` before the first
    /// time.
    requests_read_until_ms: Option<i64>,
    /// Requests read before the group's scaler was adopted (their pairs cannot be scaled yet).
    unscaled: Vec<LabelRequest>,
    /// When this instance last published its scaling proposal.
    proposal_sent_ms: Option<i64>,
    rng: StdRng,
    outbox: Vec<Output>,
    last_round_ms: Option<i64>,
    labels_since_checkpoint: u64,
    labels_since_export: u64,
    dirty: bool,
    checkpoint_now: bool,
}

/// Wall clock in milliseconds since the Unix epoch, with sub-millisecond precision (0 before 1970).
fn now_ms_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// How long after its Kafka timestamp a label reached the posterior, in ms. A label stamped by a clock
/// ahead of ours counts as 0 rather than negative.
fn apply_delay_ms(label_timestamp_ms: i64, applied_wall_ms: f64) -> f64 {
    (applied_wall_ms - label_timestamp_ms as f64).max(0.0)
}

impl Engine {
    /// A fresh engine, or one restored from `checkpoint` (validated against the configuration).
    pub fn new(cfg: Arc<Config>, m: Arc<Metrics>, checkpoint: Option<Checkpoint>) -> Result<Self> {
        let mut engine = Engine {
            learner: Learner::new(cfg.clone(), m.clone())?,
            pool: Pool::new(
                cfg.pool.capacity,
                cfg.pool.ttl.as_millis().min(i64::MAX as u128) as i64,
            ),
            ledger: Ledger::new(&cfg.daemon.instance_id, cfg.selection.closed_history),
            label_offsets: BTreeMap::new(),
            held: VecDeque::new(),
            requests_read_until_ms: None,
            unscaled: Vec::new(),
            proposal_sent_ms: None,
            rng: StdRng::seed_from_u64(cfg.selection.seed),
            outbox: Vec::new(),
            last_round_ms: None,
            labels_since_checkpoint: 0,
            labels_since_export: 0,
            dirty: false,
            checkpoint_now: false,
            cfg,
            m,
        };
        if let Some(c) = checkpoint {
            engine.restore(c)?;
        }
        engine.update_gauges();
        Ok(engine)
    }

    fn restore(&mut self, c: Checkpoint) -> Result<()> {
        let d = self.cfg.model.dim;
        if c.dim() != d {
            bail!(
                "checkpoint has dimension {}, but model.dim is {d} (a model cannot change dimension)",
                c.dim()
            );
        }
        if c.instance_id != self.cfg.daemon.instance_id {
            bail!(
                "checkpoint belongs to instance {:?}, but daemon.instance_id is {:?} (each instance needs its own checkpoint.path)",
                c.instance_id,
                self.cfg.daemon.instance_id
            );
        }
        self.learner
            .restore(c.scaler.as_ref(), c.posterior, c.pending_refit)?;
        self.rng = StdRng::seed_from_u64(self.cfg.selection.seed ^ c.next_sequence.rotate_left(32));
        self.label_offsets = c.label_offsets.into_iter().collect();
        let mut in_flight = Vec::with_capacity(c.in_flight.len());
        for s in c.in_flight {
            let request: LabelRequest = serde_json::from_str(&s.request_json)
                .context("checkpoint in-flight request is not a valid armd.request.v1")?;
            if !self.learner.scaler().is_frozen() {
                // Read before the group's scaler was adopted: still waiting for it.
                self.unscaled.push(request);
                continue;
            }
            let mut f = self
                .in_flight_from_request(request)
                .map_err(|r| anyhow::anyhow!("checkpoint in-flight request: {r}"))?;
            f.labels_received = s.labels_received;
            f.annotators = s.annotators;
            in_flight.push(f);
        }
        self.ledger
            .restore(c.next_sequence, c.request_scan_from, c.closed, in_flight);
        Ok(())
    }

    // ---------------------------------------------------------------------------------------------
    // Accessors

    pub fn posterior(&self) -> &Posterior {
        self.learner.posterior()
    }
    pub fn scaler(&self) -> &Scaler {
        self.learner.scaler()
    }
    pub fn pool_len(&self) -> usize {
        self.pool.len()
    }
    /// Requests that count against the budget (not lapsed).
    pub fn active_in_flight(&self) -> usize {
        self.ledger.active()
    }
    /// Every request still joinable (including lapsed ones in their grace period).
    pub fn in_flight_ids(&self) -> Vec<String> {
        self.ledger.ids()
    }
    pub fn next_sequence(&self) -> u64 {
        self.ledger.next_sequence()
    }
    pub fn label_offsets(&self) -> &BTreeMap<i32, i64> {
        &self.label_offsets
    }
    pub fn request_scan_from(&self) -> &BTreeMap<i32, i64> {
        self.ledger.request_scan_from()
    }
    pub fn refit_pending(&self) -> bool {
        self.learner.refit_pending()
    }
    /// Labels-topic messages waiting for a label's request.
    pub fn held(&self) -> usize {
        self.held.len()
    }
    /// Whether the group's scaler is adopted (selection can run).
    pub fn scaler_adopted(&self) -> bool {
        self.learner.scaler().is_frozen()
    }
    /// Drains what the engine wants published.
    pub fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.outbox)
    }

    // ---------------------------------------------------------------------------------------------
    // Responses

    /// Adds a validated response to the pool (feeding the scaler's warm-up first). Returns whether it was
    /// pooled (false for a duplicate).
    pub fn on_response(&mut self, r: Response, now_ms: i64) -> bool {
        self.on_responses(vec![r], now_ms) == 1
    }

    /// [`Self::on_response`] for one consumer batch (metrics updated once per batch); returns how many
    /// were pooled.
    pub fn on_responses(&mut self, batch: Vec<Response>, now_ms: i64) -> usize {
        self.m.responses_accepted.increment(batch.len() as u64);
        // Evictions are counted once per batch: two shared atomic counters per response were a few
        // per cent of the engine thread's ingest time.
        let mut ev = Evicted::default();
        let pooled = batch
            .into_iter()
            .map(|r| self.pool_response(r, now_ms, &mut ev))
            .filter(|&p| p)
            .count();
        self.count_evictions(ev);
        self.m.pool_responses.set(self.pool.len() as f64);
        pooled
    }

    fn pool_response(&mut self, r: Response, now_ms: i64, ev: &mut Evicted) -> bool {
        // The pool keeps raw embeddings only; rounds scale what they use (`run_round`), so a response
        // that is evicted before any round costs no scaling and no f64 copy.
        let entry = PoolEntry {
            prompt_id: r.prompt_id,
            response_id: r.response_id,
            raw: r.embedding,
            metadata: r.metadata,
            arrived_ms: now_ms,
            uses: 0,
        };
        let pooled = self.pool.insert(entry, ev);
        if !pooled {
            self.m.responses_duplicate.increment(1);
            return false;
        }
        let raw = &self.pool.newest().expect("just inserted").raw;
        self.learner.observe(raw);
        true
    }

    /// Publishes this instance's scaling proposal when its warm-up is done and no scaler is adopted yet,
    /// again every [`PROPOSAL_RETRY_MS`] until one is (see the module doc).
    pub fn maybe_propose_scaler(&mut self, now_ms: i64) {
        if self.learner.scaler().is_frozen()
            || self
                .proposal_sent_ms
                .is_some_and(|t| now_ms - t < PROPOSAL_RETRY_MS)
        {
            return;
        }
        let Some((scaler, samples)) = self.learner.proposal() else {
            return;
        };
        let msg = ScalerMsg {
            schema: SCALER_SCHEMA.to_string(),
            instance_id: self.cfg.daemon.instance_id.clone(),
            scaling: scaler.scaling().name().to_string(),
            samples,
            mean_b64: encode_f64_b64(scaler.mean()),
            inv_std_b64: encode_f64_b64(scaler.inv_std()),
            pair_spread: self.pool_sq_spread(scaler),
            proposed_at_ms: now_ms,
        };
        tracing::info!(
            samples,
            "warm-up done; scaling proposed to the group (labels topic)"
        );
        self.m.scaler_proposals.increment(1);
        self.proposal_sent_ms = Some(now_ms);
        self.outbox.push(Output::Scaler(Box::new(msg)));
    }

    /// For an engine used without Kafka (benches, tools): adopts this instance's own proposal as if it
    /// had been read back as the first scaler message of the labels topic. Returns whether it did.
    pub fn adopt_own_proposal(&mut self, now_ms: i64) -> bool {
        if self.learner.scaler().is_frozen() {
            return false;
        }
        self.proposal_sent_ms = None;
        self.maybe_propose_scaler(now_ms);
        let Some(i) = self
            .outbox
            .iter()
            .rposition(|o| matches!(o, Output::Scaler(_)))
        else {
            return false;
        };
        let Output::Scaler(msg) = self.outbox.remove(i) else {
            unreachable!("checked")
        };
        let bytes = serde_json::to_vec(&msg).expect("serialisable");
        let decoded = ScalerMsg::decode(Some(&bytes), self.cfg.model.dim);
        let pos = SourcePosition {
            topic: String::new(),
            partition: -1,
            offset: -1,
        };
        self.apply_scaler(decoded, None, pos, now_ms);
        self.label_offsets.remove(&-1);
        self.learner.scaler().is_frozen()
    }

    /// Handles an `armd.scaler.v1` message read at `pos` of the labels topic: the first valid one is the
    /// group's scaler; later ones are ignored. Held behind a held label like any labels-topic message.
    pub fn on_scaler(
        &mut self,
        decoded: std::result::Result<DecodedScaler, Rejection>,
        payload: Option<&[u8]>,
        pos: SourcePosition,
        now_ms: i64,
    ) {
        if !self.held.is_empty() {
            self.held
                .push_back(Held::Scaler(decoded, payload.map(<[u8]>::to_vec), pos));
            self.m.labels_held.set(self.held.len() as f64);
            return;
        }
        self.apply_scaler(decoded, payload, pos, now_ms);
    }

    fn apply_scaler(
        &mut self,
        decoded: std::result::Result<DecodedScaler, Rejection>,
        payload: Option<&[u8]>,
        pos: SourcePosition,
        now_ms: i64,
    ) {
        self.advance_label_offset(&pos);
        let (msg, mean, inv_std) = match decoded {
            Ok(d) => d,
            Err(r) => {
                tracing::warn!(partition = pos.partition, offset = pos.offset, reason = %r, "invalid scaler message on the labels topic; ignored");
                self.m.labels_rejected.get(r.reason).increment(1);
                self.dead_letter(&r, pos, payload, now_ms);
                return;
            }
        };
        if self.learner.scaler().is_frozen() {
            tracing::debug!(from = %msg.instance_id, "a later scaling proposal; the group's scaler is already adopted");
            return;
        }
        if msg.scaling != self.cfg.model.scaling.name() {
            tracing::error!(
                from = %msg.instance_id,
                theirs = %msg.scaling,
                ours = %self.cfg.model.scaling.name(),
                "the group's first scaling proposal uses another model.scaling; every instance of a group needs the same model settings (this instance will not select)"
            );
            return;
        }
        match self.learner.adopt(mean, inv_std, msg.pair_spread) {
            Ok(_) => {
                tracing::info!(from = %msg.instance_id, "the group's scaler adopted");
                // The scaler is part of the model: persist it before any request depends on it.
                self.dirty = true;
                self.checkpoint_now = true;
                for r in std::mem::take(&mut self.unscaled) {
                    self.register(r);
                }
                self.update_gauges();
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), from = %msg.instance_id, "cannot adopt the group's scaling proposal")
            }
        }
    }

    /// `2·mean ‖x − x̄‖²` over the pooled responses after scaling with `scaler`: the mean squared norm of a
    /// random difference vector, the `auto` prior's starting value (NaN for an empty pool).
    fn pool_sq_spread(&self, scaler: &Scaler) -> f64 {
        let d = self.cfg.model.dim;
        let mut rows = Vec::with_capacity(self.pool.len());
        let mut buf = vec![0.0; d];
        for (_, e) in self.pool.iter() {
            if scaler.transform(&e.raw, &mut buf).is_ok() {
                rows.push(buf.clone());
            }
        }
        let n = rows.len() as f64;
        let mut mean = vec![0.0; d];
        for r in &rows {
            mean.iter_mut().zip(r).for_each(|(m, x)| *m += x / n);
        }
        let spread: f64 = rows
            .iter()
            .map(|r| {
                r.iter()
                    .zip(&mean)
                    .map(|(x, m)| (x - m) * (x - m))
                    .sum::<f64>()
            })
            .sum::<f64>()
            / n;
        2.0 * spread
    }

    fn count_evictions(&self, ev: Evicted) {
        self.m.pool_evicted_capacity.increment(ev.capacity);
        self.m.pool_evicted_ttl.increment(ev.ttl);
    }

    // ---------------------------------------------------------------------------------------------
    // Selection

    /// Whether a round should run now (see the module doc).
    pub fn round_due(&self, now_ms: i64) -> bool {
        let s = &self.cfg.selection;
        self.learner.scaler().is_frozen()
            && self.active_in_flight() < s.max_in_flight
            && self.pool.len() >= s.min_pool
            && self
                .last_round_ms
                .is_none_or(|t| now_ms - t >= s.round_interval.as_millis() as i64)
    }

    /// Runs one selection round if one is due; returns the number of requests issued (also queued as
    /// [`Output::Request`]). The next interval counts from `now_ms` (a round that takes no time on the
    /// caller's clock); the daemon uses [`Self::maybe_round_timed`].
    pub fn maybe_round(&mut self, now_ms: i64) -> usize {
        self.maybe_round_timed(now_ms, || now_ms)
    }

    /// [`Self::maybe_round`], with the interval to the next round counted from the round's end as read
    /// from `clock` after it: a round that takes about as long as the interval (d = 2048, full pool) must
    /// not leave the engine thread selecting back to back, with labels and responses queueing behind it.
    pub fn maybe_round_timed(&mut self, now_ms: i64, clock: impl FnOnce() -> i64) -> usize {
        let mut ev = Evicted::default();
        self.pool.purge_expired(now_ms, &mut ev);
        self.count_evictions(ev);
        if !self.round_due(now_ms) {
            return 0;
        }
        let issued = match self.run_round(now_ms) {
            Ok(n) => n,
            Err(e) => {
                self.m.selection_errors.increment(1);
                tracing::error!(error = %e, "selection round failed");
                0
            }
        };
        self.last_round_ms = Some(clock().max(now_ms));
        issued
    }

    /// One selection round, unconditionally (the caller checked [`Self::round_due`]).
    pub fn run_round(&mut self, now_ms: i64) -> Result<usize> {
        let started = Instant::now();
        let s = &self.cfg.selection;
        let k = s
            .batch_size
            .min(s.max_in_flight.saturating_sub(self.active_in_flight()));
        if k == 0 {
            return Ok(0);
        }
        // Start/finish events let the crash harness tell where a `kill -9` landed.
        tracing::debug!(pool = self.pool.len(), k, "selection round started");
        let d = self.cfg.model.dim;
        if !self.learner.scaler().is_frozen() {
            return Ok(0);
        }
        let slots: Vec<(u64, &PoolEntry)> = self.pool.iter().collect();
        if slots.len() < 2 {
            return Ok(0);
        }
        let n = slots.len();
        let mut x = Mat::<f64>::zeros(d, n);
        for (j, (_, e)) in slots.iter().enumerate() {
            self.learner
                .scaler()
                .transform(&e.raw, x.col_as_slice_mut(j))?;
        }
        let mut prompt_ids: HashMap<&str, u64> = HashMap::new();
        let prompts: Vec<u64> = slots
            .iter()
            .map(|(_, e)| {
                let next = prompt_ids.len() as u64;
                *prompt_ids.entry(&e.prompt_id).or_insert(next)
            })
            .collect();
        let opts = CandidateOptions {
            mode: s.candidates,
            max_cross_pairs: s.max_cross_pairs,
            max_within_pairs: s.max_within_pairs,
        };
        let mut pairs = candidates::generate(&prompts, &opts, &mut self.rng);
        // A pair another request of the group still has open is not asked again (after a rebalance two
        // instances can pool the same responses).
        let side = |i: u32| {
            let e = slots[i as usize].1;
            (&*e.prompt_id, &*e.response_id)
        };
        pairs.retain(|p| !self.ledger.pair_open(side(p.a), side(p.b)));
        self.m.candidate_pairs_scored.increment(pairs.len() as u64);
        self.m.selection_rounds.increment(1);
        if pairs.is_empty() {
            return Ok(0);
        }
        let in_flight = self.ledger.open_vectors();
        let targets = candidates::within_prompt(&prompts);
        let max_uses = self.cfg.pool.max_uses;
        let uses_left: Vec<u32> = slots
            .iter()
            .map(|(_, e)| max_uses.saturating_sub(e.uses))
            .collect();
        let input = SelectionInput {
            posterior: self.learner.posterior(),
            embeddings: x.as_ref(),
            candidates: &pairs,
            in_flight: &in_flight,
            k,
            targets: &targets,
            uses_left: &uses_left,
        };
        let picks = selection::select(s.strategy, input, &s.params, &mut self.rng)?;
        let slot_ids: Vec<u64> = slots.iter().map(|(s, _)| *s).collect();
        drop(slots);
        let mut issued = 0;
        let mut gain = 0.0;
        let mut used: HashMap<u64, u32> = HashMap::new();
        for pick in picks {
            let (sa, sb) = (
                slot_ids[pick.pair.a as usize],
                slot_ids[pick.pair.b as usize],
            );
            // Selection honours the use limit (`uses_left`), so the greedy conditioned only on picks that
            // are issued here; this check only guards that contract.
            let usable = |slot: u64, pool: &Pool, used: &HashMap<u64, u32>| {
                pool.get(slot)
                    .is_some_and(|e| e.uses + used.get(&slot).copied().unwrap_or(0) < max_uses)
            };
            if !usable(sa, &self.pool, &used) || !usable(sb, &self.pool, &used) {
                tracing::error!(
                    sa,
                    sb,
                    "selection returned a pick over the use limit; skipped"
                );
                debug_assert!(false, "selection ignored uses_left");
                continue;
            }
            *used.entry(sa).or_default() += 1;
            *used.entry(sb).or_default() += 1;
            let req = self.issue(sa, sb, pick.score, pick.prediction.p, now_ms)?;
            gain += pick.score;
            issued += 1;
            self.outbox.push(Output::Request(Box::new(req)));
        }
        for (slot, u) in used {
            if let Some(e) = self.pool.get_mut(slot) {
                e.uses += u;
                if e.uses >= self.cfg.pool.max_uses {
                    self.pool.remove(slot);
                }
            }
        }
        self.m.requests_emitted.increment(issued as u64);
        self.m.selection_batch_gain.set(gain);
        self.m
            .selection_duration
            .record(started.elapsed().as_secs_f64());
        tracing::debug!(
            issued,
            took_us = started.elapsed().as_micros() as u64,
            "selection round finished"
        );
        self.dirty |= issued > 0;
        self.update_gauges();
        Ok(issued)
    }

    /// Creates the request for pool slots `sa`, `sb` and registers it in flight.
    fn issue(&mut self, sa: u64, sb: u64, gain: f64, p: f64, now_ms: i64) -> Result<LabelRequest> {
        let find = |slot| {
            self.pool
                .get(slot)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("pool slot {slot} vanished"))
        };
        let (a, b) = (find(sa)?, find(sb)?);
        let seq = self.ledger.take_sequence();
        let instance = &self.cfg.daemon.instance_id;
        let side = |e: &PoolEntry| RequestSide {
            prompt_id: e.prompt_id.to_string(),
            response_id: e.response_id.to_string(),
            metadata: e.metadata.clone(),
            embedding_b64: encode_f32_b64(&e.raw),
        };
        let ttl = self.cfg.selection.request_ttl.as_millis() as i64;
        let request = LabelRequest {
            schema: REQUEST_SCHEMA.to_string(),
            request_id: messages::request_id(instance, seq, &a.response_id, &b.response_id),
            instance_id: instance.clone(),
            sequence: seq,
            a: side(&a),
            b: side(&b),
            strategy: self.cfg.selection.strategy.name().to_string(),
            gain,
            predicted_p: p,
            model_version: self.learner.posterior().version(),
            labels_wanted: self.cfg.selection.labels_per_request,
            issued_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(ttl),
        };
        let v = self.learner.difference(&a.raw, &b.raw)?;
        self.ledger
            .insert(InFlight::new(request.clone(), v, a.raw, b.raw, false));
        Ok(request)
    }

    /// Rebuilds an in-flight entry from a request message (checkpoint or requests topic).
    fn in_flight_from_request(
        &self,
        request: LabelRequest,
    ) -> std::result::Result<InFlight, Rejection> {
        if !self.learner.scaler().is_frozen() {
            return Err(Rejection::new(
                Reason::InvalidValue,
                "request found but the feature scaler is not frozen (the checkpoint predates it)",
            ));
        }
        let d = self.cfg.model.dim;
        let raw_a = messages::decode_f32_b64("a.embedding_b64", &request.a.embedding_b64)?;
        let raw_b = messages::decode_f32_b64("b.embedding_b64", &request.b.embedding_b64)?;
        if raw_a.len() != d || raw_b.len() != d {
            return Err(Rejection::new(
                Reason::WrongDimension,
                format!(
                    "request embeddings have {}/{} values, model.dim is {d}",
                    raw_a.len(),
                    raw_b.len()
                ),
            ));
        }
        let v = self
            .learner
            .difference(&raw_a, &raw_b)
            .map_err(|e| Rejection::new(Reason::NonFinite, e.to_string()))?;
        // From a checkpoint (which holds only delivered requests) or from the topic itself: delivered.
        Ok(InFlight::new(request, v, raw_a, raw_b, true))
    }

    /// Handles a message read at `offset` of requests-topic `partition` (at start-up and while running):
    /// a request of any instance that is not known or closed is registered, so its labels are applied
    /// here too; one of ours also advances the id sequence past it. A message that is not a request
    /// (`Err`, with why) is skipped. Releases held labels whose request this was.
    pub fn on_request(
        &mut self,
        request: std::result::Result<LabelRequest, String>,
        partition: i32,
        offset: i64,
    ) {
        self.ledger.advance_request_scan(partition, offset + 1);
        self.dirty = true;
        match request {
            Ok(r) => {
                if self.ledger.wants(&r)
                    && !self.unscaled.iter().any(|u| u.request_id == r.request_id)
                {
                    if self.learner.scaler().is_frozen() {
                        self.register(r);
                    } else {
                        self.unscaled.push(r);
                    }
                }
            }
            Err(why) => {
                self.m.requests_unreadable.increment(1);
                tracing::warn!(partition, offset, error = %why, "message on the requests topic is not an armd.request.v1; skipped");
            }
        }
        self.release_held(now_ms_f64() as i64);
    }

    /// Registers a request read from the topic (the scaler is adopted).
    fn register(&mut self, request: LabelRequest) {
        let own = request.instance_id == self.cfg.daemon.instance_id;
        let id = request.request_id.clone();
        match self.in_flight_from_request(request) {
            Ok(f) => {
                self.ledger.insert(f);
                if own {
                    self.m.requests_recovered.increment(1);
                } else {
                    self.m.requests_other_instances.increment(1);
                }
                self.update_gauges();
            }
            Err(r) => {
                self.m.requests_unreadable.increment(1);
                tracing::warn!(request = %id, reason = %r, "request on the requests topic cannot be registered; its labels will be rejected");
            }
        }
    }

    /// Records that the requests consumer has handed over every request appended to the requests topic
    /// before wall time `as_of_ms`. Held labels read before that moment whose request is still unknown
    /// are now handled (and rejected as unknown).
    pub fn on_requests_caught_up(&mut self, as_of_ms: i64) {
        self.requests_read_until_ms = Some(
            self.requests_read_until_ms
                .map_or(as_of_ms, |t| t.max(as_of_ms)),
        );
        self.release_held(now_ms_f64() as i64);
    }

    /// Marks requests as delivered to the requests topic (ids of requests no longer in flight are ignored).
    pub fn on_requests_delivered(&mut self, ids: impl IntoIterator<Item = String>) {
        self.ledger.on_requests_delivered(ids);
    }

    /// Every request before `offset` of requests-topic `partition` has been handed over (start-up read the
    /// partition to there); never moves back.
    pub fn advance_request_scan(&mut self, partition: i32, offset: i64) {
        self.ledger.advance_request_scan(partition, offset);
    }

    /// Sets the next offset of a labels partition that the checkpoint does not know yet.
    pub fn init_label_offset(&mut self, partition: i32, offset: i64) {
        self.label_offsets.entry(partition).or_insert(offset);
    }

    // ---------------------------------------------------------------------------------------------
    // Expiry

    /// Records that the labels consumer has handed over every label the labels topic held at wall time
    /// `as_of_ms` (its read position reached the high watermark fetched then); see [`Ledger::expire`].
    pub fn on_labels_caught_up(&mut self, as_of_ms: i64) {
        if self.held.is_empty() {
            self.ledger.on_labels_caught_up(as_of_ms);
        } else {
            // Labels before this mark are still held: it takes effect when they are applied.
            self.held.push_back(Held::CaughtUp(as_of_ms));
        }
    }

    /// Whether the labels topic has been read to its end at least once since start (the replay of labels
    /// published after the checkpoint is done).
    pub fn labels_caught_up(&self) -> bool {
        self.ledger.labels_caught_up()
    }

    /// Lapses requests past their TTL (their responses return to the pool, if still fresh) and forgets
    /// lapsed ones once the labels topic has been read past their expiry plus the grace
    /// ([`Ledger::expire`]).
    pub fn expire(&mut self, now_ms: i64) {
        let grace = self.cfg.selection.expiry_grace.as_millis() as i64;
        let expired = self.ledger.expire(now_ms, grace);
        self.m
            .requests_expired
            .increment(expired.lapsed.iter().filter(|f| f.own).count() as u64);
        for f in expired.lapsed.iter().filter(|f| f.own) {
            let back =
                [(&f.request.a, &f.raw_a), (&f.request.b, &f.raw_b)].map(|(side, raw)| PoolEntry {
                    prompt_id: side.prompt_id.as_str().into(),
                    response_id: side.response_id.as_str().into(),
                    raw: raw.clone(),
                    metadata: side.metadata.clone(),
                    arrived_ms: f.request.issued_at_ms,
                    uses: 0,
                });
            for e in back {
                if self.pool.is_fresh(e.arrived_ms, now_ms) {
                    let mut ev = Evicted::default();
                    self.pool.insert(e, &mut ev);
                    self.count_evictions(ev);
                }
            }
        }
        if !expired.lapsed.is_empty() {
            self.dirty = true;
            self.update_gauges();
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Labels

    /// Handles one message of the labels topic, already decoded (or rejected by the decoder). The Kafka
    /// timestamp decides expiry. A label whose request is not known yet is held (see the module doc);
    /// otherwise it is applied or rejected (a dead letter, see the module doc), and the partition's next
    /// offset advances in every case.
    pub fn on_label(&mut self, input: LabelInput, now_ms: i64) -> LabelOutcome {
        if !self.held.is_empty() || self.must_wait(&input) {
            self.held.push_back(Held::Label(input));
            self.m.labels_held.set(self.held.len() as f64);
            return LabelOutcome::Held;
        }
        self.apply_label(input, now_ms)
    }

    /// Whether a label names a request this instance has not read yet while the requests topic may still
    /// hold it.
    fn must_wait(&self, input: &LabelInput) -> bool {
        let Ok(label) = &input.decoded else {
            return false;
        };
        !self.ledger.knows(&label.request_id)
            && self
                .requests_read_until_ms
                .is_none_or(|t| t < input.read_at_ms)
    }

    /// Handles the held messages at the front of the queue that can be handled now.
    fn release_held(&mut self, now_ms: i64) {
        while let Some(front) = self.held.front() {
            if let Held::Label(l) = front {
                if self.must_wait(l) {
                    break;
                }
            }
            match self.held.pop_front().expect("non-empty") {
                Held::Label(l) => {
                    self.apply_label(l, now_ms);
                }
                Held::Scaler(d, payload, pos) => {
                    self.apply_scaler(d, payload.as_deref(), pos, now_ms)
                }
                Held::CaughtUp(t) => self.ledger.on_labels_caught_up(t),
            }
        }
        self.m.labels_held.set(self.held.len() as f64);
    }

    fn advance_label_offset(&mut self, pos: &SourcePosition) {
        let next = self.label_offsets.entry(pos.partition).or_insert(0);
        *next = (*next).max(pos.offset + 1);
        self.dirty = true;
    }

    fn apply_label(&mut self, input: LabelInput, now_ms: i64) -> LabelOutcome {
        let LabelInput {
            decoded,
            payload,
            pos,
            timestamp_ms,
            ..
        } = input;
        self.m.labels_received.increment(1);
        self.advance_label_offset(&pos);
        let issuer = decoded
            .as_ref()
            .ok()
            .and_then(|l| parse_request_id(&l.request_id).map(|(i, _)| i.to_string()));
        let outcome = match decoded {
            Err(r) => Err(r),
            Ok(label) => self.join(label, timestamp_ms),
        };
        match outcome {
            Ok(o) => o,
            Err(r) => {
                self.m.labels_rejected.get(r.reason).increment(1);
                // One dead letter per bad label in a group: the issuer's (see the module doc).
                if issuer.is_none_or(|i| i == self.cfg.daemon.instance_id) {
                    self.dead_letter(&r, pos, payload.as_deref(), now_ms);
                }
                LabelOutcome::Rejected(r.reason)
            }
        }
    }

    fn dead_letter(
        &mut self,
        r: &Rejection,
        pos: SourcePosition,
        payload: Option<&[u8]>,
        now_ms: i64,
    ) {
        let dl = DeadLetter::new(
            r,
            pos,
            payload,
            self.cfg.pool.dead_letter_payload_bytes,
            now_ms,
        );
        self.outbox.push(Output::DeadLetter(Box::new(dl)));
    }

    fn join(
        &mut self,
        label: LabelMsg,
        timestamp_ms: i64,
    ) -> std::result::Result<LabelOutcome, Rejection> {
        let id = label.request_id;
        let annotator = label.annotator_id.unwrap_or_default();
        let f: Join = self.ledger.join(&id, &annotator, timestamp_ms)?;
        if !f.own {
            self.m.labels_foreign.increment(1);
        }
        self.learner.apply(&f.v, label.y).map_err(|e| {
            Rejection::new(
                Reason::InvalidValue,
                format!("label cannot be applied: {e}"),
            )
        })?;
        let latency = (timestamp_ms - f.request.issued_at_ms).max(0) as f64 / 1000.0;
        self.m.label_latency.record(latency);
        let apply_delay_ms = apply_delay_ms(timestamp_ms, now_ms_f64());
        self.m.label_apply_delay.record(apply_delay_ms / 1000.0);
        self.m.labels_applied.increment(1);
        tracing::debug!(request = %id, apply_delay_ms, labels_applied = self.learner.posterior().labels_applied(), "label applied");
        let closed = self.ledger.record_label(&id, annotator);
        self.labels_since_checkpoint += 1;
        self.labels_since_export += 1;
        self.update_gauges();
        Ok(LabelOutcome::Applied {
            request_id: id,
            closed,
        })
    }

    /// Installs a finished refit, if any (never blocks).
    pub fn poll_refit(&mut self) {
        if self.learner.poll_refit() {
            self.dirty = true;
            self.update_gauges();
        }
    }

    /// Blocks until a pending refit is installed (tests, replays).
    pub fn wait_refit(&mut self) {
        if self.learner.wait_refit() {
            self.dirty = true;
            self.update_gauges();
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Checkpoint and export

    /// Whether a checkpoint is due: after `every_labels` labels, or `every` after the last one when
    /// anything changed, or right after the scaler froze.
    pub fn checkpoint_due(&self, since_last: std::time::Duration) -> bool {
        self.checkpoint_now
            || self.labels_since_checkpoint >= self.cfg.checkpoint.every_labels
            || (self.dirty && since_last >= self.cfg.checkpoint.every)
    }

    /// A snapshot of the durable state; resets the cadence counters.
    ///
    /// In-flight requests whose delivery to the requests topic is not confirmed yet (and that have no
    /// label) are left out: if the process dies before they are delivered, no annotator can ever see
    /// them, and restoring them would hold a slot of the in-flight budget until they expire. If they are
    /// delivered after all, they land after the checkpoint's `request_scan_from` offsets (delivery
    /// confirmations and offsets are snapshotted together, see [`super::kafka::DeliveredRequests`]),
    /// and start-up recovery reads them back from the topic.
    pub fn checkpoint(&mut self, now_ms: i64) -> Checkpoint {
        self.labels_since_checkpoint = 0;
        self.dirty = false;
        self.checkpoint_now = false;
        Checkpoint {
            instance_id: self.cfg.daemon.instance_id.clone(),
            written_at_ms: now_ms,
            posterior: self.learner.posterior().to_parts(),
            scaler: self.learner.scaler_state(),
            pending_refit: self.learner.pending_refit_at(),
            next_sequence: self.ledger.next_sequence(),
            label_offsets: self.label_offsets.iter().map(|(&p, &o)| (p, o)).collect(),
            request_scan_from: self
                .ledger
                .request_scan_from()
                .iter()
                .map(|(&p, &o)| (p, o))
                .collect(),
            in_flight: self
                .ledger
                .checkpoint_in_flight()
                .into_iter()
                .chain(self.unscaled.iter().map(|r| InFlightState {
                    request_json: serde_json::to_string(r).expect("serialisable"),
                    labels_received: 0,
                    annotators: Vec::new(),
                }))
                .collect(),
            closed: self.ledger.checkpoint_closed(),
        }
    }

    /// Marks the state as changed so the time-based cadence writes it again (after a failed write).
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    pub fn export_due(&self) -> bool {
        (self.cfg.export.dir.is_some() || self.cfg.export.publish)
            && self.labels_since_export >= self.cfg.export.every_labels
    }

    /// The current model as a snapshot (raw-space weights when the scaling folds).
    pub fn snapshot(&self, now_ms: i64) -> ModelSnapshot {
        self.learner.snapshot(&self.cfg.daemon.instance_id, now_ms)
    }

    /// Takes an export: resets the export cadence and returns the snapshot, also queued as an
    /// [`Output::Model`] when `export.publish` is set. Writing `export.dir` is the caller's (file I/O stays
    /// out of the engine).
    pub fn export(&mut self, now_ms: i64) -> ModelSnapshot {
        self.labels_since_export = 0;
        let snap = self.snapshot(now_ms);
        self.m.exports.increment(1);
        if self.cfg.export.publish {
            self.outbox.push(Output::Model(Box::new(snap.clone())));
        }
        snap
    }

    /// Refreshes the pool, in-flight and model gauges.
    pub fn update_gauges(&self) {
        self.m.pool_responses.set(self.pool.len() as f64);
        self.m
            .requests_in_flight
            .set(self.active_in_flight() as f64);
        self.m
            .requests_open_group
            .set(self.ledger.open_all() as f64);
        self.learner.update_gauges();
    }

    /// The posterior's parts (for replay comparisons in tests).
    pub fn posterior_parts(&self) -> PosteriorParts {
        self.learner.posterior().to_parts()
    }

    /// Metadata of a pooled response, for tests.
    pub fn pooled_metadata(&self, prompt_id: &str, response_id: &str) -> Option<Value> {
        self.pool
            .iter()
            .find(|(_, e)| &*e.prompt_id == prompt_id && &*e.response_id == response_id)
            .and_then(|(_, e)| e.metadata.as_ref().map(|m| m.to_value()))
    }
}

#[cfg(test)]
mod tests;
