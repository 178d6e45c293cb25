//! The node agent in local mode: reads policy files, resolves names, watches cgroups, and keeps
//! the kernel maps equal to what the compiler says. Every change recomputes the whole desired
//! state, so a missed event can only delay an update, never leave a stale rule behind.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use ipnet::IpNet;
use tokio::{sync::mpsc, time::Instant};

use crate::{
    cgroup::{Assignment, Layout},
    datapath::{self, plan, Datapath},
    events::{self, Explainer},
    pods::Pods,
    policy::{self, Desired},
    resolver::{DnsSettings, Resolver},
    sources::{files, Sources},
    status::{Inputs, Status},
};

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub policies: PathBuf,
    pub mesh_config: Option<PathBuf>,
    pub dns: DnsSettings,
    pub allow_cidrs: Vec<IpNet>,
    pub istio_compat: bool,
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
}

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.cgroups.managed)
        .with_context(|| format!("creating cgroup {}", cfg.cgroups.managed.display()))?;
    for ns in &cfg.namespaces {
        let dir = cfg.cgroups.namespace_dir(ns)?;
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating cgroup {}", dir.display()))?;
    }
    let (mut dp, ring) = Datapath::open(&cfg.datapath)?;
    dp.set_flags(if cfg.judge_icmp {
        enforcer_common::tc_flags::JUDGE_ICMP
    } else {
        0
    })?;
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
    let events_task = tokio::spawn(events::run(ring, Arc::clone(&explainer)));
    let mut resolver = Resolver::new(cfg.dns.clone())?;

    let (file_tx, mut file_rx) = mpsc::unbounded_channel();
    let mut watches = vec![files::Watch::PolicyDir(cfg.policies.clone())];
    watches.extend(cfg.mesh_config.iter().cloned().map(files::Watch::File));
    let _file_watcher = files::DirWatcher::new(watches, file_tx)?;
    let (cg_tx, mut cg_rx) = mpsc::unbounded_channel();
    let _cgroup_watcher = files::watch_any(&cfg.cgroups.managed, cg_tx)?;

    let mut sources = load_sources(&cfg);
    let mut assignments = cfg.cgroups.discover().unwrap_or_default();
    let mut generation = 0u64;
    // Compiling is the expensive step (100,000 entries take a while): only when an input changed.
    let mut dirty = true;
    let mut rescan = tokio::time::interval(Duration::from_secs(1));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;

    loop {
        // Resolve before applying, so that a restart never drops answers that are merely unknown yet.
        let names = policy::dns_names(&sources.entries, &sources.workloads, cfg.istio_compat);
        let dns_report = resolver.refresh(&names).await;
        for err in &dns_report.errors {
            log::warn!("{err}");
        }
        if let Some(p) = pods.as_mut() {
            dirty |= p.reconcile(&mut dp);
        }
        if dirty || dns_report.changed {
            let inputs = inputs(&cfg, &assignments, &resolver);
            let desired = sources.compile(&inputs);
            generation += 1;
            let pod_list = pods.as_ref().map(Pods::assignments).unwrap_or_default();
            let complete = apply(&mut dp, &desired, &assignments, &pod_list, &explainer)?;
            if let Some(p) = pods.as_mut() {
                p.mark_ready();
            }
            for note in &desired.notes {
                log::warn!("{note}");
            }
            write_status(&cfg, generation, &sources, &desired, inputs, &resolver);
            // Moved, not cloned: at 100,000 entries this is the agent's largest structure.
            explainer.write().unwrap_or_else(|p| p.into_inner()).desired = Arc::new(desired);
            // After a partial failure, try again at the next tick.
            dirty = !complete;
        }

        let next_dns = resolver
            .next_refresh()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            // The quiet period is waited out inside the branch: a select! branch that lost would
            // drop an event it had already taken.
            Some(()) = file_rx.recv() => {
                files::settle(&mut file_rx, Duration::from_millis(20)).await;
                sources = load_sources(&cfg);
                dirty = true;
            }
            Some(()) = pod_rx.recv() => {
                while pod_rx.try_recv().is_ok() {}
            }
            Some(()) = cg_rx.recv() => {
                while cg_rx.try_recv().is_ok() {}
                dirty |= rediscover(&cfg, &mut assignments);
            }
            _ = rescan.tick() => dirty |= rediscover(&cfg, &mut assignments),
            () = tokio::time::sleep_until(next_dns) => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    events_task.abort();
    log::info!("agent stopping; the pinned programs and maps keep enforcing");
    Ok(())
}

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

fn load_sources(cfg: &AgentConfig) -> Sources {
    Sources::load(&cfg.policies, cfg.mesh_config.as_deref())
}

/// What the compiler needs besides the policy files; kept in the status for `explain`.
fn inputs(
    cfg: &AgentConfig,
    assignments: &BTreeMap<u64, Assignment>,
    resolver: &Resolver,
) -> Inputs {
    let mut namespaces: BTreeSet<String> =
        assignments.values().map(|a| a.namespace.clone()).collect();
    namespaces.extend(cfg.namespaces.iter().cloned());
    let mut dns_servers: Vec<IpAddr> = resolver.servers().to_vec();
    if let Some(server) = cfg.dns.server {
        dns_servers.push(server.ip());
    }
    Inputs {
        policies: cfg.policies.clone(),
        mesh_config: cfg.mesh_config.clone(),
        root_namespace: cfg.root_namespace.clone(),
        istio_compat: cfg.istio_compat,
        allow_cidrs: cfg.allow_cidrs.clone(),
        dns_servers,
        namespaces,
        answers: resolver.answers(),
    }
}

fn apply(
    dp: &mut Datapath,
    desired: &Desired,
    assignments: &BTreeMap<u64, Assignment>,
    pods: &[plan::PodAssignment],
    explainer: &RwLock<Explainer>,
) -> anyhow::Result<bool> {
    dp.ensure_scope_ids(desired.scopes.keys())?;
    let workloads = plan::Workloads {
        cgroups: assignments,
        trees: &BTreeMap::new(),
        pods,
    };
    let plan = plan::build(desired, workloads, dp.scope_ids());
    let started = std::time::Instant::now();
    let report = dp.apply(&plan);
    for err in &report.errors {
        log::error!("datapath: {err}; that entry stays out (fail closed)");
    }
    log::info!(
        "applied: {} cgroups, {} exact + {} CIDR entries (+{} -{}) in {:?}",
        plan.cgroups.len(),
        plan.exact.len(),
        plan.cidr.len(),
        report.added,
        report.removed,
        started.elapsed()
    );
    let mut ex = explainer.write().unwrap_or_else(|p| p.into_inner());
    ex.scopes = dp
        .scope_ids()
        .iter()
        .map(|(ns, id)| (*id, ns.clone()))
        .collect();
    ex.cgroups = assignments
        .iter()
        .map(|(id, a)| (*id, a.path.clone()))
        .collect();
    Ok(report.errors.is_empty())
}

fn write_status(
    cfg: &AgentConfig,
    generation: u64,
    sources: &Sources,
    desired: &Desired,
    inputs: Inputs,
    resolver: &Resolver,
) {
    let status = Status {
        generation,
        service_entries: sources.entries.len(),
        scopes: desired
            .scopes
            .iter()
            .map(|(name, s)| (name.clone(), s.mode.to_string()))
            .collect(),
        problems: sources.problems.clone(),
        notes: desired.notes.clone(),
        dns: resolver.describe(),
        inputs,
    };
    if let Err(err) = status.write(&cfg.status_file) {
        log::warn!("writing status file {}: {err:#}", cfg.status_file.display());
    }
}
