//! Per-connection state of a tap output (a pcap flow, a log's offsets), kept from a connection's
//! first record to its Close record.
//!
//! A Close record can be dropped like any other when the tap queue is full (a slow disk under
//! connection churn), and then nothing would ever remove the state of its connection: the
//! writer's memory would grow for as long as the proxy runs. So the map holds at most
//! [`MAX_TRACKED`] connections, or twice `max_connections` if that is more (see
//! [`track_at_least`]); past that, it forgets the half it has heard of least recently. The proxy
//! holds no more than `max_connections` at once, so those forgotten are, all but certainly,
//! connections whose Close was lost. One still open would be shown as new at its next record.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A map keyed by connection id. The ids are the proxy's own sequence numbers, not chosen by a
/// peer, so a multiplication spreads them well enough, at a fraction of SipHash's cost: the
/// writer looks one up for every record.
pub(crate) type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// Hashes one `u64` by a multiplication with an odd constant (Fibonacci hashing). The table
/// takes a bucket from the low bits, which the multiplication maps one to one for ids that
/// differ only there (consecutive ids land in distinct buckets), and a tag from the top bits,
/// which depend on every bit of the id.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = (self.0 ^ id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Connections tracked at most by one output of one tap, unless [`track_at_least`] asks more.
pub(crate) const MAX_TRACKED: usize = 1 << 17;

/// The limit of maps made from now on, at least [`MAX_TRACKED`].
static LIMIT: AtomicUsize = AtomicUsize::new(MAX_TRACKED);

/// Makes the maps made from now on hold at least `n` connections: the proxy sets twice its
/// `max_connections` at startup (the global limit changes only at a restart), so that live
/// connections are never the ones forgotten.
pub(crate) fn track_at_least(n: usize) {
    LIMIT.fetch_max(n, Ordering::Relaxed);
}

/// A map from connection id to state that forgets the connections heard of least recently once
/// it holds more than its limit.
pub(crate) struct Tracked<V> {
    map: IdMap<(u64, V)>,
    /// Stamp of the next access: larger is more recent.
    tick: u64,
    limit: usize,
    /// Connections forgotten so far.
    forgotten: u64,
}

impl<V> Tracked<V> {
    pub(crate) fn new() -> Tracked<V> {
        Tracked::with_limit(LIMIT.load(Ordering::Relaxed))
    }

    pub(crate) fn with_limit(limit: usize) -> Tracked<V> {
        Tracked {
            map: IdMap::default(),
            tick: 0,
            limit: limit.max(2),
            forgotten: 0,
        }
    }

    fn stamp(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    pub(crate) fn get(&self, id: u64) -> Option<&V> {
        self.map.get(&id).map(|(_, v)| v)
    }

    pub(crate) fn get_mut(&mut self, id: u64) -> Option<&mut V> {
        let now = self.stamp();
        self.map.get_mut(&id).map(|(seen, v)| {
            *seen = now;
            v
        })
    }

    pub(crate) fn remove(&mut self, id: u64) -> Option<V> {
        self.map.remove(&id).map(|(_, v)| v)
    }

    pub(crate) fn insert(&mut self, id: u64, value: V) {
        let now = self.stamp();
        self.map.insert(id, (now, value));
        self.bound();
    }

    /// The state of `id`, made by `make` if there is none.
    pub(crate) fn get_or_insert_with(&mut self, id: u64, make: impl FnOnce() -> V) -> &mut V {
        if !self.map.contains_key(&id) {
            self.insert(id, make());
        }
        self.get_mut(id).expect("inserted above")
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Connections forgotten so far to stay within the limit.
    #[cfg(test)]
    pub(crate) fn forgotten(&self) -> u64 {
        self.forgotten
    }

    /// Past the limit, forgets the half heard of least recently (a scan per `limit / 2`
    /// insertions: constant time per insertion, on average).
    fn bound(&mut self) {
        if self.map.len() <= self.limit {
            return;
        }
        let mut seen: Vec<u64> = self.map.values().map(|(s, _)| *s).collect();
        let keep = self.limit / 2;
        let cut = seen.len() - keep;
        let (_, threshold, _) = seen.select_nth_unstable(cut);
        let threshold = *threshold;
        let before = self.map.len();
        self.map.retain(|_, (s, _)| *s >= threshold);
        let n = before - self.map.len();
        self.forgotten += n as u64;
        log::warn!(
            "tap: an output tracked more than {} connections (their close records were dropped \
             on a full tap queue): forgot the {n} heard of least recently",
            self.limit
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_its_limit_it_forgets_the_least_recently_heard_of_half() {
        let mut t = Tracked::with_limit(8);
        for id in 0..8 {
            t.insert(id, id * 10);
        }
        assert_eq!((t.len(), t.forgotten()), (8, 0));
        // Heard of again: 0 and 1 are now the most recent.
        *t.get_mut(0).unwrap() += 1;
        *t.get_or_insert_with(1, || 99) += 1;
        t.insert(8, 80);
        assert_eq!((t.len(), t.forgotten()), (4, 5));
        for id in [0, 1, 7, 8] {
            assert!(t.get(id).is_some(), "{id} was heard of recently");
        }
        assert_eq!((t.get(0), t.get(1)), (Some(&1), Some(&11)));
        assert_eq!(t.remove(8), Some(80));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn the_limit_follows_the_connections_the_proxy_may_hold() {
        track_at_least(10);
        assert_eq!(
            Tracked::<()>::new().limit,
            MAX_TRACKED,
            "never below MAX_TRACKED"
        );
        track_at_least(4 * MAX_TRACKED);
        assert_eq!(Tracked::<()>::new().limit, 4 * MAX_TRACKED);
    }

    #[test]
    fn it_never_holds_more_than_its_limit() {
        let mut t = Tracked::with_limit(100);
        for id in 0..10_000u64 {
            t.insert(id, ());
            assert!(t.len() <= 100);
        }
        assert_eq!(t.forgotten() + t.len() as u64, 10_000);
        // The most recent are kept.
        assert!(t.get(9_999).is_some() && t.get(9_950).is_some());
    }
}
