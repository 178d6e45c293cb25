//! The kernel's side of the agent's loop: compiles the policy when an input changed, plans the
//! maps for where workloads run now, applies the difference, and reports what happened.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, RwLock},
    time::SystemTime,
};

use super::AgentConfig;
use crate::{
    cgroup::Assignment,
    datapath::{
        plan::{self, PodAssignment},
        ApplyError, Datapath, MapPlan,
    },
    dns::proxy::Proxy,
    k8s::{self, node::Node},
    observe::status::{Inputs, RecordsLost, Status},
    observe::{metrics::ApplyFacts, Health, Metrics},
    observe::{output, records::Explainer},
    pods::Pods,
    policy::Desired,
    resolver::Resolver,
    revoke,
    sources::Sources,
};

/// Where workloads run, as the loop last saw it.
pub(super) struct Workloads<'a> {
    /// Local mode's namespace cgroups (and `--cgroup` mappings), each with an exact entry:
    /// it names the cgroup in records, and `enforcer exec` waits for its cgroup's.
    pub cgroups: &'a BTreeMap<u64, Assignment>,
    /// Those of `cgroups` that also claim their descendants (see `Layout::tree_roots`).
    pub trees: &'a BTreeMap<u64, Assignment>,
    /// Kubernetes mode: this node's pods.
    pub node: Option<&'a Node>,
    /// Local pods (`enforcer exec --netns`).
    pub pods: Option<&'a Pods>,
}

/// Owns the datapath and what was last compiled and applied.
pub(super) struct Reconciler {
    pub dp: Datapath,
    explainer: Arc<RwLock<Explainer>>,
    /// Shared, not cloned: at 100,000 entries this is the agent's largest structure.
    desired: Option<Arc<Desired>>,
    /// The compiler's last inputs, for the status file.
    last_inputs: Option<Inputs>,

    generation: u64,
    /// Since when applies have kept failing.
    failing_since: Option<SystemTime>,
    /// Never enforced, whatever claims its ancestors.
    agent_cgroup: Option<u64>,
    /// Sockets destroyed since the start, and what the last revocation sweep could not do.
    revoked: u64,
    revocation_errors: Vec<String>,
    /// Learns from workloads' DNS answers; `Err` says why it is not running.
    pub proxy: Result<Proxy, String>,
    /// The last status written, rewritten when the proxy learned something.
    last_status: Option<Status>,
    /// The proxy's counter of answers that taught something, at the last status.
    reported_answers: u64,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

impl Reconciler {
    pub fn new(
        dp: Datapath,
        explainer: Arc<RwLock<Explainer>>,
        agent_cgroup: Option<u64>,
        proxy: Result<Proxy, String>,
        observed: (Arc<Metrics>, Arc<Health>),
    ) -> Self {
        let (metrics, health) = observed;
        Self {
            metrics,
            health,
            proxy,
            last_status: None,
            reported_answers: 0,
            dp,
            explainer,
            desired: None,
            last_inputs: None,
            generation: 0,
            failing_since: None,
            agent_cgroup,
            revoked: 0,
            revocation_errors: Vec::new(),
        }
    }

    /// Whether the policy needs compiling although no input said so: it never was, or this
    /// node now runs workloads of a namespace it did not compile.
    /// Also when the pods that ServiceEntries select changed (an egress gateway's pod came).
    /// And when a namespace's audit label changed.
    pub fn stale(&self, cfg: &AgentConfig, sources: &Sources, workloads: &Workloads<'_>) -> bool {
        let local = workloads.node.map(Node::local_namespaces);
        self.desired.is_none()
            || self
                .last_inputs
                .as_ref()
                .is_some_and(|i| i.only_namespaces != local)
            || self.last_inputs.as_ref().is_some_and(|i| {
                i.endpoint_pods != endpoint_pods(sources, &running_pods(workloads))
                    || i.audit_namespaces != audit_namespaces(cfg, workloads.node)
            })
    }

    pub fn compile(
        &mut self,
        cfg: &AgentConfig,
        sources: &Sources,
        workloads: &Workloads<'_>,
        resolver: &Resolver,
    ) {
        // The old policy goes before the new one is built: at 100,000 entries two of them
        // would double the agent's peak memory. Records meanwhile are explained without it.
        drop(self.desired.take());
        self.explainer().desired = Arc::default();
        let mut inputs = inputs(cfg, workloads.cgroups, workloads.node, resolver);
        // Pods a ServiceEntry selects are its endpoints; the status keeps them for `explain`.
        inputs.endpoint_pods = endpoint_pods(sources, &running_pods(workloads));
        let mut compiled = sources.compile(&inputs);
        if let Some(n) = workloads.node {
            let unmapped = n.unmapped_mode(&compiled, sources.mesh.mode);
            let bootstrap = n.cluster.bootstrap_rules();
            k8s::add_node_scopes(&mut compiled, unmapped, &bootstrap, &inputs.dns_servers);
        }
        for note in &compiled.notes {
            log::warn!("{note}");
        }
        let compiled = Arc::new(compiled);
        {
            let mut ex = self.explainer();
            ex.desired = Arc::clone(&compiled);
            ex.answers = Arc::new(inputs.answers.clone());
        }
        self.last_inputs = Some(inputs);
        self.desired = Some(compiled);
    }

    /// Plans the maps for the compiled policy and where workloads run, applies them, and
    /// writes the status. Returns whether every entry went in.
    pub fn apply(
        &mut self,
        cfg: &AgentConfig,
        sources: &Sources,
        workloads: &Workloads<'_>,
        resolver: &Resolver,
    ) -> anyhow::Result<bool> {
        let Some(desired) = self.desired.clone() else {
            return Ok(false);
        };
        self.generation += 1;
        let pod_list = running_pods(workloads);
        let trees = all_trees(workloads.trees, workloads.node);
        let planned = plan::Workloads {
            cgroups: workloads.cgroups,
            trees: &trees,
            pods: &pod_list,
            agent: self.agent_cgroup,
        };
        let started = std::time::Instant::now();
        let (errors, before) = apply_plan(&mut self.dp, &desired, planned, &self.explainer)?;
        let complete = errors.is_empty();
        self.metrics.applied(&ApplyFacts {
            took: started.elapsed(),
            errors: &errors,
            generation: self.generation,
            plan: self.dp.applied(),
            capacity: &cfg.datapath,
        });
        self.metrics.sources(sources, desired.notes.len());
        if let Some(n) = workloads.node {
            self.metrics.pods(n);
        }
        self.health.applied(complete);
        self.failing_since = match (complete, self.failing_since) {
            (true, _) => None,
            (false, None) => Some(SystemTime::now()),
            (false, since) => since,
        };
        // New maps (another shape) replace the old ones only once they hold a whole plan.
        if complete && self.dp.migrating() {
            if let Err(err) = self.dp.finish_migration() {
                log::error!("migrating to the new maps: {err:#}; the old programs keep enforcing");
            }
        }
        // Established flows in this network namespace, which no hook judges again. Not while
        // the old programs still enforce the old maps.
        if let Some(before) = before.filter(|b| b != self.dp.applied() && !self.dp.migrating()) {
            let sweep = revoke_flows(
                &before,
                self.dp.applied(),
                &cfg.cgroups.root,
                &self.explainer,
            );
            self.revoked += sweep.destroyed() as u64;
            self.revocation_errors = sweep.errors;
            if sweep.more_errors > 0 {
                self.revocation_errors
                    .push(format!("and {} more", sweep.more_errors));
            }
        }
        if let Ok(proxy) = &mut self.proxy {
            proxy.update(&learning_scopes(&desired, self.dp.scope_ids()));
            if let Some(n) = workloads.node {
                proxy.set_skipped(&n.dns_skip);
            }
        }
        if let Some(inputs) = &self.last_inputs {
            let applied = Applied {
                generation: self.generation,
                errors: errors.iter().map(ToString::to_string).collect(),
                failing_since: self.failing_since,
                records_lost: self.records_lost(),
                revoked: self.revoked,
                revocation_errors: self.revocation_errors.clone(),
            };
            let mut status = status(applied, sources, &desired, inputs.clone(), resolver);
            self.learning_status(&mut status);
            write(cfg, &status);
            self.last_status = Some(status);
        }
        Ok(complete)
    }

    fn learning_status(&mut self, status: &mut Status) {
        match &self.proxy {
            Ok(proxy) => {
                self.reported_answers = proxy.progress();
                let report = proxy.report();
                self.metrics.dns(&report);
                status.dns_learning = Some(report);
            }
            Err(why) => status.dns_learning_error = Some(why.clone()),
        }
    }

    /// Deletes learned addresses long expired, and rewrites the status when the proxy learned
    /// (or failed to) since it was last written.
    pub fn tick_learning(&mut self, cfg: &AgentConfig) {
        let Ok(proxy) = &self.proxy else { return };
        proxy.expire();
        if proxy.progress() == self.reported_answers {
            return;
        }
        if let Some(mut status) = self.last_status.take() {
            self.learning_status(&mut status);
            write(cfg, &status);
            self.last_status = Some(status);
        }
    }

    /// What the kernel's counters and the record output say was lost.
    pub fn records_lost(&self) -> RecordsLost {
        use enforcer_common::counter;
        RecordsLost {
            ring_full: self.dp.counter(counter::RING_FULL),
            rate_limited: self.dp.counter(counter::RATE_LIMITED),
            output_full: crate::observe::output::OUTPUT_DROPPED
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Records name pods by their veth: called after TC programs go on or off veths.
    pub fn veths_changed(&self) {
        let veths = self.dp.veth_addresses();
        self.explainer().workloads.set_veths(veths);
    }

    fn explainer(&self) -> std::sync::RwLockWriteGuard<'_, Explainer> {
        self.explainer.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Local trees and this node's pods' (`--cgroup` mappings are allowed in both modes); a pod
/// wins where both claim a cgroup. Borrowed when only one side has any, as is usual.
fn all_trees<'a>(
    local: &'a BTreeMap<u64, Assignment>,
    node: Option<&'a Node>,
) -> Cow<'a, BTreeMap<u64, Assignment>> {
    match node.map(|n| &n.trees) {
        None => Cow::Borrowed(local),
        Some(pods) if local.is_empty() => Cow::Borrowed(pods),
        Some(pods) => {
            let mut all = local.clone();
            all.extend(pods.iter().map(|(&id, a)| (id, a.clone())));
            Cow::Owned(all)
        }
    }
}

/// `--audit-namespace`, and in Kubernetes mode the namespaces labelled for AUDIT.
fn audit_namespaces(cfg: &AgentConfig, node: Option<&Node>) -> BTreeSet<String> {
    cfg.audit_namespaces
        .iter()
        .cloned()
        .chain(node.map(Node::audit_namespaces).unwrap_or_default())
        .collect()
}

/// Local pods, and this node's pods in Kubernetes mode.
fn running_pods(workloads: &Workloads<'_>) -> Vec<PodAssignment> {
    let mut pods = workloads.pods.map(Pods::assignments).unwrap_or_default();
    if let Some(n) = workloads.node {
        pods.extend(n.addresses.iter().cloned());
    }
    pods
}

/// The pods some ServiceEntry's `workloadSelector` selects (in its namespace), sorted.
fn endpoint_pods(sources: &Sources, pods: &[PodAssignment]) -> Vec<PodAssignment> {
    let mut selected: Vec<PodAssignment> = pods
        .iter()
        .filter(|p| {
            sources.entries.iter().any(|se| {
                se.namespace == p.namespace
                    && se
                        .spec
                        .workload_selector
                        .as_ref()
                        .is_some_and(|w| crate::policy::sidecar::selects(&w.labels, &p.labels))
            })
        })
        .cloned()
        .collect();
    selected.sort_by(|a, b| (&a.namespace, a.ip).cmp(&(&b.namespace, b.ip)));
    selected
}

/// What the compiler needs besides the policy files; kept in the status for `explain`.
fn inputs(
    cfg: &AgentConfig,
    assignments: &BTreeMap<u64, Assignment>,
    node: Option<&Node>,
    resolver: &Resolver,
) -> Inputs {
    let mut namespaces: BTreeSet<String> =
        assignments.values().map(|a| a.namespace.clone()).collect();
    namespaces.extend(cfg.namespaces.iter().cloned());
    if let Some(n) = node {
        namespaces.extend(n.namespaces());
    }
    // `--dns-server` is among them, on its own port.
    let dns_servers = resolver.servers().to_vec();
    Inputs {
        policies: cfg.policies.clone(),
        mesh_config: cfg.mesh_config.clone(),
        root_namespace: cfg.root_namespace.clone(),
        istio_compat: cfg.istio_compat,
        allow_cidrs: cfg.allow_cidrs.clone(),
        dns_servers,
        namespaces,
        answers: resolver.answers(),
        only_namespaces: node.map(Node::local_namespaces),
        egress_gateway_only: cfg.egress_gateway_only,
        gateway_any_namespace: cfg.gateway_any_namespace,
        audit_namespaces: audit_namespaces(cfg, node),
        endpoint_pods: Vec::new(),
    }
}

/// Applies the plan; returns the errors, and what the maps held before where this apply
/// changes them (for the revocation sweep).
fn apply_plan(
    dp: &mut Datapath,
    desired: &Desired,
    workloads: plan::Workloads<'_>,
    explainer: &RwLock<Explainer>,
) -> anyhow::Result<(Vec<ApplyError>, Option<MapPlan>)> {
    let no_id = dp.ensure_scope_ids(desired.scopes.keys());
    let plan = plan::build(desired, workloads, dp.scope_ids());
    // A copy only when something changes: at 100,000 entries it costs a few MiB, for a moment.
    let before = (dp.applied() != &plan).then(|| dp.applied().clone());
    let started = std::time::Instant::now();
    let mut report = dp.apply(&plan);
    dp.reclaim_scope_ids(desired.scopes.keys());
    report
        .errors
        .extend(no_id.into_iter().map(ApplyError::NoScopeId));
    for err in &report.errors {
        log::error!("datapath: {err}; that entry stays out (fail closed)");
    }
    log::info!(
        "applied: {} cgroups, {} cgroup trees, {} exact + {} CIDR entries (+{} -{}) in {:?}",
        plan.cgroups.len(),
        plan.trees.len(),
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
    ex.scopes.insert(
        enforcer_common::FAILED_SCOPE,
        "enforcer.no-scope-id".to_string(),
    );
    let mut now = crate::observe::workload::Workloads::new(
        workloads.cgroups,
        workloads.trees,
        workloads.pods,
    );
    now.keep_found(&ex.workloads);
    now.set_veths(dp.veth_addresses());
    ex.workloads = now;
    Ok((report.errors, before))
}

/// Destroys the sockets of this network namespace that `new` refuses and `old` let pass, and
/// prints a record for each. Its failures are logged and returned, never fatal: the maps
/// already enforce every new connection.
fn revoke_flows(
    old: &MapPlan,
    new: &MapPlan,
    cgroup_root: &std::path::Path,
    explainer: &RwLock<Explainer>,
) -> revoke::Sweep {
    let started = std::time::Instant::now();
    let sweep = revoke::sweep(old, new, cgroup_root);
    let records: Vec<_> = {
        let ex = explainer.read().unwrap_or_else(|p| p.into_inner());
        sweep.revocations.iter().map(|r| ex.revocation(r)).collect()
    };
    output::print(&records);
    for err in &sweep.errors {
        log::error!("revoking established flows: {err}");
    }
    if !sweep.revocations.is_empty() {
        log::info!(
            "revoked {} established sockets ({} AUDIT reports) in {:?}",
            sweep.destroyed(),
            sweep.revocations.len() - sweep.destroyed(),
            started.elapsed()
        );
    }
    sweep
}

/// What the last apply left.
struct Applied {
    generation: u64,
    errors: Vec<String>,
    failing_since: Option<SystemTime>,
    records_lost: RecordsLost,
    revoked: u64,
    revocation_errors: Vec<String>,
}

/// The scopes whose workloads learn from their DNS answers, with their ids in the maps.
fn learning_scopes(
    desired: &Desired,
    ids: &BTreeMap<String, u32>,
) -> Vec<crate::dns::learner::LearningScope> {
    desired
        .scopes
        .iter()
        // ALLOW_ANY reaches everything without learning; the hooks never redirect it.
        .filter(|(_, s)| !s.learn.is_empty() && s.mode != crate::istio::OutboundMode::AllowAny)
        .filter_map(|(name, s)| {
            Some(crate::dns::learner::LearningScope {
                id: *ids.get(name)?,
                name: name.clone(),
                rules: s.learn.clone(),
            })
        })
        .collect()
}

fn write(cfg: &AgentConfig, status: &Status) {
    if let Err(err) = status.write(&cfg.status_file) {
        log::warn!("writing status file {}: {err:#}", cfg.status_file.display());
    }
}

fn status(
    applied: Applied,
    sources: &Sources,
    desired: &Desired,
    inputs: Inputs,
    resolver: &Resolver,
) -> Status {
    let failing_since = applied.failing_since.map(|t| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
    });
    Status {
        generation: applied.generation,
        service_entries: sources.entries.len(),
        scopes: desired
            .scopes
            .iter()
            .map(|(name, s)| (name.clone(), s.mode.to_string()))
            .collect(),
        problems: sources.problems.clone(),
        notes: desired.notes.clone(),
        dns: resolver.describe(),
        apply_errors: applied.errors,
        failing_since,
        records_lost: applied.records_lost,
        revoked: applied.revoked,
        revocation_errors: applied.revocation_errors,
        dns_learning: None,
        dns_learning_error: None,
        metrics_addr: crate::observe::server::BOUND.get().copied(),
        control_socket: crate::observe::control::SERVED.get().cloned(),
        inputs,
    }
}
