//! The derived-state mutations that are in the log but not yet in the
//! state tree, as the vault's overlay holds them (`vault::Overlay`).
//!
//! The committer's writer inserts every group's mutations, and every read
//! of derived state looks here first, under the overlay's one lock; the
//! indexer takes the map whole every few seconds. A single hash map grows
//! by doubling, and moves every key it holds when it does: with the lock
//! held, so that each append and each read waits for it. At 2,000
//! redemptions/s a map of about 16,000 keys took 8 ms to double, on the
//! writer's thread, and every redemption in flight waited
//! (docs/benchmarks.md, "The overlay's map grown in shards").
//!
//! So the keys are spread over [`SHARDS`] maps by a keyed hash of their
//! bytes, and a doubling moves the keys of one shard only. And the maps
//! that replace those the indexer takes start with room for as many keys
//! as their predecessors held ([`Mutations::sized_like`], at most
//! [`PRESIZE_MAX`] per shard), so that a steady load grows none of them.
//!
//! Invariant: a key is in exactly one shard, the one its hash names; so
//! `get` after `insert` of the same key finds it, and `iter` yields each
//! key once.

use std::collections::hash_map::{Entry, RandomState};
use std::collections::HashMap;
use std::hash::BuildHasher;

/// Maps the keys are spread over.
pub(crate) const SHARDS: usize = 16;

/// Keys a shard is sized for at most when it replaces one the indexer
/// took: a burst of appends must not leave a large table allocated for as
/// long as the vault stays quiet.
pub(crate) const PRESIZE_MAX: usize = 1 << 16;

/// What a group did to a derived-state key: the group's last seq, and the
/// value it set or `None` when it removed the key.
pub(crate) type Mutation = (u64, Option<Vec<u8>>);

/// Derived-state keys → their latest [`Mutation`], in [`SHARDS`] maps.
#[derive(Debug)]
pub(crate) struct Mutations {
    /// Chooses a key's shard; keyed per process, as std's maps are, so
    /// that no choice of keys piles them into one shard on purpose.
    router: RandomState,
    shards: Vec<HashMap<Vec<u8>, Mutation>>,
}

impl Default for Mutations {
    fn default() -> Self {
        Mutations {
            router: RandomState::new(),
            shards: (0..SHARDS).map(|_| HashMap::new()).collect(),
        }
    }
}

impl Mutations {
    /// An empty set whose shards have room for as many keys as this one's
    /// hold (each at most [`PRESIZE_MAX`]), with the same routing.
    pub(crate) fn sized_like(&self) -> Mutations {
        Mutations {
            router: self.router.clone(),
            shards: self
                .shards
                .iter()
                .map(|s| HashMap::with_capacity(s.len().min(PRESIZE_MAX)))
                .collect(),
        }
    }

    fn shard(&self, key: &[u8]) -> usize {
        // The low bits of a 64-bit SipHash: uniform for any number of shards.
        (self.router.hash_one(key) % SHARDS as u64) as usize
    }

    /// The latest mutation of `key`, if this set holds one.
    pub(crate) fn get(&self, key: &[u8]) -> Option<&Mutation> {
        self.shards.get(self.shard(key))?.get(key)
    }

    /// Sets `key`'s latest mutation, replacing the one it had.
    pub(crate) fn insert(&mut self, key: Vec<u8>, m: Mutation) {
        let i = self.shard(&key);
        if let Some(s) = self.shards.get_mut(i) {
            s.insert(key, m);
        }
    }

    /// Sets `key`'s mutation only if this set holds none for it (merging
    /// an older set into a newer one).
    pub(crate) fn insert_if_absent(&mut self, key: &[u8], m: &Mutation) {
        let i = self.shard(key);
        if let Some(s) = self.shards.get_mut(i) {
            if let Entry::Vacant(e) = s.entry(key.to_vec()) {
                e.insert(m.clone());
            }
        }
    }

    /// Keys held.
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum()
    }

    /// Every key with its mutation, each once, shard by shard (the same
    /// order every time for an unchanged set).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Vec<u8>, &Mutation)> {
        self.shards.iter().flat_map(HashMap::iter)
    }

    #[cfg(test)]
    fn capacities(&self) -> Vec<usize> {
        self.shards.iter().map(HashMap::capacity).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> Vec<u8> {
        format!("token/{i:08x}").into_bytes()
    }

    #[test]
    fn a_key_is_found_where_it_was_put_and_replaced_in_place() {
        let mut m = Mutations::default();
        for i in 0..1000 {
            m.insert(key(i), (u64::from(i), Some(vec![1])));
        }
        for i in 0..1000 {
            m.insert(key(i), (u64::from(i) + 1000, None));
        }
        assert_eq!(m.len(), 1000);
        for i in 0..1000 {
            assert_eq!(m.get(&key(i)), Some(&(u64::from(i) + 1000, None)));
        }
        assert_eq!(m.get(b"token/absent"), None);
        assert_eq!(m.get(b""), None);
        let mut seen: Vec<Vec<u8>> = m.iter().map(|(k, _)| k.clone()).collect();
        seen.sort();
        let mut all: Vec<Vec<u8>> = (0..1000).map(key).collect();
        all.sort();
        assert_eq!(seen, all, "each key once");
    }

    #[test]
    fn the_keys_are_spread_over_every_shard() {
        let mut m = Mutations::default();
        for i in 0..(SHARDS as u32 * 256) {
            m.insert(key(i), (0, None));
        }
        for (i, s) in m.shards.iter().enumerate() {
            // 256 expected in each; a keyed hash puts at least half that
            // in each shard with overwhelming probability.
            assert!(s.len() > 128, "shard {i} holds {} keys", s.len());
        }
    }

    #[test]
    fn an_older_mutation_fills_only_the_keys_the_newer_set_lacks() {
        let mut newer = Mutations::default();
        newer.insert(b"a".to_vec(), (9, Some(b"new".to_vec())));
        newer.insert_if_absent(b"a", &(3, Some(b"old".to_vec())));
        newer.insert_if_absent(b"b", &(4, None));
        assert_eq!(newer.get(b"a"), Some(&(9, Some(b"new".to_vec()))));
        assert_eq!(newer.get(b"b"), Some(&(4, None)));
        assert_eq!(newer.len(), 2);
    }

    #[test]
    fn a_replacement_has_room_for_its_predecessors_keys_and_routes_alike() {
        let mut old = Mutations::default();
        for i in 0..5000 {
            old.insert(key(i), (0, None));
        }
        let mut next = old.sized_like();
        assert_eq!(next.len(), 0);
        let before = next.capacities();
        for (c, s) in before.iter().zip(&old.shards) {
            assert!(*c >= s.len());
        }
        // The same keys again: no shard grows.
        for i in 0..5000 {
            next.insert(key(i), (1, None));
        }
        assert_eq!(next.capacities(), before);
        // The same routing: each key lands in the shard it had.
        for (a, b) in old.shards.iter().zip(&next.shards) {
            assert_eq!(a.len(), b.len());
        }
    }

    #[test]
    fn a_replacement_is_sized_at_most_presize_max_per_shard() {
        let mut old = Mutations::default();
        for i in 0..(PRESIZE_MAX as u32 + 10) {
            // All in shard 0's count would need a crafted hash; one shard
            // over the bound is enough to check the cap.
            old.shards[0].insert(key(i), (0, None));
        }
        let next = old.sized_like();
        let caps = next.capacities();
        // hashbrown rounds a capacity up to its next bucket count's load.
        assert!(caps[0] >= PRESIZE_MAX && caps[0] < 2 * PRESIZE_MAX);
        assert!(caps[1..].iter().all(|c| *c == 0));
    }
}
