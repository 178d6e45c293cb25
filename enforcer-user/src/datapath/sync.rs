//! Diffs a [`MapPlan`] against what the maps hold and applies the difference.

use std::collections::BTreeMap;

use aya::maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData};
use enforcer_common::{tc_flags, CgroupScope, PolicyKey, Redirect, ScopeName, TcConfig};

use super::MapPlan;

/// Value stored for an allow entry; the key is what matters.
const ALLOWED: u32 = 1;

pub struct Maps {
    pub cgroups: HashMap<MapData, u64, CgroupScope>,
    pub exact: HashMap<MapData, PolicyKey, u32>,
    pub cidr: LpmTrie<MapData, PolicyKey, u32>,
    pub scope_names: HashMap<MapData, ScopeName, u32>,
    pub pods: HashMap<MapData, [u8; 16], CgroupScope>,
    pub trees: HashMap<MapData, u64, CgroupScope>,
    pub tc_config: Array<MapData, TcConfig>,
    pub redirects: HashMap<MapData, PolicyKey, Redirect>,
}

/// What one apply did. Errors leave the affected entries out: less is allowed, never more.
#[derive(Debug, Default)]
pub struct ApplyReport {
    pub added: usize,
    pub removed: usize,
    pub errors: Vec<ApplyError>,
}

/// What an apply could not do. An entry not added stays out (refused); one not removed stays
/// in the plan's record of what the maps hold, and the next apply tries again.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{action} {what}: {source}")]
    Write {
        /// The map, as metrics name it.
        map: &'static str,
        action: &'static str,
        what: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("bumping the policy generation: {0}")]
    Generation(aya::maps::MapError),
    #[error("scope {0} has no id (the scope-name map is full, see --max-scopes): its workloads are refused everything")]
    NoScopeId(String),
}

impl ApplyError {
    /// The metric's labels: the map, and the cause (`full`, `failed`).
    pub fn labels(&self) -> (&'static str, &'static str) {
        match self {
            Self::Write { map, source, .. } if is_full(source) => (map, "full"),
            Self::Write { map, .. } => (map, "failed"),
            Self::Generation(_) => ("tc_config", "failed"),
            Self::NoScopeId(_) => ("scope_names", "full"),
        }
    }
}

/// A hash map at its capacity says E2BIG; an LPM trie, ENOSPC.
fn is_full(err: &aya::maps::MapError) -> bool {
    matches!(err, aya::maps::MapError::SyscallError(e)
        if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)))
}

fn write_error(
    map: &'static str,
    action: &'static str,
    what: String,
) -> impl FnOnce(aya::maps::MapError) -> ApplyError {
    move |source| ApplyError::Write {
        map,
        action,
        what,
        source,
    }
}

impl Maps {
    pub fn read_current(&self) -> MapPlan {
        MapPlan {
            cgroups: self.cgroups.iter().filter_map(Result::ok).collect(),
            pods: self.pods.iter().filter_map(Result::ok).collect(),
            trees: self.trees.iter().filter_map(Result::ok).collect(),
            exact: self.exact.keys().filter_map(Result::ok).collect(),
            cidr: self
                .cidr
                .keys()
                .filter_map(Result::ok)
                .map(|k| (k.prefix_len(), k.data()))
                .collect(),
            redirects: self.redirects.iter().filter_map(Result::ok).collect(),
        }
    }

    pub fn read_scope_ids(&self) -> BTreeMap<String, u32> {
        self.scope_names
            .iter()
            .filter_map(Result::ok)
            .map(|(k, id)| {
                let end = k.name.iter().position(|&b| b == 0).unwrap_or(k.name.len());
                (String::from_utf8_lossy(&k.name[..end]).into_owned(), id)
            })
            .collect()
    }

    pub fn insert_scope_name(&mut self, ns: &str, id: u32) -> anyhow::Result<()> {
        self.scope_names.insert(scope_key(ns)?, id, 0)?;
        Ok(())
    }

    pub fn remove_scope_name(&mut self, ns: &str) -> anyhow::Result<()> {
        self.scope_names.remove(&scope_key(ns)?)?;
        Ok(())
    }

    pub fn apply(&mut self, applied: &mut MapPlan, plan: &MapPlan) -> ApplyReport {
        let mut report = ApplyReport::default();

        let new: Vec<PolicyKey> = plan.exact.difference(&applied.exact).copied().collect();
        for key in &new {
            match self.exact.insert(*key, ALLOWED, 0) {
                Ok(()) => {
                    applied.exact.insert(*key);
                    report.added += 1;
                }
                Err(err) => report.errors.push(write_error(
                    "allow_exact",
                    "adding",
                    format!("an allow entry for scope {}", key.scope),
                )(err)),
            }
        }
        let new: Vec<(u32, PolicyKey)> = plan.cidr.difference(&applied.cidr).copied().collect();
        for entry in &new {
            match self.cidr.insert(&Key::new(entry.0, entry.1), ALLOWED, 0) {
                Ok(()) => {
                    applied.cidr.insert(*entry);
                    report.added += 1;
                }
                Err(err) => report.errors.push(write_error(
                    "allow_cidr",
                    "adding",
                    format!("a CIDR entry for scope {}", entry.1.scope),
                )(err)),
            }
        }
        self.sync_redirects(applied, plan, &mut report);
        // Assignments go in after the rules they point at, and stale ones out before the rules.
        sync_scopes(
            &mut self.cgroups,
            &mut applied.cgroups,
            &plan.cgroups,
            &mut report,
            ("cgroups", "cgroup"),
        );
        sync_scopes(
            &mut self.trees,
            &mut applied.trees,
            &plan.trees,
            &mut report,
            ("cgroup_trees", "cgroup tree"),
        );
        sync_scopes(
            &mut self.pods,
            &mut applied.pods,
            &plan.pods,
            &mut report,
            ("pod_scopes", "pod address"),
        );
        let stale: Vec<PolicyKey> = applied.exact.difference(&plan.exact).copied().collect();
        for key in stale {
            match self.exact.remove(&key) {
                Ok(()) => {
                    applied.exact.remove(&key);
                    report.removed += 1;
                }
                Err(err) => report.errors.push(write_error(
                    "allow_exact",
                    "removing",
                    format!("an allow entry for scope {}", key.scope),
                )(err)),
            }
        }
        let stale: Vec<(u32, PolicyKey)> = applied.cidr.difference(&plan.cidr).copied().collect();
        for entry in stale {
            match self.cidr.remove(&Key::new(entry.0, entry.1)) {
                Ok(()) => {
                    applied.cidr.remove(&entry);
                    report.removed += 1;
                }
                Err(err) => report.errors.push(write_error(
                    "allow_cidr",
                    "removing",
                    format!("a CIDR entry for scope {}", entry.1.scope),
                )(err)),
            }
        }
        // Cached TC verdicts were decided under the old maps. The hooks look for redirects
        // only while there are some.
        let want = if applied.redirects.is_empty() {
            0
        } else {
            tc_flags::REDIRECTS
        };
        let flags = self.tc_config.get(&0, 0).unwrap_or_default().flags;
        if report.added + report.removed > 0 || flags & tc_flags::REDIRECTS != want {
            let set = |c: &mut TcConfig| c.flags = (c.flags & !tc_flags::REDIRECTS) | want;
            if let Err(err) = self.update_tc_config(set) {
                report.errors.push(ApplyError::Generation(err));
            }
        }
        report
    }

    /// Redirects are replaced whole: a changed target list is a new value for the same key.
    fn sync_redirects(&mut self, applied: &mut MapPlan, plan: &MapPlan, report: &mut ApplyReport) {
        for (key, value) in &plan.redirects {
            if applied.redirects.get(key) == Some(value) {
                continue;
            }
            match self.redirects.insert(key, value, 0) {
                Ok(()) => {
                    applied.redirects.insert(*key, *value);
                    report.added += 1;
                }
                Err(err) => report.errors.push(write_error(
                    "redirects",
                    "adding",
                    format!("a gateway redirect for scope {}", key.scope),
                )(err)),
            }
        }
        let stale: Vec<PolicyKey> = applied
            .redirects
            .keys()
            .filter(|k| !plan.redirects.contains_key(*k))
            .copied()
            .collect();
        for key in stale {
            match self.redirects.remove(&key) {
                Ok(()) => {
                    applied.redirects.remove(&key);
                    report.removed += 1;
                }
                Err(err) => report.errors.push(write_error(
                    "redirects",
                    "removing",
                    format!("a gateway redirect for scope {}", key.scope),
                )(err)),
            }
        }
    }

    pub fn set_flags(&mut self, flags: u32) -> anyhow::Result<()> {
        Ok(self.update_tc_config(|c| c.flags = flags)?)
    }

    /// Changes the TC config and bumps the policy generation, so cached verdicts are redone.
    fn update_tc_config(
        &mut self,
        change: impl FnOnce(&mut TcConfig),
    ) -> Result<(), aya::maps::MapError> {
        let mut config = self.tc_config.get(&0, 0).unwrap_or_default();
        change(&mut config);
        config.generation = config.generation.wrapping_add(1);
        self.tc_config.set(0, config, 0)
    }
}

fn scope_key(ns: &str) -> anyhow::Result<ScopeName> {
    let mut key = ScopeName { name: [0; 64] };
    anyhow::ensure!(ns.len() < key.name.len(), "scope name {ns:?} is too long");
    key.name[..ns.len()].copy_from_slice(ns.as_bytes());
    Ok(key)
}

/// Makes a key -> scope map hold exactly `want`. Removing an entry that is already gone (a cgroup
/// that was deleted) is not an error.
fn sync_scopes<K: aya::Pod + Ord + std::fmt::Debug>(
    map: &mut HashMap<MapData, K, CgroupScope>,
    applied: &mut BTreeMap<K, CgroupScope>,
    want: &BTreeMap<K, CgroupScope>,
    report: &mut ApplyReport,
    (map_label, what): (&'static str, &str),
) {
    for (key, scope) in want {
        if applied.get(key) == Some(scope) {
            continue;
        }
        match map.insert(key, scope, 0) {
            Ok(()) => {
                applied.insert(*key, *scope);
                report.added += 1;
            }
            Err(err) => {
                report
                    .errors
                    .push(write_error(map_label, "mapping", format!("{what} {key:?}"))(err));
            }
        }
    }
    let stale: Vec<K> = applied
        .keys()
        .filter(|k| !want.contains_key(*k))
        .copied()
        .collect();
    for key in stale {
        match map.remove(&key) {
            Ok(()) => {}
            Err(err) if is_not_found(&err) => {}
            // Kept in `applied`, so the next apply tries again.
            Err(err) => {
                report.errors.push(write_error(
                    map_label,
                    "unmapping",
                    format!("{what} {key:?}"),
                )(err));
                continue;
            }
        }
        applied.remove(&key);
        report.removed += 1;
    }
}

/// An entry that is already gone (a deleted cgroup's) needs no removal.
fn is_not_found(err: &aya::maps::MapError) -> bool {
    match err {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syscall(errno: i32) -> aya::maps::MapError {
        aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_update_elem",
            io_error: std::io::Error::from_raw_os_error(errno),
        })
    }

    #[test]
    fn apply_errors_name_the_map_and_whether_it_was_full() {
        let add = |map, errno| write_error(map, "adding", "an entry".into())(syscall(errno));
        assert_eq!(
            add("allow_exact", libc::E2BIG).labels(),
            ("allow_exact", "full")
        );
        assert_eq!(
            add("allow_cidr", libc::ENOSPC).labels(),
            ("allow_cidr", "full")
        );
        assert_eq!(
            add("redirects", libc::EPERM).labels(),
            ("redirects", "failed")
        );
        assert_eq!(
            ApplyError::NoScopeId("shop".into()).labels(),
            ("scope_names", "full")
        );
        let text = add("allow_exact", libc::E2BIG).to_string();
        assert!(text.starts_with("adding an entry: "), "{text}");
    }
}
