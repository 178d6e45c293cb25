//! Scope names to the numeric ids the kernel keys rules by, as the pinned `ENF_SCOPE_NAMES`
//! holds them. Pure: which ids to give and which to take back.
//!
//! Ids are reclaimed once no map entry uses them, so namespace churn never fills the map; and
//! running out is never fatal: a scope without an id fails closed on its own
//! (`plan::FAILED`), and is reported.

use std::collections::{BTreeMap, BTreeSet};

use enforcer_common::GLOBAL_SCOPE;

/// Longest scope name the pinned map's key holds (64 bytes, NUL-padded).
pub const MAX_NAME: usize = 63;

/// What allocation decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Allocation {
    /// New names with the lowest free ids.
    pub add: Vec<(String, u32)>,
    /// Names that got no id: the map is full, or the name is too long for its key.
    pub failed: Vec<String>,
}

/// Ids for every name in `wanted` that has none in `current`, lowest free first, within
/// `capacity` names in all. Ids never clash with [`GLOBAL_SCOPE`] or with `reserved` (ids that
/// entries still use, although their name is gone).
pub fn allocate<'a>(
    current: &BTreeMap<String, u32>,
    wanted: impl IntoIterator<Item = &'a str>,
    capacity: usize,
) -> Allocation {
    let mut taken: BTreeSet<u32> = current.values().copied().collect();
    taken.insert(GLOBAL_SCOPE);
    let mut count = current.len();
    let mut next = GLOBAL_SCOPE + 1;
    let mut out = Allocation::default();
    for name in wanted {
        if current.contains_key(name) || out.add.iter().any(|(n, _)| n == name) {
            continue;
        }
        if name.is_empty() || name.len() > MAX_NAME || count >= capacity {
            out.failed.push(name.to_string());
            continue;
        }
        while taken.contains(&next) {
            next += 1;
        }
        taken.insert(next);
        out.add.push((name.to_string(), next));
        count += 1;
    }
    out
}

/// Names that may go: not wanted, and their id used by no map entry (`in_use`). `keep` names
/// are never reclaimed (the agent's own scope).
pub fn reclaimable(
    current: &BTreeMap<String, u32>,
    wanted: &BTreeSet<&str>,
    in_use: &BTreeSet<u32>,
    keep: &[&str],
) -> Vec<String> {
    current
        .iter()
        .filter(|(name, id)| {
            !wanted.contains(name.as_str())
                && !in_use.contains(id)
                && !keep.contains(&name.as_str())
        })
        .map(|(name, _)| name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
        pairs.iter().map(|(n, i)| (n.to_string(), *i)).collect()
    }

    #[test]
    fn new_names_take_the_lowest_free_ids() {
        let current = ids(&[("a", 1), ("c", 3)]);
        let got = allocate(&current, ["a", "b", "d"], 10);
        assert_eq!(got.add, [("b".to_string(), 2), ("d".to_string(), 4)]);
        assert!(got.failed.is_empty());
    }

    #[test]
    fn a_full_map_fails_only_the_names_that_do_not_fit() {
        let current = ids(&[("a", 1), ("b", 2), ("c", 3)]);
        let got = allocate(&current, ["a", "d", "e"], 4);
        assert_eq!(got.add, [("d".to_string(), 4)]);
        assert_eq!(got.failed, ["e"]);
        let long = "x".repeat(64);
        let got = allocate(&BTreeMap::new(), [long.as_str(), "", "ok"], 10);
        assert_eq!(got.add, [("ok".to_string(), 1)]);
        assert_eq!(got.failed, [long, String::new()]);
    }

    #[test]
    fn ids_come_back_once_no_entry_uses_them() {
        let current = ids(&[("gone", 1), ("busy", 2), ("kept", 3), ("agent", 4)]);
        let wanted = BTreeSet::from(["kept"]);
        let in_use = BTreeSet::from([2]);
        assert_eq!(
            reclaimable(&current, &wanted, &in_use, &["agent"]),
            ["gone"],
            "busy still has entries; agent is always kept"
        );
        // Churn: a thousand namespaces come and go through a map of ten.
        let mut current = BTreeMap::new();
        for round in 0..1000 {
            let name = format!("ns-{round}");
            let got = allocate(&current, [name.as_str()], 10);
            assert!(got.failed.is_empty(), "round {round}");
            current.extend(got.add);
            let wanted = BTreeSet::from([name.as_str()]);
            for old in reclaimable(&current, &wanted, &BTreeSet::new(), &[]) {
                current.remove(&old);
            }
        }
        assert_eq!(current.len(), 1);
    }
}
