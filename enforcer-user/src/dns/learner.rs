//! What the proxy does with an answer before releasing it: writes the addresses it teaches
//! into the learned map, with their expiry, within the caps; and what it forgets again (expired
//! entries, scopes and names no longer declared).

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::IpAddr,
};

use enforcer_common::{Learned, PolicyKey};
use ipnet::IpNet;

pub use super::not_learned::{default_deny, NotLearned};
use super::{
    answer::{addresses, Answered},
    learn::{grants, LearnRule, Lifetime},
};
use crate::net::key_bytes;

const NS_PER_SEC: u64 = 1_000_000_000;

/// The name id of entries an earlier agent learned.
const UNKNOWN_NAME: u32 = 0;

/// Where learned addresses go: the kernel map, or a plain map in tests.
pub trait Store {
    fn put(&mut self, key: PolicyKey, value: Learned) -> Result<(), String>;
    fn delete(&mut self, key: &PolicyKey);
}

impl Store for aya::maps::HashMap<aya::maps::MapData, PolicyKey, Learned> {
    fn put(&mut self, key: PolicyKey, value: Learned) -> Result<(), String> {
        self.insert(key, value, 0).map_err(|e| e.to_string())
    }

    fn delete(&mut self, key: &PolicyKey) {
        let _ = self.remove(key);
    }
}

impl Store for BTreeMap<PolicyKey, Learned> {
    fn put(&mut self, key: PolicyKey, value: Learned) -> Result<(), String> {
        self.insert(key, value);
        Ok(())
    }

    fn delete(&mut self, key: &PolicyKey) {
        self.remove(key);
    }
}

/// A scope that learns: its id in the maps, its name for reports, and what it may learn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LearningScope {
    pub id: u32,
    pub name: String,
    pub rules: Vec<LearnRule>,
}

#[derive(Clone, Debug)]
pub struct Limits {
    pub life: Lifetime,
    /// Addresses per name and scope; the earliest to expire go first.
    pub max_ips: usize,
    /// Learned keys per scope: beyond it, answers that would add more are refused (SERVFAIL),
    /// so that a flood of names under a wildcard fills only its own scope's share.
    pub max_per_scope: usize,
    /// Addresses never learned, whatever a name resolves to (loopback, link-local, metadata).
    pub deny: Vec<IpNet>,
    /// How long an expired entry is kept for the flows it allowed (they keep flowing).
    pub idle_grace_ns: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LearnError {
    /// The answer was not released: the workload gets SERVFAIL.
    #[error("could not write {addr} for {name} into the learned map: {why}")]
    Write {
        name: String,
        addr: IpAddr,
        why: String,
    },
    #[error("scope {scope} holds {max} learned addresses already (--dns-max-learned-per-scope)")]
    ScopeFull { scope: String, max: usize },
}

impl LearnError {
    /// Label for metrics and the status.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Write { .. } => "write",
            Self::ScopeFull { .. } => "scope_full",
        }
    }
}

/// One learned address, as the agent remembers it for reports and caps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub scope: u32,
    pub name: String,
    pub addr: IpAddr,
    pub expires_ns: u64,
}

pub struct Learner<S> {
    store: S,
    limits: Limits,
    scopes: BTreeMap<u8, LearningScope>,
    /// Every key written, with the name it was learned for and its expiry.
    keys: BTreeMap<PolicyKey, (u32, u64)>,
    /// Name ids, both ways: the kernel holds the id.
    names: BTreeMap<String, u32>,
    name_of: BTreeMap<u32, String>,
    /// Keys per name id: a name goes with its last key, so that a flood of names under a
    /// wildcard leaves nothing behind once its entries expire.
    name_keys: BTreeMap<u32, usize>,
    /// Keys per scope id, for the scope's share without a scan.
    scope_keys: BTreeMap<u32, usize>,
    next_name: u32,
    /// Every address answers gave each learning scope, declared or not, with the name and
    /// when (bounded, oldest out first): refusals say what an address was answered for.
    seen: BTreeMap<(u32, [u8; 16]), (String, u64)>,
    seen_order: VecDeque<(u32, [u8; 16])>,
    /// Learned addresses that also answered a name the scope may not reach, logged once.
    shared_logged: BTreeSet<(u32, [u8; 16])>,
    /// Answers that taught something, and answers not released.
    pub learned_answers: u64,
    pub failures: BTreeMap<&'static str, u64>,
    pub last_failure: Option<String>,
}

impl<S: Store> Learner<S> {
    pub fn new(store: S, limits: Limits) -> Self {
        Self {
            store,
            limits,
            scopes: BTreeMap::new(),
            keys: BTreeMap::new(),
            names: BTreeMap::new(),
            name_of: BTreeMap::new(),
            name_keys: BTreeMap::new(),
            scope_keys: BTreeMap::new(),
            next_name: 1,
            seen: BTreeMap::new(),
            seen_order: VecDeque::new(),
            shared_logged: BTreeSet::new(),
            learned_answers: 0,
            failures: BTreeMap::new(),
            last_failure: None,
        }
    }

    /// Takes over what an earlier agent learned. Its names are unknown here (id 0): the
    /// entries stay until they expire, and go earlier only with their scope or port.
    pub fn adopt(&mut self, entries: impl IntoIterator<Item = (PolicyKey, Learned)>) {
        for (key, value) in entries {
            if self
                .keys
                .insert(key, (UNKNOWN_NAME, value.expires_ns))
                .is_none()
            {
                *self.scope_keys.entry(key.scope).or_default() += 1;
            }
        }
    }

    /// The scopes that learn now, by slot. Entries of scopes that went, and of names a scope no
    /// longer declares, are deleted at once: removing a ServiceEntry revokes what it taught.
    pub fn set_scopes(&mut self, scopes: BTreeMap<u8, LearningScope>) {
        self.scopes = scopes;
        let by_id: BTreeMap<u32, &LearningScope> =
            self.scopes.values().map(|s| (s.id, s)).collect();
        let gone: Vec<PolicyKey> = self
            .keys
            .iter()
            .filter(|(key, (name, _))| {
                let name = self.name_of.get(name).map(String::as_str);
                !by_id.get(&key.scope).is_some_and(|s| {
                    s.rules.iter().any(|r| {
                        name.is_none_or(|n| r.hosts.covers(n))
                            && r.ports
                                .iter()
                                .any(|&(l4, port)| l4.ip_proto() == key.proto && port == key.port)
                    })
                })
            })
            .map(|(key, _)| *key)
            .collect();
        for key in gone {
            self.forget(&key);
        }
    }

    /// Learns what `response` (the upstream's answer to a query from `slot`) teaches, at
    /// `now_ns` (`CLOCK_BOOTTIME`). Returns how many keys were written. On an error the
    /// answer must not be released.
    pub fn learn(&mut self, slot: u8, response: &[u8], now_ns: u64) -> Result<usize, LearnError> {
        let Some(scope) = self.scopes.get(&slot).cloned() else {
            return Ok(0);
        };
        // An answer that does not parse teaches nothing; it is relayed as it came.
        let answers: Vec<Answered> = addresses(response)
            .unwrap_or_default()
            .into_iter()
            .filter(|a| !self.limits.deny.iter().any(|net| net.contains(&a.addr)))
            .collect();
        self.note_seen(&scope, &answers, now_ns);
        let now = now_ns / NS_PER_SEC;
        let granted = grants(
            &scope.rules,
            &answers,
            now,
            &self.limits.life,
            self.limits.max_ips,
        );
        if granted.is_empty() {
            return Ok(0);
        }
        let result = self.write(&scope, &granted, now_ns);
        match &result {
            Ok(_) => self.learned_answers += 1,
            Err(err) => {
                *self.failures.entry(err.kind()).or_default() += 1;
                self.last_failure = Some(err.to_string());
            }
        }
        result
    }

    fn write(
        &mut self,
        scope: &LearningScope,
        granted: &[super::learn::Grant],
        now_ns: u64,
    ) -> Result<usize, LearnError> {
        let new_keys = granted
            .iter()
            .filter(|g| !self.keys.contains_key(&key_of(scope.id, &g.rule)))
            .count();
        let held = |l: &Self| l.scope_keys.get(&scope.id).copied().unwrap_or(0);
        if new_keys > 0 && held(self) + new_keys > self.limits.max_per_scope {
            // Expired entries make room first; only then is the share spent.
            self.expire_scope(scope.id, now_ns);
            if held(self) + new_keys > self.limits.max_per_scope {
                return Err(LearnError::ScopeFull {
                    scope: scope.name.clone(),
                    max: self.limits.max_per_scope,
                });
            }
        }
        let mut written = 0;
        let mut names = BTreeSet::new();
        for g in granted {
            let key = key_of(scope.id, &g.rule);
            let expires_ns = g.expires.saturating_mul(NS_PER_SEC);
            // A fresh answer extends; an older one never shortens.
            if matches!(self.keys.get(&key), Some(&(_, old)) if old >= expires_ns) {
                continue;
            }
            let name_id = self.name_id(&g.name);
            let value = Learned {
                expires_ns,
                name_id,
                pad: 0,
            };
            if let Err(why) = self.store.put(key, value) {
                self.drop_if_unused(name_id);
                return Err(LearnError::Write {
                    name: g.name.clone(),
                    addr: g.rule.net.addr(),
                    why,
                });
            }
            self.remember(key, name_id, expires_ns);
            names.insert(name_id);
            written += 1;
        }
        for name in names {
            self.cap_name(scope.id, name);
        }
        Ok(written)
    }

    /// Remembers what the answer gave, and says once when an address the scope learns also
    /// answers a name it may not reach: enforcement is by address, so either name reaches it.
    fn note_seen(&mut self, scope: &LearningScope, answers: &[Answered], now_ns: u64) {
        for a in answers {
            let key = (scope.id, key_bytes(a.addr));
            let declared = scope.rules.iter().any(|r| r.hosts.covers(&a.name));
            if let Some((other, _)) = self.seen.get(&key) {
                let other_declared = scope.rules.iter().any(|r| r.hosts.covers(other));
                if self.shared_logged.len() >= SEEN_CAPACITY {
                    self.shared_logged.clear();
                }
                if other != &a.name && declared != other_declared && self.shared_logged.insert(key)
                {
                    let (allowed, also) = if declared {
                        (&a.name, other)
                    } else {
                        (other, &a.name)
                    };
                    log::warn!(
                        "dns-shared-address: scope {}: {} is learned for {allowed} and also answers {also}, which no visible ServiceEntry declares; enforcement is by address, so a connection there is allowed whatever name it is for",
                        scope.name,
                        a.addr
                    );
                }
                // A declared name is the more useful one to report.
                if other_declared && !declared {
                    continue;
                }
            }
            if self.seen.insert(key, (a.name.clone(), now_ns)).is_none() {
                self.seen_order.push_back(key);
            }
            while self.seen_order.len() > SEEN_CAPACITY {
                if let Some(old) = self.seen_order.pop_front() {
                    self.seen.remove(&old);
                }
            }
        }
    }

    /// Why learning does not allow `key` now, for a refusal's record; `None` when the scope
    /// does not learn.
    pub fn why_refused(&self, key: &PolicyKey, now_ns: u64) -> Option<NotLearned> {
        self.scopes.values().find(|s| s.id == key.scope)?;
        let name = |id: &u32| {
            self.name_of
                .get(id)
                .cloned()
                .unwrap_or_else(|| "a name an earlier agent learned".to_string())
        };
        if let Some((id, expires)) = self.keys.get(key) {
            if *expires <= now_ns {
                return Some(NotLearned::Expired {
                    name: name(id),
                    ago_s: (now_ns - expires) / NS_PER_SEC,
                });
            }
        }
        if let Some((n, _)) = self
            .keys
            .iter()
            .find(|(k, _)| k.scope == key.scope && k.addr == key.addr)
            .map(|(_, v)| v)
        {
            return Some(NotLearned::OtherPort { name: name(n) });
        }
        if let Some((name, _)) = self.seen.get(&(key.scope, key.addr)) {
            return Some(NotLearned::Undeclared { name: name.clone() });
        }
        if let Some((k, (n, _))) = self.keys.iter().find(|(k, _)| k.addr == key.addr) {
            let scope = self
                .scope_name(k.scope)
                .unwrap_or("another scope")
                .to_string();
            return Some(NotLearned::OtherScope {
                name: name(n),
                scope,
            });
        }
        Some(NotLearned::NeverAnswered)
    }

    /// Keeps at most `max_ips` addresses of one name in one scope: the latest to expire.
    fn cap_name(&mut self, scope: u32, name: u32) {
        // Each address holds at least one key: under the cap in keys, under it in addresses.
        if self.name_keys.get(&name).copied().unwrap_or(0) <= self.limits.max_ips {
            return;
        }
        let mut by_addr: BTreeMap<[u8; 16], u64> = BTreeMap::new();
        for (key, &(n, expires)) in self.keys.range(scope_range(scope)) {
            if n == name {
                let e = by_addr.entry(key.addr).or_default();
                *e = (*e).max(expires);
            }
        }
        if by_addr.len() <= self.limits.max_ips {
            return;
        }
        let mut order: Vec<([u8; 16], u64)> = by_addr.into_iter().collect();
        order.sort_by_key(|&(_, expires)| expires);
        let drop: BTreeSet<[u8; 16]> = order[..order.len() - self.limits.max_ips]
            .iter()
            .map(|(a, _)| *a)
            .collect();
        let gone: Vec<PolicyKey> = self
            .keys
            .iter()
            .filter(|(k, (n, _))| k.scope == scope && *n == name && drop.contains(&k.addr))
            .map(|(k, _)| *k)
            .collect();
        for key in gone {
            self.forget(&key);
        }
    }

    /// Deletes entries past their expiry and the idle grace. Returns how many went.
    pub fn expire(&mut self, now_ns: u64) -> usize {
        let limit = now_ns.saturating_sub(self.limits.idle_grace_ns);
        let gone: Vec<PolicyKey> = self
            .keys
            .iter()
            .filter(|(_, &(_, expires))| expires < limit)
            .map(|(k, _)| *k)
            .collect();
        for key in &gone {
            self.forget(key);
        }
        gone.len()
    }

    fn expire_scope(&mut self, scope: u32, now_ns: u64) {
        let gone: Vec<PolicyKey> = self
            .keys
            .range(scope_range(scope))
            .filter(|(_, &(_, expires))| expires < now_ns)
            .map(|(k, _)| *k)
            .collect();
        for key in gone {
            self.forget(&key);
        }
    }

    fn forget(&mut self, key: &PolicyKey) {
        self.store.delete(key);
        if let Some((name, _)) = self.keys.remove(key) {
            self.release_name(name);
            if let Some(n) = self.scope_keys.get_mut(&key.scope) {
                *n -= 1;
                if *n == 0 {
                    self.scope_keys.remove(&key.scope);
                }
            }
        }
    }

    /// Records a key the kernel now holds, for the name it was last learned for.
    fn remember(&mut self, key: PolicyKey, name: u32, expires_ns: u64) {
        *self.name_keys.entry(name).or_default() += 1;
        match self.keys.insert(key, (name, expires_ns)) {
            Some((old, _)) => self.release_name(old),
            None => *self.scope_keys.entry(key.scope).or_default() += 1,
        }
    }

    fn drop_if_unused(&mut self, id: u32) {
        if !self.name_keys.contains_key(&id) {
            if let Some(name) = self.name_of.remove(&id) {
                self.names.remove(&name);
            }
        }
    }

    fn release_name(&mut self, id: u32) {
        let Some(count) = self.name_keys.get_mut(&id) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            self.name_keys.remove(&id);
            if let Some(name) = self.name_of.remove(&id) {
                self.names.remove(&name);
            }
        }
    }

    fn name_id(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.names.get(name) {
            return id;
        }
        let id = self.next_name;
        self.next_name += 1;
        self.names.insert(name.to_string(), id);
        self.name_of.insert(id, name.to_string());
        id
    }

    /// What is learned now (the first `limit` addresses), for the status and `explain`.
    pub fn entries(&self, limit: usize) -> Vec<Entry> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for (key, &(name, expires_ns)) in &self.keys {
            if out.len() >= limit {
                break;
            }
            if !seen.insert((key.scope, key.addr, name)) {
                continue;
            }
            out.push(Entry {
                scope: key.scope,
                name: self.name_of.get(&name).cloned().unwrap_or_default(),
                addr: crate::net::from_key_bytes(key.addr),
                expires_ns,
            });
        }
        out
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn scope_name(&self, id: u32) -> Option<&str> {
        self.scopes
            .values()
            .find(|s| s.id == id)
            .map(|s| s.name.as_str())
    }
}

/// Addresses remembered from answers, for refusal records.
const SEEN_CAPACITY: usize = 16_384;

/// Every key of one scope (keys order by scope first).
fn scope_range(scope: u32) -> std::ops::RangeInclusive<PolicyKey> {
    let low = PolicyKey {
        scope,
        port: 0,
        proto: 0,
        pad: 0,
        addr: [0; 16],
    };
    let high = PolicyKey {
        scope,
        port: u16::MAX,
        proto: u8::MAX,
        pad: u8::MAX,
        addr: [u8::MAX; 16],
    };
    low..=high
}

fn key_of(scope: u32, rule: &crate::policy::Rule) -> PolicyKey {
    PolicyKey {
        scope,
        port: rule.port,
        proto: rule.l4.ip_proto(),
        pad: 0,
        addr: key_bytes(rule.net.addr()),
    }
}

#[cfg(test)]
#[path = "learner_tests.rs"]
mod tests;
