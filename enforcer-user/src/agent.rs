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
use serde::Serialize;
use tokio::{sync::mpsc, time::Instant};

use crate::{
    cgroup::{Assignment, Layout},
    datapath::{self, plan, Datapath},
    events::{self, Explainer},
    istio::{OutboundMode, ServiceEntry, Sidecar, WorkloadEntry},
    policy::{self, Desired, MeshSettings},
    resolver::{DnsSettings, Resolver},
    sources::{files, Snapshot},
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
    /// Written (JSON) after every apply: generation, problems and notes.
    pub status_file: Option<PathBuf>,
}

/// The sources, validated: what the compiler needs besides DNS answers and cgroups.
struct Sources {
    entries: Vec<ServiceEntry>,
    workloads: Vec<WorkloadEntry>,
    sidecars: Vec<Sidecar>,
    mesh: MeshSettings,
    problems: Vec<String>,
}

#[derive(Serialize)]
struct Status<'a> {
    generation: u64,
    service_entries: usize,
    namespaces: BTreeMap<&'a str, String>,
    problems: &'a [String],
    notes: &'a [String],
    dns: Vec<String>,
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
        if dirty || dns_report.changed {
            let desired = compile(&cfg, &sources, &assignments, &resolver);
            generation += 1;
            let complete = apply(&mut dp, &desired, &assignments, &explainer)?;
            for note in &desired.notes {
                log::warn!("{note}");
            }
            write_status(&cfg, generation, &sources, &desired, &resolver);
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
    let mut snap = files::load_dir(&cfg.policies);
    if let Some(path) = &cfg.mesh_config {
        snap.merge(files::load_mesh_file(path));
    }
    for ignored in &snap.ignored {
        log::info!("{ignored}");
    }
    validate(snap)
}

/// Keeps the valid objects; every problem is logged with its file, object and field.
fn validate(snap: Snapshot) -> Sources {
    let checked = policy::check::check(snap);
    let mut problems: Vec<String> = Vec::new();
    for p in &checked.problems {
        if p.is_error() {
            log::error!("{p}");
            problems.push(p.to_string());
        } else {
            log::warn!("{p}");
            problems.push(format!("warning: {p}"));
        }
    }
    let mut errors = Vec::new();
    let mesh = match checked.mesh.as_slice() {
        [] if checked.mesh_unreadable => {
            errors.push(
                "the mesh config could not be read; enforcing REGISTRY_ONLY until it is fixed"
                    .to_string(),
            );
            MeshSettings {
                mode: OutboundMode::RegistryOnly,
                ..MeshSettings::default()
            }
        }
        [] => MeshSettings::default(),
        [(origin, mesh)] => {
            let mut settings = MeshSettings {
                mode: mesh.mode(),
                ..MeshSettings::default()
            };
            if let Some(list) = &mesh.default_service_export_to {
                let errs = policy::export_to_errors(list);
                if errs.is_empty() {
                    settings.default_export_to = list.clone();
                } else {
                    errors.extend(
                        errs.iter()
                            .map(|e| format!("{origin}: defaultServiceExportTo: {e}")),
                    );
                }
            }
            settings
        }
        many => {
            let origins: Vec<&str> = many.iter().map(|(o, _)| o.as_str()).collect();
            errors.push(format!(
                "more than one mesh config ({}); enforcing REGISTRY_ONLY until one remains",
                origins.join(", ")
            ));
            MeshSettings {
                mode: OutboundMode::RegistryOnly,
                ..MeshSettings::default()
            }
        }
    };
    for e in &errors {
        log::error!("{e}");
    }
    problems.extend(errors);
    log::info!(
        "policy: {} ServiceEntries, {} WorkloadEntries, {} Sidecars, mesh mode {}, {} problems",
        checked.service_entries.len(),
        checked.workload_entries.len(),
        checked.sidecars.len(),
        mesh.mode,
        problems.len()
    );
    Sources {
        entries: checked.service_entries,
        workloads: checked.workload_entries,
        sidecars: checked.sidecars,
        mesh,
        problems,
    }
}

fn compile(
    cfg: &AgentConfig,
    sources: &Sources,
    assignments: &BTreeMap<u64, Assignment>,
    resolver: &Resolver,
) -> Desired {
    let mut namespaces: BTreeSet<String> =
        assignments.values().map(|a| a.namespace.clone()).collect();
    namespaces.extend(cfg.namespaces.iter().cloned());
    let mut dns_servers: Vec<IpAddr> = resolver.servers().to_vec();
    if let Some(server) = cfg.dns.server {
        dns_servers.push(server.ip());
    }
    policy::compile(&policy::Inputs {
        service_entries: &sources.entries,
        mesh: &sources.mesh,
        namespaces: &namespaces,
        dns: &resolver.answers(),
        dns_servers: &dns_servers,
        allow_cidrs: &cfg.allow_cidrs,
        istio_compat: cfg.istio_compat,
        sidecars: &sources.sidecars,
        workload_entries: &sources.workloads,
        root_namespace: &cfg.root_namespace,
    })
}

fn apply(
    dp: &mut Datapath,
    desired: &Desired,
    assignments: &BTreeMap<u64, Assignment>,
    explainer: &RwLock<Explainer>,
) -> anyhow::Result<bool> {
    dp.ensure_scope_ids(desired.scopes.keys())?;
    let plan = plan::build(desired, assignments, dp.scope_ids());
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
    resolver: &Resolver,
) {
    let Some(path) = &cfg.status_file else { return };
    let status = Status {
        generation,
        service_entries: sources.entries.len(),
        namespaces: desired
            .scopes
            .iter()
            .map(|(ns, s)| (ns.as_str(), s.mode.to_string()))
            .collect(),
        problems: &sources.problems,
        notes: &desired.notes,
        dns: resolver.describe(),
    };
    let tmp = path.with_extension("tmp");
    let written = serde_json::to_vec_pretty(&status)
        .map_err(anyhow::Error::from)
        .and_then(|bytes| Ok(std::fs::write(&tmp, bytes)?))
        .and_then(|()| Ok(std::fs::rename(&tmp, path)?));
    if let Err(err) = written {
        log::warn!("writing status file {}: {err:#}", path.display());
    }
}
