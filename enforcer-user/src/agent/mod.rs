//! The node agent: reads policy (files in local mode, the API server in Kubernetes mode),
//! resolves names, watches cgroups, and keeps the kernel maps equal to what the compiler says. Every change recomputes the whole desired
//! state, so a missed event can only delay an update, never leave a stale rule behind.

mod reconcile;
mod timing;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use ipnet::IpNet;
use tokio::{sync::mpsc, time::Instant};

use self::{
    reconcile::{Reconciler, Workloads},
    timing::Debounce,
};
use crate::{
    cgroup::{Assignment, Layout},
    datapath::{self, Datapath},
    k8s::{self, node::NodeOptions},
    observe::{output, records::Explainer},
    observe::{Health, Metrics},
    pods::Pods,
    policy,
    resolver::{DnsSettings, Resolver},
    sources::{files, Sources},
};

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Policy files (local mode); empty in Kubernetes mode.
    pub policies: PathBuf,
    /// Kubernetes mode: policy and pods from the API server, pod cgroups from the kubelet's tree.
    pub kubernetes: Option<NodeOptions>,
    pub mesh_config: Option<PathBuf>,
    pub dns: DnsSettings,
    pub allow_cidrs: Vec<IpNet>,
    pub istio_compat: bool,
    /// `--egress-gateway-only`.
    pub egress_gateway_only: bool,
    /// `--gateway-any-namespace`.
    pub gateway_any_namespace: bool,
    pub datapath: datapath::Options,
    pub cgroups: Layout,
    /// Sidecars without a workloadSelector here set the default for every namespace.
    pub root_namespace: String,
    /// Namespaces whose cgroups are created at start, before any `enforcer exec`.
    pub namespaces: Vec<String>,
    /// Written (JSON) after every apply: generation, problems, notes and inputs.
    pub status_file: PathBuf,
    /// Local pods (`enforcer exec --netns`): their request directory and address ranges.
    pub pods: Option<crate::pods::PodNetwork>,
    /// Whether the TC program judges ICMP (otherwise it passes).
    pub judge_icmp: bool,
    /// `tc_flags::ALLOW_*` bits: socket kinds enforced scopes may create.
    pub allow_sockets: u32,
    /// Learning from workloads' DNS answers through the proxy; `None` turns it off.
    pub dns_proxy: Option<crate::dns::proxy::ProxyOptions>,
    /// Whether the agent resolves entries' hosts itself (`--dns-allow` both or resolved); if
    /// not, only what workloads' own answers give is allowed for them.
    pub pre_resolve: bool,
    /// Namespaces in AUDIT whatever the mesh and Sidecars say (`--audit-namespace`).
    pub audit_namespaces: Vec<String>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: nowhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The control socket for `events`, `explain` and `audit-report`; `None`: none.
    pub control_socket: Option<PathBuf>,
}

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    // Kubernetes mode manages no cgroups of its own (the host's hierarchy may be read-only).
    let local = cfg.kubernetes.is_none();
    if local {
        std::fs::create_dir_all(&cfg.cgroups.managed)
            .with_context(|| format!("creating cgroup {}", cfg.cgroups.managed.display()))?;
    }
    for ns in &cfg.namespaces {
        let dir = cfg.cgroups.namespace_dir(ns)?;
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating cgroup {}", dir.display()))?;
    }
    let (mut dp, ring) = Datapath::open(&cfg.datapath)?;
    let mut flags = cfg.allow_sockets;
    if cfg.judge_icmp {
        flags |= enforcer_common::tc_flags::JUDGE_ICMP;
    }
    // Both modes claim subtrees (pods; namespace cgroups and `--cgroup` mappings): a child
    // cgroup a workload makes is its parent's from its first connection, not the next scan.
    flags |= enforcer_common::tc_flags::CG_TREES;
    if cfg.egress_gateway_only {
        flags |= enforcer_common::tc_flags::GATEWAY_ONLY;
    }
    dp.set_flags(flags)?;
    let agent_cgroup = exempt_self(&mut dp, &cfg.cgroups.root);
    let mut pods = match &cfg.pods {
        Some(net) => Some(Pods::new(net.clone(), cfg.datapath.pin_root.clone())?),
        None => None,
    };
    let (pod_tx, mut pod_rx) = mpsc::unbounded_channel();
    let _pod_watcher = match &pods {
        Some(p) => Some(files::watch_any(p.dir(), pod_tx)?),
        None => None,
    };
    let explainer = Arc::new(RwLock::new(Explainer::default()));
    let events_task = tokio::spawn(output::run(ring, Arc::clone(&explainer)));
    if let Some(path) = &cfg.control_socket {
        // Enforcement does not depend on it: a failure is reported, and the agent goes on.
        match crate::observe::control::serve(path, Arc::clone(&explainer)) {
            Ok(()) => log::info!("control socket on {}", path.display()),
            Err(err) => {
                log::error!("control socket: {err:#}; no events, live explain or audit report")
            }
        }
    }
    let mut resolver = Resolver::new(cfg.dns.clone())?;

    // Policy changes: file events in local mode, watch events in Kubernetes mode.
    let (file_tx, mut file_rx) = mpsc::unbounded_channel();
    let (node_tx, mut node_rx) = mpsc::unbounded_channel();
    let mut node = None;
    let mut _file_watcher = None;
    match &cfg.kubernetes {
        Some(opts) => {
            // Pod events, like the kubelet's cgroups, only move workloads: a replan.
            let cluster =
                k8s::Cluster::connect(opts.cluster.clone(), file_tx, node_tx.clone()).await?;
            node = Some(k8s::node::Node::new(opts.clone(), cluster, node_tx));
        }
        None => {
            let mut watches = vec![files::Watch::PolicyDir(cfg.policies.clone())];
            watches.extend(cfg.mesh_config.iter().cloned().map(files::Watch::File));
            _file_watcher = Some(files::DirWatcher::new(watches, file_tx)?);
        }
    }
    let (cg_tx, mut cg_rx) = mpsc::unbounded_channel();
    let _cgroup_watcher = match local {
        true => Some(files::watch_any(&cfg.cgroups.managed, cg_tx)?),
        false => None,
    };

    let mut sources = load_sources(&cfg, node.as_ref());
    let mut assignments = cfg.cgroups.discover().unwrap_or_default();
    if let Some(n) = node.as_mut() {
        n.refresh();
    }
    let proxy = start_proxy(&cfg, &mut dp, agent_cgroup);
    explainer
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .learning = match &proxy {
        Ok(p) => Ok(p.handle()),
        Err(why) => Err(why.clone()),
    };
    let observed = observe(&cfg).await;
    let health = Arc::clone(&observed.1);
    let mut reconciler = Reconciler::new(dp, explainer, agent_cgroup, proxy, observed);
    // Compiling is the expensive step (100,000 entries take a while): only when an input changed.
    let mut dirty = true;
    // Only where workloads run changed (Kubernetes pods): the maps are planned again, with the
    // policy compiled before.
    let mut replan = false;
    let mut rescan = tokio::time::interval(Duration::from_secs(1));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut last_beat = std::time::Instant::now();

    // The first answers are awaited, briefly, so that a restart does not drop the entries of
    // names that merely have no answer yet; a name that hangs holds the start up a second at
    // most. After that, lookups run beside the loop and never delay an apply.
    let names = names_to_resolve(&cfg, &sources);
    let first = resolver.refresh_within(&names, FIRST_ANSWERS).await;
    reconciler.metrics.resolver(&first.lookups, resolver.held());
    for err in first.errors {
        log::warn!("{err}");
    }
    let mut dns_changed = false;
    let mut reload_at: Option<Debounce> = None;
    // A deadline for select! branches that are off.
    let far = Instant::now() + Duration::from_secs(86_400 * 365);

    loop {
        timing::beat(&cfg.status_file, &mut last_beat);
        health.beat();
        let names = names_to_resolve(&cfg, &sources);
        dns_changed |= resolver.start(&names);
        if let Some(p) = pods.as_mut() {
            dirty |= p.reconcile(&mut reconciler.dp);
        }
        let trees = cfg.cgroups.tree_roots(&assignments);
        let workloads = Workloads {
            cgroups: &assignments,
            trees: &trees,
            node: node.as_ref(),
            pods: pods.as_ref(),
        };
        let recompile = dirty || dns_changed || reconciler.stale(&cfg, &sources, &workloads);
        dns_changed = false;
        if recompile || replan {
            if recompile {
                reconciler.compile(&cfg, &sources, &workloads, &resolver);
            }
            let complete = reconciler.apply(&cfg, &sources, &workloads, &resolver)?;
            if let Some(n) = node.as_mut() {
                n.attach_pods(&mut reconciler.dp, &cfg.datapath.pin_root);
                reconciler.veths_changed();
            }
            if let Some(p) = pods.as_mut() {
                p.mark_ready();
            }
            // After a partial failure, try again at the next tick.
            dirty = !complete;
            replan = false;
        }

        let next_dns = resolver
            .next_refresh()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            // Policy events only set the reload's time (a quiet period, bounded), so that pod
            // events are handled at once while a busy cluster keeps sending.
            Some(()) = file_rx.recv() => {
                while file_rx.try_recv().is_ok() {}
                reload_at = Some(reload_at.map_or_else(Debounce::start, Debounce::extend));
            }
            () = tokio::time::sleep_until(reload_at.map_or(far, |d| d.due)), if reload_at.is_some() => {
                reload_at = None;
                sources = load_sources(&cfg, node.as_ref());
                if let Some(n) = node.as_mut() {
                    n.refresh();
                }
                dirty = true;
            }
            Some(()) = node_rx.recv() => {
                while node_rx.try_recv().is_ok() {}
                replan |= node.as_mut().is_some_and(k8s::node::Node::refresh);
            }
            Some(()) = pod_rx.recv() => {
                while pod_rx.try_recv().is_ok() {}
            }
            Some(()) = cg_rx.recv() => {
                while cg_rx.try_recv().is_ok() {}
                dirty |= rediscover(&cfg, &mut assignments);
            }
            Some((name, answer)) = resolver.next_answer() => {
                let report = resolver.record(name, answer);
                reconciler.metrics.resolver(&report.lookups, resolver.held());
                for err in &report.errors {
                    log::warn!("{err}");
                }
                dns_changed |= report.changed;
            }
            _ = rescan.tick() => {
                reconciler.tick_learning(&cfg);
                dirty |= rediscover(&cfg, &mut assignments);
                replan |= node.as_mut().is_some_and(k8s::node::Node::refresh);
                if let Some(n) = node.as_mut() {
                    reconciler.metrics.pods(n);
                    reconciler.metrics.unmapped_windows(&n.take_unmapped_windows());
                }
                if let Some(n) = node.as_mut().filter(|n| n.links_pending()) {
                    n.attach_pods(&mut reconciler.dp, &cfg.datapath.pin_root);
                    reconciler.veths_changed();
                }
            }
            () = tokio::time::sleep_until(next_dns) => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    // Queries go direct from now on; those already here are answered.
    if let Ok(proxy) = std::mem::replace(&mut reconciler.proxy, Err("stopping".into())) {
        proxy.drain().await;
    }
    events_task.abort();
    log::info!("agent stopping; the pinned programs and maps keep enforcing");
    Ok(())
}

/// The metrics and the probes' state, served on `--metrics-addr`. A failure to bind (the
/// port still held by an agent on its way out) is logged and tried again every 5 s:
/// enforcement does not wait for being watched, and the probes fail meanwhile.
async fn observe(cfg: &AgentConfig) -> (Arc<Metrics>, Arc<Health>) {
    let metrics = Metrics::new(cfg.datapath.pin_root.clone());
    let health = Arc::new(Health::default());
    let _ = output::RECORD_COUNTS.set(Arc::clone(&metrics));
    let Some(addr) = cfg.metrics_addr else {
        return (metrics, health);
    };
    // The first try is awaited, so that the first status names the address.
    if !serve_metrics(addr, &metrics, &health, true).await {
        let (m, h) = (Arc::clone(&metrics), Arc::clone(&health));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                if serve_metrics(addr, &m, &h, false).await {
                    return;
                }
            }
        });
    }
    (metrics, health)
}

/// Whether `/metrics` is now served on `addr`; a failure is logged when `first`.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
    first: bool,
) -> bool {
    match crate::observe::server::serve(addr, Arc::clone(metrics), Arc::clone(health)).await {
        Ok(bound) => {
            log::info!("metrics on http://{bound}/metrics (and /healthz, /readyz)");
            crate::observe::server::BOUND.get_or_init(|| bound);
            true
        }
        Err(err) => {
            if first {
                log::error!("serving metrics on {addr}: {err:#}; trying again every 5 s (no /metrics, /healthz or /readyz until then)");
            }
            false
        }
    }
}

/// Exempts the agent's own cgroup before any network I/O (see `Datapath::exempt_agent`).
/// Without it the agent can still reach what unmapped pods may (the API server, DNS), so a
/// failure is reported, not fatal.
fn exempt_self(dp: &mut Datapath, cgroup2: &std::path::Path) -> Option<u64> {
    let exempted = crate::cgroup::own_cgroup(cgroup2).and_then(|dir| {
        let id = crate::cgroup::cgroup_id(&dir)?;
        dp.exempt_agent(id)?;
        log::info!("the agent's own cgroup {} is exempt", dir.display());
        Ok(id)
    });
    match exempted {
        Ok(id) => Some(id),
        Err(err) => {
            log::error!("cannot exempt the agent's own cgroup: {err:#}");
            None
        }
    }
}

/// The DNS proxy, or why it is not running: without it nothing is learned (which fails closed)
/// and queries go to their servers directly.
fn start_proxy(
    cfg: &AgentConfig,
    dp: &mut Datapath,
    agent_cgroup: Option<u64>,
) -> Result<crate::dns::proxy::Proxy, String> {
    let Some(opts) = cfg.dns_proxy.clone() else {
        return Err("off (--dns-allow resolved)".into());
    };
    let (maps, learned) = dp.take_dns().ok_or("the DNS maps are taken")?;
    crate::dns::proxy::Proxy::start(maps, learned, opts, agent_cgroup).map_err(|err| {
        let why = format!("the DNS proxy did not start: {err:#}");
        log::error!("{why}; nothing is learned from DNS answers");
        why
    })
}

/// The names the agent resolves itself: entries' hosts too, unless `--dns-allow learned`.
/// Hosts routed through an egress gateway always are: their redirects name addresses.
fn names_to_resolve(cfg: &AgentConfig, sources: &Sources) -> std::collections::BTreeSet<String> {
    let mut names = if cfg.pre_resolve {
        policy::dns_names(&sources.entries, &sources.workloads, cfg.istio_compat)
    } else {
        policy::endpoint_names(&sources.entries, &sources.workloads)
    };
    names.extend(policy::routing_names(
        &sources.routing(&crate::observe::status::Inputs::default()),
    ));
    names
}

/// How long the agent's first apply waits for the first DNS answers.
const FIRST_ANSWERS: Duration = Duration::from_secs(1);

/// Returns whether the set of cgroups changed.
fn rediscover(cfg: &AgentConfig, assignments: &mut BTreeMap<u64, Assignment>) -> bool {
    match cfg.cgroups.discover() {
        Ok(found) if found != *assignments => {
            *assignments = found;
            true
        }
        Ok(_) => false,
        Err(err) => {
            log::warn!("keeping the previous cgroup view: {err:#}");
            false
        }
    }
}

fn load_sources(cfg: &AgentConfig, node: Option<&k8s::node::Node>) -> Sources {
    match node {
        Some(n) => Sources::from_snapshot(n.cluster.snapshot()),
        None => Sources::load(&cfg.policies, cfg.mesh_config.as_deref()),
    }
}
