//! The agent's DNS proxy. The socket hooks send a learning scope's queries to
//! `prefix.slot : port_base + upstream`; here one UDP socket and one TCP listener per slot and
//! upstream, bound to exactly that address (the prefix is routed `local` on `lo`, so every
//! address in it is the node's), forward each query unchanged to its upstream, write what the
//! answer teaches into the kernel, and only then release the answer. If the write fails the
//! workload gets SERVFAIL: it never holds an address the kernel would refuse.
//!
//! Every socket is in the kernel's `DNS_SOCKS`; the hooks redirect only to sockets there, and
//! a socket leaves it when it closes, so a dead agent means direct DNS from the next query.

mod exchange;
mod message;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    process::Command,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use enforcer_common::dns_socket_index;
use ipnet::Ipv4Net;
use tokio::{
    net::{TcpListener, UdpSocket},
    task::JoinHandle,
};

use super::{
    learner::{Entry, Learner, LearningScope, Limits},
    maps::{read_learned, DnsMaps, LearnedMap},
};

#[derive(Clone, Debug)]
pub struct ProxyOptions {
    /// A /24 that no one else uses: the last byte is the scope's slot.
    pub prefix: Ipv4Net,
    pub port_base: u16,
    pub upstreams: Vec<Ipv4Addr>,
    pub limits: Limits,
    /// How long an upstream may take to answer.
    pub timeout: Duration,
    /// For the race test's control only: release answers first and learn this much later, as
    /// a proxy that does not hold answers would. Zero in production.
    pub debug_learn_delay: Duration,
}

/// Queries forwarded at once, over every slot, UDP and TCP. Each holds a socket towards the
/// upstream until it is answered or times out.
const MAX_IN_FLIGHT: usize = 4096;

/// Counters for the status.
#[derive(Default)]
pub struct Stats {
    pub queries: AtomicU64,
    pub upstream_failures: AtomicU64,
    pub servfail_sent: AtomicU64,
    /// Queries answered SERVFAIL at once because [`MAX_IN_FLIGHT`] were under way.
    pub overloaded: AtomicU64,
    /// Time from an answer's arrival to its addresses being in the kernel (lock wait, parse,
    /// map writes), over the answers that wrote something.
    pub learn_ns_sum: AtomicU64,
    pub learn_ns_max: AtomicU64,
    pub learn_count: AtomicU64,
}

pub(crate) struct Shared {
    learner: Mutex<Learner<LearnedMap>>,
    pub stats: Stats,
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` of the last query received, for the drain.
    last_query_ms: AtomicU64,
    epoch: Instant,
    timeout: Duration,
    debug_learn_delay: Duration,
}

impl Shared {
    pub(crate) fn learner(&self) -> MutexGuard<'_, Learner<LearnedMap>> {
        self.learner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a query from its arrival until its answer is sent (see [`Proxy::drain`]).
    /// `None` when [`MAX_IN_FLIGHT`] queries are under way already: the query gets SERVFAIL
    /// at once, so that a flood from one workload cannot take the agent's sockets and memory.
    fn arrived(self: &Arc<Self>) -> Option<InFlight> {
        self.stats.queries.fetch_add(1, Ordering::Relaxed);
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_query_ms.store(ms, Ordering::Relaxed);
        if self.in_flight.fetch_add(1, Ordering::Relaxed) >= MAX_IN_FLIGHT {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            self.stats.overloaded.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(InFlight(Arc::clone(self)))
    }

    /// What the workload gets for `reply`, the upstream's answer to `query` from `slot`: the
    /// reply itself once what it teaches is in the kernel, or SERVFAIL.
    fn release(self: &Arc<Self>, slot: u8, query: &[u8], reply: Vec<u8>) -> Option<Vec<u8>> {
        if !message::answers(query, &reply) {
            // Not the answer to this question: never learned from, never relayed.
            self.stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
            return self.servfail(query);
        }
        if !self.debug_learn_delay.is_zero() {
            let (shared, later) = (Arc::clone(self), reply.clone());
            tokio::spawn(async move {
                tokio::time::sleep(shared.debug_learn_delay).await;
                let _ = shared.learner().learn(slot, &later, boottime_ns());
            });
            return Some(reply);
        }
        let started = Instant::now();
        let learned = self.learner().learn(slot, &reply, boottime_ns());
        match learned {
            Ok(written) => {
                if written > 0 {
                    let ns = started.elapsed().as_nanos() as u64;
                    self.stats.learn_ns_sum.fetch_add(ns, Ordering::Relaxed);
                    self.stats.learn_ns_max.fetch_max(ns, Ordering::Relaxed);
                    self.stats.learn_count.fetch_add(1, Ordering::Relaxed);
                }
                Some(reply)
            }
            Err(err) => {
                log::warn!("dns-learn-failed: {err}; the workload gets SERVFAIL");
                self.servfail(query)
            }
        }
    }

    fn servfail(&self, query: &[u8]) -> Option<Vec<u8>> {
        self.stats.servfail_sent.fetch_add(1, Ordering::Relaxed);
        message::servfail(query)
    }
}

/// What refusal records ask the proxy: why an address was not learned.
#[derive(Clone)]
pub struct LearningHandle(Arc<Shared>);

impl LearningHandle {
    pub fn why_refused(
        &self,
        key: &enforcer_common::PolicyKey,
    ) -> Option<super::learner::NotLearned> {
        self.0.learner().why_refused(key, boottime_ns())
    }
}

impl std::fmt::Debug for LearningHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LearningHandle")
    }
}

struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A scope's slot and the sockets serving it.
struct Slot {
    slot: u8,
    id: u32,
    tasks: Vec<JoinHandle<()>>,
    /// Where its sockets sit in `DNS_SOCKS`.
    indexes: Vec<u32>,
}

pub struct Proxy {
    opts: ProxyOptions,
    maps: DnsMaps,
    shared: Arc<Shared>,
    slots: BTreeMap<String, Slot>,
}

impl Proxy {
    /// Routes the prefix to the node, tells the kernel where the proxy is, and adopts what an
    /// earlier agent learned. No query is redirected before [`Proxy::update`] gives slots.
    pub fn start(
        mut maps: DnsMaps,
        learned: LearnedMap,
        opts: ProxyOptions,
        agent_cgroup: Option<u64>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            opts.prefix.prefix_len() == 24,
            "--dns-proxy-prefix {} must be a /24",
            opts.prefix
        );
        anyhow::ensure!(
            opts.upstreams.len() <= usize::from(enforcer_common::DNS_MAX_UPSTREAMS),
            "at most {} DNS upstreams",
            enforcer_common::DNS_MAX_UPSTREAMS
        );
        route_local(opts.prefix)?;
        maps.clear_slots();
        if agent_cgroup.is_none() {
            log::warn!(
                "the agent's cgroup is unknown: any process may bind {} and pass as the DNS proxy",
                opts.prefix
            );
        }
        maps.enable(
            opts.prefix.network(),
            opts.port_base,
            &opts.upstreams,
            agent_cgroup,
        )?;
        let adopted = read_learned(&learned);
        let mut learner = Learner::new(learned, opts.limits.clone());
        if !adopted.is_empty() {
            log::info!(
                "kept {} learned addresses of an earlier agent until they expire",
                adopted.len()
            );
        }
        learner.adopt(adopted);
        log::info!(
            "DNS proxy on {} ports {}.., upstreams {:?}",
            opts.prefix,
            opts.port_base,
            opts.upstreams
        );
        Ok(Self {
            shared: Arc::new(Shared {
                learner: Mutex::new(learner),
                stats: Stats::default(),
                in_flight: AtomicUsize::new(0),
                last_query_ms: AtomicU64::new(0),
                epoch: Instant::now(),
                timeout: opts.timeout,
                debug_learn_delay: opts.debug_learn_delay,
            }),
            opts,
            maps,
            slots: BTreeMap::new(),
        })
    }

    /// The scopes that learn now: slots are kept by scope name, given to new scopes and taken
    /// from scopes gone. A slot is redirected to only once its sockets serve.
    pub fn update(&mut self, scopes: &[LearningScope]) {
        let wanted: BTreeMap<&str, &LearningScope> =
            scopes.iter().map(|s| (s.name.as_str(), s)).collect();
        let gone: Vec<String> = self
            .slots
            .keys()
            .filter(|name| !wanted.contains_key(name.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if let Some(slot) = self.slots.remove(&name) {
                self.close(slot);
            }
        }
        for scope in scopes {
            if let Some(slot) = self.slots.get_mut(&scope.name) {
                if slot.id != scope.id {
                    self.maps.remove_slot(slot.id);
                    slot.id = scope.id;
                    if let Err(err) = self.maps.set_slot(scope.id, slot.slot) {
                        log::error!("{err:#}");
                    }
                }
                continue;
            }
            let Some(free) = (1..=254u8).find(|n| self.slots.values().all(|s| s.slot != *n)) else {
                log::error!(
                    "scope {}: no DNS slot left (254 in use): its workloads learn nothing",
                    scope.name
                );
                continue;
            };
            match self.open(free, scope.id) {
                Ok(slot) => {
                    self.slots.insert(scope.name.clone(), slot);
                }
                Err(err) => log::error!(
                    "scope {}: DNS proxy slot {free}: {err:#}; its workloads learn nothing",
                    scope.name
                ),
            }
        }
        let by_slot = scopes
            .iter()
            .filter_map(|s| self.slots.get(&s.name).map(|slot| (slot.slot, s.clone())))
            .collect();
        self.shared.learner().set_scopes(by_slot);
    }

    /// Binds a slot's sockets, starts serving them, and only then lets the kernel send there.
    fn open(&mut self, slot: u8, id: u32) -> anyhow::Result<Slot> {
        let mut opened = Slot {
            slot,
            id,
            tasks: Vec::new(),
            indexes: Vec::new(),
        };
        let o = self.opts.prefix.network().octets();
        let addr = Ipv4Addr::new(o[0], o[1], o[2], slot);
        for (idx, upstream) in self.opts.upstreams.iter().enumerate() {
            let port = self.opts.port_base + idx as u16;
            let local = SocketAddr::V4(SocketAddrV4::new(addr, port));
            let server = SocketAddr::V4(SocketAddrV4::new(*upstream, 53));
            let udp =
                std::net::UdpSocket::bind(local).with_context(|| format!("binding {local}/udp"))?;
            udp.set_nonblocking(true)?;
            let tcp = std::net::TcpListener::bind(local)
                .with_context(|| format!("binding {local}/tcp"))?;
            tcp.set_nonblocking(true)?;
            let udp_index = dns_socket_index(slot, idx as u16, false);
            let tcp_index = dns_socket_index(slot, idx as u16, true);
            self.maps.add_socket(udp_index, &udp)?;
            opened.indexes.push(udp_index);
            self.maps.add_socket(tcp_index, &tcp)?;
            opened.indexes.push(tcp_index);
            let udp = UdpSocket::from_std(udp)?;
            let tcp = TcpListener::from_std(tcp)?;
            let shared = Arc::clone(&self.shared);
            opened
                .tasks
                .push(tokio::spawn(exchange::serve_udp(udp, slot, server, shared)));
            let shared = Arc::clone(&self.shared);
            opened
                .tasks
                .push(tokio::spawn(exchange::serve_tcp(tcp, slot, server, shared)));
        }
        self.maps.set_slot(id, slot)?;
        Ok(opened)
    }

    fn close(&mut self, slot: Slot) {
        self.maps.remove_slot(slot.id);
        for index in &slot.indexes {
            self.maps.remove_socket(*index);
        }
        for task in slot.tasks {
            task.abort();
        }
    }

    /// Pods whose DNS something else captures (an Istio sidecar or ztunnel): their queries go
    /// where they were sent, and they learn nothing.
    pub fn set_skipped(&mut self, cgroups: &std::collections::BTreeSet<u64>) {
        if let Err(err) = self.maps.set_skipped(cgroups) {
            log::error!("{err:#}");
        }
    }

    pub fn handle(&self) -> LearningHandle {
        LearningHandle(Arc::clone(&self.shared))
    }

    /// Deletes learned entries long expired.
    pub fn expire(&self) {
        let gone = self.shared.learner().expire(boottime_ns());
        if gone > 0 {
            log::debug!("{gone} learned addresses expired");
        }
    }

    /// A planned stop: new queries go to their servers directly at once, and those already
    /// here are answered, so that no query is lost.
    pub async fn drain(mut self) {
        for slot in self.slots.values() {
            for index in &slot.indexes {
                self.maps.remove_socket(*index);
            }
        }
        let quiet = Duration::from_millis(200);
        let deadline = Instant::now() + self.opts.timeout + quiet;
        while Instant::now() < deadline {
            let last = Duration::from_millis(self.shared.last_query_ms.load(Ordering::Relaxed));
            let idle = self.shared.epoch.elapsed().saturating_sub(last);
            if self.shared.in_flight.load(Ordering::Relaxed) == 0 && idle >= quiet {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let names: Vec<String> = self.slots.keys().cloned().collect();
        for name in names {
            if let Some(slot) = self.slots.remove(&name) {
                self.close(slot);
            }
        }
    }

    /// Answers learned from and answers refused (SERVFAIL) so far: when it moves, the status
    /// is due.
    pub fn progress(&self) -> u64 {
        self.shared.learner().learned_answers
            + self.shared.stats.servfail_sent.load(Ordering::Relaxed)
    }

    pub fn report(&self) -> ProxyReport {
        let learner = self.shared.learner();
        let now = boottime_ns();
        let scope_of = |id: u32| learner.scope_name(id).unwrap_or("?").to_string();
        ProxyReport {
            prefix: self.opts.prefix.to_string(),
            upstreams: self
                .opts
                .upstreams
                .iter()
                .map(ToString::to_string)
                .collect(),
            slots: self
                .slots
                .iter()
                .map(|(name, s)| (name.clone(), s.slot))
                .collect(),
            queries: self.shared.stats.queries.load(Ordering::Relaxed),
            upstream_failures: self.shared.stats.upstream_failures.load(Ordering::Relaxed),
            servfail_sent: self.shared.stats.servfail_sent.load(Ordering::Relaxed),
            overloaded: self.shared.stats.overloaded.load(Ordering::Relaxed),
            learned_answers: learner.learned_answers,
            learn_failures: learner
                .failures
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            last_failure: learner.last_failure.clone(),
            learned: learner
                .entries(REPORTED_ENTRIES)
                .into_iter()
                .map(|e: Entry| LearnedReport {
                    scope: scope_of(e.scope),
                    name: e.name,
                    addr: e.addr.to_string(),
                    expires_in_s: (e.expires_ns as i64 - now as i64) / 1_000_000_000,
                })
                .collect(),
            learned_keys: learner.len(),
            learn_us_mean: {
                let n = self.shared.stats.learn_count.load(Ordering::Relaxed).max(1);
                self.shared.stats.learn_ns_sum.load(Ordering::Relaxed) as f64 / n as f64 / 1000.0
            },
            learn_us_max: self.shared.stats.learn_ns_max.load(Ordering::Relaxed) as f64 / 1000.0,
        }
    }
}

/// Learned entries listed in the status (all are counted).
const REPORTED_ENTRIES: usize = 1000;

/// What the status file says of the proxy.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ProxyReport {
    pub prefix: String,
    pub upstreams: Vec<String>,
    pub slots: BTreeMap<String, u8>,
    pub queries: u64,
    pub upstream_failures: u64,
    pub servfail_sent: u64,
    /// Queries refused at once (SERVFAIL) because too many were under way.
    #[serde(default)]
    pub overloaded: u64,
    pub learned_answers: u64,
    pub learn_failures: BTreeMap<String, u64>,
    pub last_failure: Option<String>,
    pub learned_keys: usize,
    /// From an answer's arrival to its addresses in the kernel, in microseconds.
    #[serde(default)]
    pub learn_us_mean: f64,
    #[serde(default)]
    pub learn_us_max: f64,
    pub learned: Vec<LearnedReport>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LearnedReport {
    pub scope: String,
    pub name: String,
    pub addr: String,
    /// Negative once expired (kept for the flows it allowed, until the idle grace ends).
    pub expires_in_s: i64,
}

/// `CLOCK_BOOTTIME`, the kernel's `bpf_ktime_get_boot_ns`.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Makes every address of the prefix the node's own (AnyIP), so that the proxy can bind them
/// and pods reach them through their default route.
fn route_local(prefix: Ipv4Net) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(["route", "replace", "local", &prefix.to_string()])
        .args(["dev", "lo", "table", "local"])
        .output()
        .context("running ip route")?;
    anyhow::ensure!(
        out.status.success(),
        "routing {prefix} to the node: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Takes the prefix's route away (teardown).
pub fn unroute_local(prefix: Ipv4Net) {
    let _ = Command::new("ip")
        .args(["route", "del", "local", &prefix.to_string()])
        .args(["dev", "lo", "table", "local"])
        .output();
}
