//! Resolves ServiceEntry hosts (A and AAAA) and keeps the answers fresh according to their TTL.
//!
//! On a resolver error the last good answer is kept and the failure is reported: an unreachable
//! DNS server must neither widen nor suddenly empty what is allowed. Superseded addresses stay
//! allowed for a grace period (see `record`). CNAME chains are followed by the resolver.

mod record;

use record::HostRecord;
pub use record::{Lifetimes, DEFAULT_GRACE_FLOOR};

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use hickory_resolver::{
    config::{LookupIpStrategy, NameServerConfigGroup, ResolverConfig, ResolverOpts},
    name_server::TokioConnectionProvider,
    TokioResolver,
};
use tokio::{task::JoinSet, time::Instant};

#[derive(Clone, Debug)]
pub struct DnsSettings {
    /// Use this server instead of the system's (`/etc/resolv.conf`).
    pub server: Option<SocketAddr>,
    pub lifetimes: Lifetimes,
}

pub struct Resolver {
    inner: Arc<TokioResolver>,
    settings: DnsSettings,
    answers: HashMap<String, HostRecord>,
    servers: Vec<SocketAddr>,
    /// The names last asked for: answers to others are dropped.
    wanted: BTreeSet<String>,
    lookups: JoinSet<(String, LookupResult)>,
    in_flight: std::collections::HashSet<String>,
}

/// What one refresh changed.
#[derive(Debug, Default)]
pub struct RefreshReport {
    pub changed: bool,
    pub errors: Vec<String>,
    /// Each lookup's result: `answered`, `empty` (the name has no addresses), or a
    /// [`LookupFailure`]'s label.
    pub lookups: Vec<&'static str>,
}

impl RefreshReport {
    fn merge(&mut self, other: Self) {
        self.changed |= other.changed;
        self.errors.extend(other.errors);
        self.lookups.extend(other.lookups);
    }
}

/// What the resolver holds: names, their current addresses, and superseded ones in grace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub names: usize,
    pub current: usize,
    pub in_grace: usize,
}

/// A lookup's addresses and TTL, or its error.
pub type LookupResult = Result<(Vec<IpAddr>, Duration), LookupError>;

/// A lookup that gave no answer: the last answer is kept.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct LookupError {
    pub kind: LookupFailure,
    pub message: String,
}

/// Why, as `enforcer_resolver_lookups_total{result}` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LookupFailure {
    Timeout,
    /// The server answered SERVFAIL (it could not resolve the name now).
    ServFail,
    /// The server answered REFUSED, or another error code.
    Refused,
    Other,
}

impl LookupFailure {
    pub fn label(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::ServFail => "servfail",
            Self::Refused => "refused",
            Self::Other => "failed",
        }
    }
}

impl Resolver {
    pub fn new(settings: DnsSettings) -> anyhow::Result<Self> {
        let (config, mut opts) = match settings.server {
            Some(addr) => {
                let group = NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true);
                (
                    ResolverConfig::from_parts(None, vec![], group),
                    ResolverOpts::default(),
                )
            }
            None => hickory_resolver::system_conf::read_system_conf()
                .context("reading /etc/resolv.conf")?,
        };
        // The agent keeps its own cache with TTLs; the library's would hide expiry from us.
        opts.cache_size = 0;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        let servers = config
            .name_servers()
            .iter()
            .map(|ns| ns.socket_addr)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let inner = TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
            .with_options(opts)
            .build();
        Ok(Self {
            inner: Arc::new(inner),
            settings,
            answers: HashMap::new(),
            servers,
            wanted: BTreeSet::new(),
            lookups: JoinSet::new(),
            in_flight: std::collections::HashSet::new(),
        })
    }

    /// The resolvers in use: workloads must be able to reach them too.
    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// Starts the lookups that are due (see [`Resolver::start`]) and takes in their answers for
    /// at most `limit`; lookups still under way then go on in the background, for
    /// [`Resolver::next_answer`]. The agent waits like this once, at start, so that a restart
    /// does not drop the entries of names that merely have no answer yet.
    pub async fn refresh_within(
        &mut self,
        names: &BTreeSet<String>,
        limit: Duration,
    ) -> RefreshReport {
        let mut report = RefreshReport {
            changed: self.start(names),
            ..RefreshReport::default()
        };
        let deadline = Instant::now() + limit;
        while let Ok(Some((name, result))) =
            tokio::time::timeout_at(deadline, self.next_answer()).await
        {
            report.merge(self.record(name, result));
        }
        report
    }

    /// Forgets names no longer wanted, lets superseded addresses whose grace ended go, and
    /// starts a lookup for every wanted name that is new or due (and not already asked).
    /// Returns whether the answers changed.
    pub fn start(&mut self, names: &BTreeSet<String>) -> bool {
        let before = self.answers.len();
        self.answers.retain(|name, _| names.contains(name));
        let mut changed = before != self.answers.len();
        self.wanted.clone_from(names);

        let now = Instant::now();
        for (name, record) in &mut self.answers {
            if record.expire(now) {
                log::info!(
                    "DNS {name}: grace ended for superseded addresses; now {:?}",
                    record.allowed()
                );
                changed = true;
            }
        }
        for name in names {
            let due = self.answers.get(name).is_none_or(|a| a.refresh_at <= now);
            if !due || !self.in_flight.insert(name.clone()) {
                continue;
            }
            let inner = Arc::clone(&self.inner);
            let name = name.clone();
            self.lookups.spawn(async move {
                let result = lookup(&inner, &name).await;
                (name, result)
            });
        }
        changed
    }

    /// The next answer of a lookup [`Resolver::start`] began; `None` when none is under way.
    /// Cancel-safe, for `select!`.
    pub async fn next_answer(&mut self) -> Option<(String, LookupResult)> {
        loop {
            match self.lookups.join_next().await? {
                Ok(answer) => return Some(answer),
                // A lookup task that panicked or was cancelled: asked again when due.
                Err(err) => log::warn!("DNS lookup task: {err}"),
            }
        }
    }

    /// Takes one answer in: the new addresses, or the error with the last answer kept.
    pub fn record(&mut self, name: String, result: LookupResult) -> RefreshReport {
        let mut report = RefreshReport::default();
        self.in_flight.remove(&name);
        if !self.wanted.contains(&name) {
            return report;
        }
        let life = self.settings.lifetimes;
        let now = Instant::now();
        let record = self.answers.entry(name.clone()).or_insert_with(|| {
            report.changed = true;
            HostRecord::unresolved(now, life.min_ttl)
        });
        report.lookups.push(match &result {
            Ok((ips, _)) if ips.is_empty() => "empty",
            Ok(_) => "answered",
            Err(err) => err.kind.label(),
        });
        match result {
            Ok((ips, ttl)) => {
                let previous = record.current().to_vec();
                if record.update(ips, ttl, now, fastrand::f32(), &life) {
                    report.changed = true;
                }
                if previous.is_empty() || previous == record.current() {
                    log::debug!(
                        "DNS {name}: {:?} (ttl {}s)",
                        record.current(),
                        ttl.as_secs()
                    );
                } else {
                    log::info!(
                        "DNS {name}: answer changed to {:?} (ttl {}s); kept in grace: {:?}",
                        record.current(),
                        ttl.as_secs(),
                        record
                            .retired()
                            .iter()
                            .map(|(ip, _)| ip)
                            .collect::<Vec<_>>()
                    );
                }
            }
            Err(err) => {
                record.refresh_at = now + life.min_ttl;
                record.last_error = Some(err.message.clone());
                report.errors.push(if record.allowed().is_empty() {
                    format!("DNS {name}: {err}; nothing is allowed for it yet")
                } else {
                    format!(
                        "DNS {name}: {err}; keeping the last answer {:?}",
                        record.allowed()
                    )
                });
            }
        }
        report
    }

    /// Resolves each name once through `server` (or the system's), for one-shot commands
    /// (`explain`, `analyze`): its addresses or the error.
    pub fn resolve_blocking(
        server: Option<SocketAddr>,
        names: &BTreeSet<String>,
    ) -> anyhow::Result<BTreeMap<String, Result<Vec<IpAddr>, String>>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let resolver = Self::new(DnsSettings {
            server,
            lifetimes: Lifetimes::default(),
        })?;
        Ok(runtime.block_on(resolver.resolve_once(names)))
    }

    async fn resolve_once(
        &self,
        names: &BTreeSet<String>,
    ) -> BTreeMap<String, Result<Vec<IpAddr>, String>> {
        let mut lookups = JoinSet::new();
        for name in names {
            let inner = Arc::clone(&self.inner);
            let name = name.clone();
            lookups.spawn(async move {
                let result = lookup(&inner, &name)
                    .await
                    .map(|(ips, _)| ips)
                    .map_err(|e| e.message);
                (name, result)
            });
        }
        let mut out = BTreeMap::new();
        while let Some(joined) = lookups.join_next().await {
            if let Ok((name, result)) = joined {
                out.insert(name, result);
            }
        }
        out
    }

    /// When the next answer is due for refresh, or a superseded address leaves.
    pub fn next_refresh(&self) -> Option<Instant> {
        self.answers
            .values()
            .flat_map(|a| [Some(a.refresh_at), a.next_expiry()])
            .flatten()
            .min()
    }

    pub fn answers(&self) -> BTreeMap<String, Vec<IpAddr>> {
        self.answers
            .iter()
            .map(|(k, v)| (k.clone(), v.allowed()))
            .collect()
    }

    pub fn held(&self) -> Held {
        Held {
            names: self.answers.len(),
            current: self.answers.values().map(|a| a.current().len()).sum(),
            in_grace: self.answers.values().map(|a| a.retired().len()).sum(),
        }
    }

    /// One line per name: its addresses, and the seconds until they expire.
    pub fn describe(&self) -> Vec<String> {
        let now = Instant::now();
        let mut lines: Vec<String> = self
            .answers
            .iter()
            .map(|(name, a)| {
                let left = a.expires_at.saturating_duration_since(now).as_secs();
                let err = a
                    .last_error
                    .as_deref()
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default();
                let grace: Vec<String> = a
                    .retired()
                    .iter()
                    .map(|(ip, until)| {
                        format!(
                            "{ip} for {}s",
                            until.saturating_duration_since(now).as_secs()
                        )
                    })
                    .collect();
                format!(
                    "{name} -> {:?}, expires in {left}s, in grace: {grace:?}{err}",
                    a.current()
                )
            })
            .collect();
        lines.sort();
        lines
    }
}

/// A name that does not exist is an empty answer, not an error.
async fn lookup(resolver: &TokioResolver, name: &str) -> LookupResult {
    let fqdn = if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    };
    match resolver.lookup_ip(fqdn.as_str()).await {
        Ok(found) => {
            let ttl = found
                .valid_until()
                .saturating_duration_since(std::time::Instant::now());
            Ok((found.iter().collect(), ttl))
        }
        Err(err) => match failure(&err) {
            None => Ok((Vec::new(), Duration::ZERO)),
            Some(kind) => Err(LookupError {
                kind,
                message: err.to_string(),
            }),
        },
    }
}

/// `None` for an answer that says the name has no addresses (NXDOMAIN, or NOERROR without
/// records). hickory reports SERVFAIL and REFUSED as "no records found" too: those say
/// nothing about the name, so the last answer must stay.
fn failure(err: &hickory_resolver::ResolveError) -> Option<LookupFailure> {
    use hickory_proto::{op::ResponseCode, ProtoErrorKind};
    let Some(proto) = err.proto() else {
        return Some(LookupFailure::Other);
    };
    match proto.kind() {
        ProtoErrorKind::NoRecordsFound { response_code, .. } => match *response_code {
            ResponseCode::NXDomain | ResponseCode::NoError => None,
            ResponseCode::ServFail => Some(LookupFailure::ServFail),
            _ => Some(LookupFailure::Refused),
        },
        ProtoErrorKind::Timeout => Some(LookupFailure::Timeout),
        _ => Some(LookupFailure::Other),
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
