//! The agent's own metrics, updated by the loop; the kernel's are collected at each scrape.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{datapath::MapPlan, sources::Sources};

/// A label set of one label.
pub type Label = Vec<(&'static str, String)>;

/// The kinds problems are counted by: the objects', the mesh config's, and documents that are
/// no object.
const PROBLEM_KINDS: [&str; 9] = [
    "ServiceEntry",
    "WorkloadEntry",
    "Sidecar",
    "Gateway",
    "VirtualService",
    "DestinationRule",
    "IstioOperator",
    "mesh",
    "document",
];

/// Every metric the agent serves.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Seconds one apply took (plan, diff, map writes).
    pub apply_seconds: Histogram,
    pub applies: Counter,
    /// Map entries an apply could not write (left out: less is allowed, never more), by map
    /// and cause.
    pub apply_errors: Family<Vec<(&'static str, String)>, Counter>,
    /// 1 while applies keep failing.
    pub applies_failing: Gauge,
    pub policy_generation: Gauge,
    /// Valid objects by kind.
    pub objects: Family<Label, Gauge>,
    /// Problems in the sources, by severity and the kind of object (or `mesh`, `document`).
    pub problems: Family<Vec<(&'static str, String)>, Gauge>,
    /// Notes of the compiler (unresolved names, skipped routes).
    pub notes: Gauge,
    /// Refusal records the agent's output did not take.
    pub output_dropped: Counter,
    /// Records made, by namespace, verdict, reason code and hook: refusals, AUDIT reports and
    /// revocations (the kernel's `verdicts` count every decision; these, what was reported).
    pub records: Family<Vec<(&'static str, String)>, Counter>,
    /// DNS learning (the proxy's counters), by what is counted.
    pub dns: Family<Vec<(&'static str, String)>, Counter>,
    /// Addresses learned from workloads' answers now in the kernel.
    pub dns_learned: Gauge,
    /// The agent's own lookups of ServiceEntry hosts, by result.
    pub resolver_lookups: Family<Label, Counter>,
    /// Names it resolves, and their addresses (`current`, or superseded and `in_grace`).
    pub resolver_names: Gauge,
    pub resolver_addresses: Family<Label, Gauge>,
    /// Kubernetes mode: this node's pods by state (`enforced`, `unenforced`, the kubelet
    /// root's `unmapped`), and enforced pods still without TC programs.
    pub pods: Family<Label, Gauge>,
    pub pods_tc_pending: Gauge,
    /// How long pods ran unmapped (their cgroup there, the API server's pod not yet), each
    /// observed when the pod is mapped; and the oldest still unmapped.
    pub pod_unmapped_seconds: Histogram,
    pub pods_unmapped_oldest_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Entries the agent keeps in each map, and the map's capacity.
    pub map_entries: Family<Label, Gauge>,
    pub map_capacity: Family<Label, Gauge>,
}

/// What one apply did, for [`Metrics::applied`].
pub struct ApplyFacts<'a> {
    pub took: Duration,
    pub errors: &'a [crate::datapath::ApplyError],
    pub generation: u64,
    pub plan: &'a MapPlan,
    pub capacity: &'a crate::datapath::Options,
}

impl Metrics {
    /// The metrics, with the kernel's read from the maps pinned under `pin_root`.
    pub fn new(pin_root: PathBuf) -> Arc<Self> {
        let mut registry = Registry::with_prefix("enforcer");
        let buckets = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];
        let m = Self {
            apply_seconds: Histogram::new(buckets),
            applies: Counter::default(),
            apply_errors: Family::default(),
            applies_failing: Gauge::default(),
            policy_generation: Gauge::default(),
            objects: Family::default(),
            problems: Family::default(),
            notes: Gauge::default(),
            output_dropped: Counter::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            records: Family::default(),
            dns: Family::default(),
            dns_learned: Gauge::default(),
            resolver_lookups: Family::default(),
            resolver_names: Gauge::default(),
            resolver_addresses: Family::default(),
            pods: Family::default(),
            pods_tc_pending: Gauge::default(),
            pod_unmapped_seconds: Histogram::new([
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
            pods_unmapped_oldest_seconds: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "dns",
            "The DNS proxy's queries, upstream failures, SERVFAILs sent, overloads, answers that taught, and learning failures by kind",
            m.dns.clone(),
        );
        registry.register(
            "dns_learned_addresses",
            "Addresses learned from workloads' DNS answers, in the kernel now",
            m.dns_learned.clone(),
        );
        registry.register(
            "resolver_lookups",
            "The agent's lookups of ServiceEntry hosts, by result (answered, empty, timeout, servfail, refused, failed); a failure keeps the last answer",
            m.resolver_lookups.clone(),
        );
        registry.register(
            "resolver_names",
            "Host names the agent resolves",
            m.resolver_names.clone(),
        );
        registry.register(
            "resolver_addresses",
            "Their addresses: current, or superseded and kept in grace",
            m.resolver_addresses.clone(),
        );
        registry.register(
            "pods",
            "Kubernetes mode: this node's pod cgroups by state",
            m.pods.clone(),
        );
        registry.register(
            "pods_tc_pending",
            "Kubernetes mode: enforced pods whose veth has no TC programs yet",
            m.pods_tc_pending.clone(),
        );
        registry.register(
            "pod_unmapped_seconds",
            "Kubernetes mode: how long a pod ran under the unmapped scope before the agent mapped it",
            m.pod_unmapped_seconds.clone(),
        );
        registry.register(
            "pods_unmapped_oldest_seconds",
            "Kubernetes mode: how long the oldest pod still unmapped has run so (0: none)",
            m.pods_unmapped_oldest_seconds.clone(),
        );
        registry.register(
            "records",
            "Refusal records, AUDIT reports and revocations made, by namespace, verdict, reason code and hook",
            m.records.clone(),
        );
        registry.register(
            "map_entries",
            "Entries the agent keeps in a kernel map",
            m.map_entries.clone(),
        );
        registry.register(
            "map_capacity",
            "Capacity of a kernel map",
            m.map_capacity.clone(),
        );
        registry.register(
            "apply_seconds",
            "Time one apply of the policy to the kernel maps took",
            m.apply_seconds.clone(),
        );
        registry.register("applies", "Applies of the policy", m.applies.clone());
        registry.register(
            "apply_errors",
            "Map entries applies could not write (left out: fail closed)",
            m.apply_errors.clone(),
        );
        registry.register(
            "applies_failing",
            "1 while the last apply left entries out",
            m.applies_failing.clone(),
        );
        registry.register(
            "policy_generation",
            "Policy generation last applied",
            m.policy_generation.clone(),
        );
        registry.register("objects", "Valid policy objects by kind", m.objects.clone());
        registry.register(
            "problems",
            "Problems found in the policy sources, by severity and the kind of object",
            m.problems.clone(),
        );
        registry.register(
            "compiler_notes",
            "What the compiler noted (names without answers, routes not redirected)",
            m.notes.clone(),
        );
        registry.register(
            "records_output_dropped",
            "Refusal records the agent's output did not take",
            m.output_dropped.clone(),
        );
        registry.register_collector(Box::new(super::kernel::KernelCollector::new(pin_root)));
        Arc::new(Self { registry, ..m })
    }

    /// After each apply.
    pub fn applied(&self, a: &ApplyFacts<'_>) {
        self.apply_seconds.observe(a.took.as_secs_f64());
        self.applies.inc();
        for err in a.errors {
            let (map, cause) = err.labels();
            let labels = vec![("map", map.to_string()), ("cause", cause.to_string())];
            self.apply_errors.get_or_create(&labels).inc();
        }
        self.applies_failing.set(i64::from(!a.errors.is_empty()));
        self.policy_generation
            .set(i64::try_from(a.generation).unwrap_or(i64::MAX));
        let p = a.plan;
        let c = a.capacity;
        for (map, entries, capacity) in [
            ("allow_exact", p.exact.len(), Some(c.max_exact)),
            ("allow_cidr", p.cidr.len(), Some(c.max_cidr)),
            ("cgroups", p.cgroups.len(), None),
            ("cgroup_trees", p.trees.len(), None),
            ("pod_scopes", p.pods.len(), None),
            ("redirects", p.redirects.len(), None),
        ] {
            let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            self.map_entries
                .get_or_create(&label("map", map))
                .set(gauge(entries));
            if let Some(cap) = capacity {
                self.map_capacity
                    .get_or_create(&label("map", map))
                    .set(i64::from(cap));
            }
        }
        // The output counts on its own; the counter catches up.
        let dropped =
            crate::observe::output::OUTPUT_DROPPED.load(std::sync::atomic::Ordering::Relaxed);
        self.output_dropped
            .inc_by(dropped.saturating_sub(self.output_dropped.get()));
    }

    /// From the DNS proxy's report (counters since the agent started).
    pub fn dns(&self, r: &crate::dns::proxy::ProxyReport) {
        let mut totals = vec![
            ("queries", r.queries),
            ("upstream_failures", r.upstream_failures),
            ("servfail_sent", r.servfail_sent),
            ("overloaded", r.overloaded),
            ("learned_answers", r.learned_answers),
        ];
        for (kind, n) in &r.learn_failures {
            let failure = format!("learn_failure_{kind}");
            catch_up(&self.dns.get_or_create(&label("what", failure)), *n);
        }
        for (what, n) in totals.drain(..) {
            catch_up(&self.dns.get_or_create(&label("what", what)), n);
        }
        self.dns_learned
            .set(i64::try_from(r.learned_keys).unwrap_or(i64::MAX));
    }

    /// Kubernetes mode, after each apply.
    pub fn pods(&self, node: &crate::k8s::node::Node) {
        use crate::k8s::workloads::{UNENFORCED, UNMAPPED};
        let (unmapped, oldest) = node.unmapped_pods();
        let mut by_state: BTreeMap<&str, i64> = BTreeMap::from([
            ("enforced", 0),
            ("unenforced", 0),
            ("unmapped", i64::try_from(unmapped).unwrap_or(i64::MAX)),
        ]);
        for a in node.trees.values() {
            let state = match a.namespace.as_str() {
                UNENFORCED => "unenforced",
                // The kubelet's roots, where unmapped pods' cgroups are: counted above.
                UNMAPPED => continue,
                _ => "enforced",
            };
            *by_state.entry(state).or_default() += 1;
        }
        for (state, n) in by_state {
            self.pods.get_or_create(&label("state", state)).set(n);
        }
        self.pods_unmapped_oldest_seconds.set(oldest.as_secs_f64());
        self.pods_tc_pending
            .set(i64::try_from(node.tc_pending()).unwrap_or(i64::MAX));
    }

    /// The agent's own lookups: their results, and what it holds after them.
    pub fn resolver(&self, lookups: &[&'static str], held: crate::resolver::Held) {
        for result in lookups {
            self.resolver_lookups
                .get_or_create(&label("result", *result))
                .inc();
        }
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.resolver_names.set(gauge(held.names));
        for (state, n) in [("current", held.current), ("in_grace", held.in_grace)] {
            self.resolver_addresses
                .get_or_create(&label("state", state))
                .set(gauge(n));
        }
    }

    /// The unmapped windows that closed.
    pub fn unmapped_windows(&self, windows: &[Duration]) {
        for w in windows {
            self.pod_unmapped_seconds.observe(w.as_secs_f64());
        }
    }

    /// Counts one record as it goes out.
    pub fn record(&self, r: &crate::observe::records::DenyRecord) {
        let labels = vec![
            ("namespace", r.namespace.clone()),
            ("verdict", r.verdict.to_string()),
            ("reason", r.reason_code.to_string()),
            ("hook", r.hook.to_string()),
        ];
        self.records.get_or_create(&labels).inc();
    }

    /// After each load of the sources.
    pub fn sources(&self, sources: &Sources, notes: usize) {
        for (kind, n) in [
            ("ServiceEntry", sources.entries.len()),
            ("WorkloadEntry", sources.workloads.len()),
            ("Sidecar", sources.sidecars.len()),
            ("Gateway", sources.gateways.len()),
            ("VirtualService", sources.virtual_services.len()),
            ("DestinationRule", sources.destination_rules.len()),
        ] {
            self.objects
                .get_or_create(&label("kind", kind))
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        // Every (severity, kind) is set, to zero when none is left, so that a fixed problem
        // does not stay counted.
        let mut counts: BTreeMap<(&str, &str), i64> = BTreeMap::new();
        for severity in ["error", "warning"] {
            for kind in PROBLEM_KINDS {
                counts.insert((severity, kind), 0);
            }
        }
        for p in &sources.diagnostics {
            let severity = if p.is_error() { "error" } else { "warning" };
            let kind = p.object.split(' ').next().unwrap_or_default();
            let kind = PROBLEM_KINDS
                .into_iter()
                .find(|k| *k == kind)
                .unwrap_or("document");
            *counts.entry((severity, kind)).or_default() += 1;
        }
        // What is not an object's own problem is the mesh config's (unreadable, several).
        let mesh = sources
            .problems
            .len()
            .saturating_sub(sources.diagnostics.len());
        *counts.entry(("error", "mesh")).or_default() += i64::try_from(mesh).unwrap_or(i64::MAX);
        for ((severity, kind), n) in counts {
            let labels = vec![
                ("severity", severity.to_string()),
                ("kind", kind.to_string()),
            ];
            self.problems.get_or_create(&labels).set(n);
        }
        self.notes.set(i64::try_from(notes).unwrap_or(i64::MAX));
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Brings a counter up to a total counted elsewhere (never down: a restart of what counts
/// starts a new series in Prometheus's eyes only through the agent's own restart).
fn catch_up(counter: &Counter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

/// A label set of one label.
pub fn label(key: &'static str, value: impl Into<String>) -> Label {
    vec![(key, value.into())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_metrics_are_served_with_their_help() {
        let m = Metrics::new(PathBuf::from("/nonexistent"));
        m.apply_seconds.observe(0.002);
        m.applies.inc();
        m.objects
            .get_or_create(&label("kind", "ServiceEntry"))
            .set(3);
        let text = m.encode().expect("encoding");
        assert!(
            text.contains("enforcer_apply_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(text.contains("enforcer_applies_total 1"), "{text}");
        assert!(
            text.contains("enforcer_objects{kind=\"ServiceEntry\"} 3"),
            "{text}"
        );
        // Without pinned maps the kernel's metrics say so, and nothing else of theirs.
        assert!(text.contains("enforcer_kernel_maps_readable 0"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn problems_count_by_severity_and_kind_and_go_back_to_zero() {
        let m = Metrics::new(PathBuf::from("/nonexistent"));
        let bad = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: bad, namespace: shop}\nspec: {hosts: [a.example.com], ports: [{number: 70000, name: x}], resolution: DNS}\n";
        let sources = |yaml: &str| {
            crate::sources::Sources::from_snapshot(crate::sources::documents::parse_documents(
                "t.yaml", yaml,
            ))
        };
        let line = "enforcer_problems{severity=\"error\",kind=\"ServiceEntry\"}";
        let value = |m: &Metrics| {
            let text = super::super::text::classic(&m.encode().expect("encoding"));
            text.lines()
                .find_map(|l| l.strip_prefix(line).map(str::trim).map(str::to_string))
                .unwrap_or_else(|| panic!("{line} in\n{text}"))
        };
        m.sources(&sources(bad), 0);
        assert_eq!(value(&m), "1");
        m.sources(&sources(""), 0);
        assert_eq!(value(&m), "0");
    }

    #[test]
    fn lookups_count_by_result_and_addresses_by_state() {
        let m = Metrics::new(PathBuf::from("/nonexistent"));
        let held = crate::resolver::Held {
            names: 2,
            current: 3,
            in_grace: 1,
        };
        m.resolver(&["answered", "servfail", "answered"], held);
        let text = super::super::text::classic(&m.encode().expect("encoding"));
        for line in [
            "enforcer_resolver_lookups_total{result=\"answered\"} 2",
            "enforcer_resolver_lookups_total{result=\"servfail\"} 1",
            "enforcer_resolver_names 2",
            "enforcer_resolver_addresses{state=\"current\"} 3",
            "enforcer_resolver_addresses{state=\"in_grace\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    /// Every `enforcer_*` name in deploy/monitoring's dashboard and alerts is a sample the
    /// agent serves: a renamed metric breaks this test, not a dashboard in production.
    #[test]
    fn the_dashboard_and_the_alerts_use_served_metrics() {
        let m = Metrics::new(PathBuf::from("/nonexistent"));
        m.map_entries.get_or_create(&label("map", "x")).set(1);
        m.map_capacity.get_or_create(&label("map", "x")).set(1);
        m.objects.get_or_create(&label("kind", "x")).set(1);
        m.problems
            .get_or_create(&vec![
                ("severity", "x".to_string()),
                ("kind", "y".to_string()),
            ])
            .set(1);
        m.apply_seconds.observe(0.1);
        m.pods.get_or_create(&label("state", "x")).set(1);
        m.resolver(&["x"], crate::resolver::Held::default());
        let text = m.encode().expect("encoding");
        let mut served: Vec<String> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_string)
            .collect();
        served.extend(super::super::kernel::METRICS.iter().map(|(name, counter)| {
            let total = if *counter { "_total" } else { "" };
            format!("enforcer_{name}{total}")
        }));
        for (file, text) in [
            (
                "dashboard.json",
                include_str!("../../../deploy/monitoring/dashboard.json"),
            ),
            (
                "enforcer.rules.yml",
                include_str!("../../../deploy/monitoring/enforcer.rules.yml"),
            ),
        ] {
            let used = names(text);
            assert!(!used.is_empty(), "{file} names no metric");
            for name in used {
                assert!(
                    served.contains(&name),
                    "{file}: {name} is not served: {served:?}"
                );
            }
        }
    }

    /// `enforcer_` names in a text.
    fn names(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("enforcer_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            out.push(tail[..end].to_string());
            rest = &tail[end..];
        }
        out.sort();
        out.dedup();
        out
    }
}
