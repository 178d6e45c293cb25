//! Resolves ServiceEntry hosts (A and AAAA) and keeps the answers fresh according to their TTL.
//!
//! On a resolver error the last good answer is kept and the failure is reported: an unreachable
//! DNS server must neither widen nor suddenly empty what is allowed.

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
    pub min_ttl: Duration,
    pub max_ttl: Duration,
}

#[derive(Clone, Debug)]
struct Answer {
    ips: Vec<IpAddr>,
    /// When the answer is refreshed: 80% of its TTL, so it is renewed before it expires.
    refresh_at: Instant,
    expires_at: Instant,
    last_error: Option<String>,
}

pub struct Resolver {
    inner: Arc<TokioResolver>,
    settings: DnsSettings,
    answers: HashMap<String, Answer>,
    servers: Vec<IpAddr>,
}

/// What one refresh changed.
#[derive(Debug, Default)]
pub struct RefreshReport {
    pub changed: bool,
    pub errors: Vec<String>,
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
            .map(|ns| ns.socket_addr.ip())
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
        })
    }

    /// The resolvers in use: workloads must be able to reach them too.
    pub fn servers(&self) -> &[IpAddr] {
        &self.servers
    }

    /// Resolves every name in `names` that is new or due, and forgets names no longer wanted.
    pub async fn refresh(&mut self, names: &BTreeSet<String>) -> RefreshReport {
        let mut report = RefreshReport::default();
        let before = self.answers.len();
        self.answers.retain(|name, _| names.contains(name));
        report.changed |= before != self.answers.len();

        let now = Instant::now();
        let mut lookups = JoinSet::new();
        for name in names {
            if self.answers.get(name).is_some_and(|a| a.refresh_at > now) {
                continue;
            }
            let inner = Arc::clone(&self.inner);
            let name = name.clone();
            lookups.spawn(async move {
                let result = lookup(&inner, &name).await;
                (name, result)
            });
        }
        while let Some(joined) = lookups.join_next().await {
            let Ok((name, result)) = joined else { continue };
            let now = Instant::now();
            match result {
                Ok((mut ips, ttl)) => {
                    ips.sort();
                    ips.dedup();
                    let ttl = ttl.clamp(self.settings.min_ttl, self.settings.max_ttl);
                    let old = self.answers.get(&name).map(|a| a.ips.clone());
                    report.changed |= old.as_ref() != Some(&ips);
                    if old.is_some_and(|o| o != ips) {
                        log::info!(
                            "DNS {name}: answer changed to {ips:?} (ttl {}s)",
                            ttl.as_secs()
                        );
                    } else {
                        log::debug!("DNS {name}: {ips:?} (ttl {}s)", ttl.as_secs());
                    }
                    self.answers.insert(
                        name,
                        Answer {
                            ips,
                            refresh_at: now + ttl.mul_f32(0.8),
                            expires_at: now + ttl,
                            last_error: None,
                        },
                    );
                }
                Err(err) => {
                    let retry = now + self.settings.min_ttl;
                    let entry = self.answers.entry(name.clone()).or_insert_with(|| {
                        report.changed = true;
                        Answer {
                            ips: Vec::new(),
                            refresh_at: retry,
                            expires_at: retry,
                            last_error: None,
                        }
                    });
                    entry.refresh_at = retry;
                    entry.last_error = Some(err.clone());
                    report.errors.push(if entry.ips.is_empty() {
                        format!("DNS {name}: {err}; nothing is allowed for it yet")
                    } else {
                        format!("DNS {name}: {err}; keeping the last answer {:?}", entry.ips)
                    });
                }
            }
        }
        report
    }

    /// When the next answer is due for refresh.
    pub fn next_refresh(&self) -> Option<Instant> {
        self.answers.values().map(|a| a.refresh_at).min()
    }

    pub fn answers(&self) -> BTreeMap<String, Vec<IpAddr>> {
        self.answers
            .iter()
            .map(|(k, v)| (k.clone(), v.ips.clone()))
            .collect()
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
                format!("{name} -> {:?}, expires in {left}s{err}", a.ips)
            })
            .collect();
        lines.sort();
        lines
    }
}

/// A name that does not exist is an empty answer, not an error.
async fn lookup(resolver: &TokioResolver, name: &str) -> Result<(Vec<IpAddr>, Duration), String> {
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
        Err(err) if err.is_no_records_found() => Ok((Vec::new(), Duration::ZERO)),
        Err(err) => Err(err.to_string()),
    }
}
