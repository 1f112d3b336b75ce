//! The request ledger: the requests of the whole group (this instance's and, read from the requests topic,
//! every other instance's) that may still receive labels, the ids of closed ones, this instance's id
//! sequence and the requests-topic read positions, and the rules that decide what a label for a request
//! means. It knows nothing of the posterior or the pool; the engine asks it and acts.
//!
//! - **Whose request**: every instance applies every label, so it needs every request's pair. A request is
//!   *own* when this instance issued it; only own requests count against this instance's in-flight budget
//!   and give their responses back to its pool when they lapse. Selection conditions on the open requests
//!   of all instances ([`Ledger::open_vectors`]), and no pair that is open anywhere is issued again
//!   ([`Ledger::pair_open`]).
//!
//! - **Request ids**: `<instance>-<sequence>-<hash(instance, sequence, response ids)>`. The sequence is
//!   checkpointed and recovered from the requests topic, and the hash covers the pair, so an id never
//!   names two different pairs.
//! - **Label join** ([`Ledger::join`]): a label joins when its request is known, the label's Kafka
//!   timestamp is not after the request's expiry, and its annotator has not labelled that request yet; the
//!   request closes after `labels_wanted` labels ([`Ledger::record_label`]). Deciding expiry by the label's
//!   own timestamp (not the wall clock at processing) makes the decision identical when labels are
//!   replayed after a crash.
//! - **Expiry** ([`Ledger::expire`]): at `expires_at` (wall clock) a request lapses: it stops counting
//!   against the in-flight budget (its responses can be offered again) but still takes labels timestamped
//!   before the expiry. It is forgotten (its id moves to a bounded closed set, and later labels for it are
//!   rejected as expired) only once the labels consumer has read the labels topic up to a moment at least
//!   the grace period after the expiry ([`Ledger::on_labels_caught_up`]). Judging by how far the labels
//!   topic has been *read*, not by the wall clock, means no downtime or consumer lag can make a label
//!   timestamped before its request's expiry arrive too late: after a crash, the labels published while
//!   the daemon was down are replayed before anything is forgotten.

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::checkpoint::{Closed, InFlightState};
use super::messages::{LabelRequest, Reason, Rejection};

/// An issued request that may still receive labels.
#[derive(Clone, Debug)]
pub struct InFlight {
    pub request: LabelRequest,
    /// Scaled difference `x_a − x_b`.
    pub v: Vec<f64>,
    pub raw_a: Vec<f32>,
    pub raw_b: Vec<f32>,
    pub labels_received: u32,
    pub annotators: Vec<String>,
    /// Past `expires_at`: no longer counted against the budget, kept for late labels until forgotten.
    pub lapsed: bool,
    /// Known to be on the requests topic: its delivery was confirmed, or it was restored from a checkpoint
    /// or read back from the topic. See [`Ledger::checkpoint_in_flight`].
    pub delivered: bool,
    /// Issued by this instance (set by [`Ledger::insert`]).
    pub own: bool,
}

impl InFlight {
    /// A request just issued or rebuilt, with no label yet.
    pub fn new(
        request: LabelRequest,
        v: Vec<f64>,
        raw_a: Vec<f32>,
        raw_b: Vec<f32>,
        delivered: bool,
    ) -> Self {
        Self {
            request,
            v,
            raw_a,
            raw_b,
            labels_received: 0,
            annotators: Vec::new(),
            lapsed: false,
            delivered,
            own: false,
        }
    }

    /// The pair's identity, independent of order: `prompt␟response` of both sides, sorted.
    fn pair_key(&self) -> (String, String) {
        pair_key(
            (&self.request.a.prompt_id, &self.request.a.response_id),
            (&self.request.b.prompt_id, &self.request.b.response_id),
        )
    }
}

fn pair_key(a: (&str, &str), b: (&str, &str)) -> (String, String) {
    let k = |(p, r): (&str, &str)| format!("{p}\u{1f}{r}");
    let (ka, kb) = (k(a), k(b));
    if ka <= kb {
        (ka, kb)
    } else {
        (kb, ka)
    }
}

/// Bounded memory of closed request ids.
#[derive(Debug, Default)]
struct ClosedSet {
    capacity: usize,
    order: VecDeque<String>,
    why: HashMap<String, Closed>,
}

impl ClosedSet {
    fn insert(&mut self, id: String, why: Closed) {
        if self.why.insert(id.clone(), why).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.why.remove(&old);
            }
        }
    }
    fn get(&self, id: &str) -> Option<Closed> {
        self.why.get(id).copied()
    }
}

/// What a label means for the ledger: apply it with this request's difference vector, then call
/// [`Ledger::record_label`].
pub type Join<'a> = &'a InFlight;

/// What [`Ledger::expire`] changed.
#[derive(Debug, Default)]
pub struct Expired {
    /// Requests that lapsed now (clones): their responses may be offered again.
    pub lapsed: Vec<InFlight>,
    /// How many lapsed requests were forgotten.
    pub forgotten: usize,
}

/// See the module doc.
#[derive(Debug)]
pub struct Ledger {
    instance_id: String,
    in_flight: BTreeMap<String, InFlight>,
    /// Pair keys of the entries of `in_flight`, with how many entries name each (two instances may pick
    /// the same pair in the moment before either has read the other's request).
    pairs: HashMap<(String, String), u32>,
    closed: ClosedSet,
    next_sequence: u64,
    request_scan_from: BTreeMap<i32, i64>,
    /// Wall-clock time (ms) up to which every label appended to the labels topic has been handed over;
    /// `None` until the labels consumer first caught up after start.
    labels_read_until_ms: Option<i64>,
}

impl Ledger {
    /// An empty ledger for `instance_id`, remembering up to `closed_history` closed ids.
    pub fn new(instance_id: &str, closed_history: usize) -> Self {
        Self {
            instance_id: instance_id.to_string(),
            in_flight: BTreeMap::new(),
            pairs: HashMap::new(),
            closed: ClosedSet {
                capacity: closed_history,
                ..Default::default()
            },
            next_sequence: 0,
            request_scan_from: BTreeMap::new(),
            labels_read_until_ms: None,
        }
    }

    /// Restores the checkpointed parts (in-flight entries already rebuilt by the caller).
    pub fn restore(
        &mut self,
        next_sequence: u64,
        request_scan_from: impl IntoIterator<Item = (i32, i64)>,
        closed: impl IntoIterator<Item = (String, Closed)>,
        in_flight: impl IntoIterator<Item = InFlight>,
    ) {
        self.next_sequence = next_sequence;
        self.request_scan_from = request_scan_from.into_iter().collect();
        for (id, why) in closed {
            self.closed.insert(id, why);
        }
        for f in in_flight {
            self.insert(f);
        }
    }

    pub fn next_sequence(&self) -> u64 {
        self.next_sequence
    }

    /// The sequence number for a new request (used up).
    pub fn take_sequence(&mut self) -> u64 {
        let s = self.next_sequence;
        self.next_sequence += 1;
        s
    }

    /// Registers a request: one just issued, restored, or read from the requests topic.
    pub fn insert(&mut self, mut f: InFlight) {
        f.own = f.request.instance_id == self.instance_id;
        let key = f.pair_key();
        if self
            .in_flight
            .insert(f.request.request_id.clone(), f)
            .is_none()
        {
            *self.pairs.entry(key).or_default() += 1;
        }
    }

    fn remove(&mut self, id: &str) -> Option<InFlight> {
        let f = self.in_flight.remove(id)?;
        let key = f.pair_key();
        if let Some(n) = self.pairs.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.pairs.remove(&key);
            }
        }
        Some(f)
    }

    /// Whether a request of any instance that can still take labels names this pair (either order).
    pub fn pair_open(&self, a: (&str, &str), b: (&str, &str)) -> bool {
        !self.pairs.is_empty() && self.pairs.contains_key(&pair_key(a, b))
    }

    /// This instance's requests counting against its in-flight budget (not lapsed).
    pub fn active(&self) -> usize {
        self.in_flight
            .values()
            .filter(|f| f.own && !f.lapsed)
            .count()
    }

    /// Open requests of every instance (not lapsed).
    pub fn open_all(&self) -> usize {
        self.in_flight.values().filter(|f| !f.lapsed).count()
    }

    /// Whether request `id` is known (in flight) or remembered as closed.
    pub fn knows(&self, id: &str) -> bool {
        self.in_flight.contains_key(id) || self.closed.get(id).is_some()
    }

    /// Ids of every request that can still take a label (lapsed ones included).
    pub fn ids(&self) -> Vec<String> {
        self.in_flight.keys().cloned().collect()
    }

    /// Difference vectors of the open requests of every instance (selection conditions on them).
    pub fn open_vectors(&self) -> Vec<Vec<f64>> {
        self.in_flight
            .values()
            .filter(|f| !f.lapsed)
            .map(|f| f.v.clone())
            .collect()
    }

    /// Whether a request read from the requests topic should be registered (not known, not closed; any
    /// instance's). An own one marks the known entry delivered, and a new own one advances the sequence
    /// past it: the sequence number is used even if the pair cannot be rebuilt.
    pub fn wants(&mut self, request: &LabelRequest) -> bool {
        let own = request.instance_id == self.instance_id;
        if let Some(f) = self.in_flight.get_mut(&request.request_id) {
            f.delivered = true;
            return false;
        }
        if self.closed.get(&request.request_id).is_some() {
            return false;
        }
        if own {
            self.next_sequence = self.next_sequence.max(request.sequence.saturating_add(1));
        }
        true
    }

    pub fn request_scan_from(&self) -> &BTreeMap<i32, i64> {
        &self.request_scan_from
    }

    /// Every request before `offset` of requests-topic `partition` has been read (a restart reads on from
    /// there). Never moves back.
    pub fn advance_request_scan(&mut self, partition: i32, offset: i64) {
        let e = self.request_scan_from.entry(partition).or_insert(offset);
        *e = (*e).max(offset);
    }

    /// Marks requests as delivered to the requests topic (ids no longer in flight are ignored).
    pub fn on_requests_delivered(&mut self, ids: impl IntoIterator<Item = String>) {
        for id in ids {
            if let Some(f) = self.in_flight.get_mut(&id) {
                f.delivered = true;
            }
        }
    }

    /// Every label appended to the labels topic before wall time `as_of_ms` has been handed over. Earlier
    /// calls with a later time are kept.
    pub fn on_labels_caught_up(&mut self, as_of_ms: i64) {
        self.labels_read_until_ms = Some(
            self.labels_read_until_ms
                .map_or(as_of_ms, |t| t.max(as_of_ms)),
        );
    }

    /// Whether the labels topic has been read to its end at least once since start.
    pub fn labels_caught_up(&self) -> bool {
        self.labels_read_until_ms.is_some()
    }

    /// Lapses requests past their TTL by the wall clock and forgets lapsed ones once the labels topic has
    /// been read up to `expires_at + grace_ms` (see the module doc).
    pub fn expire(&mut self, now_ms: i64, grace_ms: i64) -> Expired {
        let read_until = self.labels_read_until_ms;
        let mut out = Expired::default();
        let mut forget = Vec::new();
        for (id, f) in &mut self.in_flight {
            if !f.lapsed && now_ms >= f.request.expires_at_ms {
                f.lapsed = true;
                out.lapsed.push(f.clone());
            }
            if f.lapsed
                && read_until.is_some_and(|t| t >= f.request.expires_at_ms.saturating_add(grace_ms))
            {
                forget.push(id.clone());
            }
        }
        out.forgotten = forget.len();
        for id in forget {
            self.remove(&id);
            self.closed.insert(id, Closed::Expired);
        }
        out
    }

    /// Decides whether a label for request `id` from `annotator` (empty: anonymous), timestamped
    /// `timestamp_ms` by Kafka, is applied, skipped as foreign, or rejected with its reason.
    pub fn join(
        &self,
        id: &str,
        annotator: &str,
        timestamp_ms: i64,
    ) -> Result<Join<'_>, Rejection> {
        let Some(f) = self.in_flight.get(id) else {
            return match self.closed.get(id) {
                Some(Closed::Labelled) => Err(Rejection::new(
                    Reason::DuplicateLabel,
                    format!("request {id} already has all its labels"),
                )),
                Some(Closed::Expired) => Err(Rejection::new(
                    Reason::ExpiredRequest,
                    format!("request {id} expired"),
                )),
                None => Err(Rejection::new(
                    Reason::UnknownRequest,
                    format!(
                        "no request {id} is on the requests topic as read (or it is too old to remember)"
                    ),
                )),
            };
        };
        if timestamp_ms > f.request.expires_at_ms {
            return Err(Rejection::new(
                Reason::ExpiredRequest,
                format!(
                    "label timestamp {timestamp_ms} ms is after the request's expiry {} ms",
                    f.request.expires_at_ms
                ),
            ));
        }
        if f.annotators.iter().any(|a| a == annotator) {
            return Err(Rejection::new(
                Reason::DuplicateLabel,
                if annotator.is_empty() {
                    format!("request {id} already has an anonymous label")
                } else {
                    format!("annotator {annotator:?} already labelled request {id}")
                },
            ));
        }
        Ok(f)
    }

    /// Records an applied label of a joined request; returns whether the request is now closed.
    pub fn record_label(&mut self, id: &str, annotator: String) -> bool {
        let Some(f) = self.in_flight.get_mut(id) else {
            return false;
        };
        f.annotators.push(annotator);
        f.labels_received += 1;
        let closed = f.labels_received >= f.request.labels_wanted;
        if closed {
            self.remove(id);
            self.closed.insert(id.to_string(), Closed::Labelled);
        }
        closed
    }

    /// The in-flight requests a checkpoint keeps: delivered ones (other instances' always are) and ones
    /// with a label. A request whose delivery is not confirmed could never reach an annotator if the
    /// process died now; restoring it would hold in-flight budget until it expired. If it is delivered
    /// after all, it lands after the checkpoint's read positions (it was not read back yet, or it would be
    /// marked delivered) and is read again after the restart.
    pub fn checkpoint_in_flight(&self) -> Vec<InFlightState> {
        self.in_flight
            .values()
            .filter(|f| f.delivered || f.labels_received > 0)
            .map(|f| InFlightState {
                request_json: serde_json::to_string(&f.request).expect("serialisable"),
                labels_received: f.labels_received,
                annotators: f.annotators.clone(),
            })
            .collect()
    }

    /// Closed ids, oldest first.
    pub fn checkpoint_closed(&self) -> Vec<(String, Closed)> {
        self.closed
            .order
            .iter()
            .filter_map(|id| self.closed.get(id).map(|w| (id.clone(), w)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::messages::{RequestSide, REQUEST_SCHEMA};

    fn request(instance: &str, seq: u64, expires_at_ms: i64, wanted: u32) -> LabelRequest {
        let side = |r: &str| RequestSide {
            prompt_id: "p".into(),
            response_id: r.into(),
            metadata: None,
            embedding_b64: String::new(),
        };
        LabelRequest {
            schema: REQUEST_SCHEMA.into(),
            request_id: crate::daemon::messages::request_id(instance, seq, "a", "b"),
            instance_id: instance.into(),
            sequence: seq,
            a: side("a"),
            b: side("b"),
            strategy: "random".into(),
            gain: 0.0,
            predicted_p: 0.5,
            model_version: 0,
            labels_wanted: wanted,
            issued_at_ms: 0,
            expires_at_ms,
        }
    }

    fn ledger_with(reqs: &[LabelRequest]) -> Ledger {
        let mut l = Ledger::new("me", 4);
        for r in reqs {
            let s = l.take_sequence();
            assert_eq!(s, r.sequence);
            l.insert(InFlight::new(r.clone(), vec![1.0], vec![], vec![], true));
        }
        l
    }

    fn applies(l: &Ledger, id: &str, who: &str, t: i64) -> bool {
        l.join(id, who, t).is_ok()
    }

    fn reason(l: &Ledger, id: &str, who: &str, t: i64) -> Reason {
        l.join(id, who, t).unwrap_err().reason
    }

    #[test]
    fn join_applies_once_per_annotator_and_closes_after_the_wanted_labels() {
        let r = request("me", 0, 1000, 2);
        let mut l = ledger_with(std::slice::from_ref(&r));
        let id = &r.request_id;
        assert!(applies(&l, id, "ann-1", 10));
        assert!(!l.record_label(id, "ann-1".into()));
        assert_eq!(reason(&l, id, "ann-1", 11), Reason::DuplicateLabel);
        assert!(applies(&l, id, "", 12));
        assert!(l.record_label(id, String::new()));
        assert_eq!(reason(&l, id, "ann-3", 13), Reason::DuplicateLabel);
        assert_eq!(l.active(), 0);
        // A request nobody has read is unknown, whoever's id it carries.
        for unknown in [request("you", 7, 1000, 1), request("me", 9, 1000, 1)] {
            assert_eq!(
                reason(&l, &unknown.request_id, "", 0),
                Reason::UnknownRequest
            );
        }
    }

    #[test]
    fn other_instances_requests_take_labels_and_condition_selection_but_not_the_budget() {
        let mine = request("me", 0, 1000, 1);
        let mut l = ledger_with(std::slice::from_ref(&mine));
        let mut theirs = request("you", 7, 2000, 1);
        theirs.a.response_id = "c".into();
        theirs.request_id = crate::daemon::messages::request_id("you", 7, "c", "b");
        assert!(l.wants(&theirs));
        assert_eq!(
            l.next_sequence(),
            1,
            "another instance's sequence is not ours"
        );
        l.insert(InFlight::new(
            theirs.clone(),
            vec![2.0],
            vec![],
            vec![],
            true,
        ));
        assert_eq!((l.active(), l.open_all()), (1, 2));
        assert_eq!(l.open_vectors().len(), 2);
        assert!(l.pair_open(("p", "b"), ("p", "c")), "either order");
        assert!(l.pair_open(("p", "a"), ("p", "b")));
        assert!(!l.pair_open(("p", "a"), ("p", "c")));
        assert!(
            !l.pair_open(("q", "a"), ("p", "b")),
            "prompt is part of the identity"
        );
        assert!(applies(&l, &theirs.request_id, "ann", 10));
        assert!(l.record_label(&theirs.request_id, "ann".into()));
        assert!(
            !l.pair_open(("p", "b"), ("p", "c")),
            "closed pairs are free again"
        );
        assert!(!l.wants(&theirs), "closed");
        // A lapsed request of another instance never counts against our budget.
        let e = l.expire(1000, 0);
        assert_eq!(e.lapsed.len(), 1);
        assert!(e.lapsed[0].own);
    }

    #[test]
    fn expiry_follows_the_label_timestamp_and_forgetting_follows_the_labels_read() {
        let r = request("me", 0, 1000, 1);
        let mut l = ledger_with(std::slice::from_ref(&r));
        let id = &r.request_id;
        assert_eq!(reason(&l, id, "", 1001), Reason::ExpiredRequest);
        let e = l.expire(1000, 500);
        assert_eq!((e.lapsed.len(), e.forgotten), (1, 0));
        assert_eq!(l.active(), 0);
        // A day later by the wall clock, but the labels topic was never read to its end: still joinable.
        let e = l.expire(86_400_000, 500);
        assert_eq!((e.lapsed.len(), e.forgotten), (0, 0));
        assert!(applies(&l, id, "", 999));
        l.on_labels_caught_up(1499);
        assert_eq!(l.expire(86_400_000, 500).forgotten, 0);
        l.on_labels_caught_up(1200); // an older mark does not move it back
        l.on_labels_caught_up(1500);
        assert_eq!(l.expire(86_400_000, 500).forgotten, 1);
        assert_eq!(reason(&l, id, "", 999), Reason::ExpiredRequest);
        assert_eq!(l.checkpoint_closed(), [(id.clone(), Closed::Expired)]);
    }

    #[test]
    fn reading_requests_skips_known_and_closed_ones_and_advances_our_sequence() {
        let r0 = request("me", 0, 1000, 1);
        let mut l = Ledger::new("me", 4);
        l.take_sequence();
        l.insert(InFlight::new(r0.clone(), vec![1.0], vec![], vec![], false));
        assert!(!l.wants(&r0), "known");
        assert_eq!(l.checkpoint_in_flight().len(), 1, "read back: delivered");
        assert!(l.wants(&request("you", 50, 1000, 1)), "another instance's");
        assert_eq!(l.next_sequence(), 1);
        let r5 = request("me", 5, 1000, 1);
        assert!(l.wants(&r5));
        assert_eq!(l.next_sequence(), 6);
        l.insert(InFlight::new(r5.clone(), vec![1.0], vec![], vec![], true));
        assert!(l.record_label(&r5.request_id, String::new()));
        assert!(!l.wants(&r5), "closed");
    }

    #[test]
    fn checkpoints_keep_delivered_or_labelled_requests_and_a_bounded_closed_history() {
        let mut l = Ledger::new("me", 2);
        let reqs: Vec<LabelRequest> = (0..4).map(|s| request("me", s, 1000, 2)).collect();
        for (i, r) in reqs.iter().enumerate() {
            l.take_sequence();
            l.insert(InFlight::new(r.clone(), vec![1.0], vec![], vec![], i == 0));
        }
        l.record_label(&reqs[1].request_id, "x".into());
        let kept: Vec<String> = l
            .checkpoint_in_flight()
            .iter()
            .map(|s| {
                serde_json::from_str::<LabelRequest>(&s.request_json)
                    .unwrap()
                    .request_id
            })
            .collect();
        assert_eq!(
            kept,
            [reqs[0].request_id.clone(), reqs[1].request_id.clone()]
        );
        l.on_requests_delivered([reqs[2].request_id.clone()]);
        assert_eq!(l.checkpoint_in_flight().len(), 3);
        for r in &reqs {
            l.record_label(&r.request_id, "y".into());
            l.record_label(&r.request_id, "z".into());
        }
        let closed: Vec<String> = l
            .checkpoint_closed()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(
            closed,
            [reqs[2].request_id.clone(), reqs[3].request_id.clone()]
        );
    }
}
