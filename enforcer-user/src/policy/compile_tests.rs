use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::{
    istio::OutboundMode, policy::validate_service_entry, sources::documents::parse_documents,
};

#[path = "compile_export_tests.rs"]
mod export_to;
#[path = "compile_learn_tests.rs"]
mod learn;
#[path = "compile_scope_name_tests.rs"]
mod scope_names;

fn entries(yaml: &str) -> Vec<ServiceEntry> {
    let snap = parse_documents("test.yaml", yaml);
    assert!(snap.problems.is_empty(), "{:?}", snap.problems);
    for se in &snap.service_entries {
        let problems = validate_service_entry(se);
        assert!(problems.is_empty(), "{problems:?}");
    }
    snap.service_entries
}

struct Case {
    ses: Vec<ServiceEntry>,
    mesh: MeshSettings,
    namespaces: BTreeSet<String>,
    dns: BTreeMap<String, Vec<IpAddr>>,
    compat: bool,
    workloads: Vec<crate::istio::WorkloadEntry>,
    sidecars: Vec<crate::istio::Sidecar>,
}

impl Case {
    fn new(yaml: &str) -> Self {
        let snap = parse_documents("test.yaml", yaml);
        Self {
            workloads: snap.workload_entries,
            sidecars: snap.sidecars,
            ses: entries(yaml),
            mesh: MeshSettings {
                mode: OutboundMode::RegistryOnly,
                ..MeshSettings::default()
            },
            namespaces: ["default".to_string()].into(),
            dns: BTreeMap::new(),
            compat: false,
        }
    }
    fn dns(mut self, name: &str, ips: &[&str]) -> Self {
        self.dns.insert(
            name.into(),
            ips.iter().map(|s| s.parse().unwrap()).collect(),
        );
        self
    }
    fn ns(mut self, names: &[&str]) -> Self {
        self.namespaces.extend(names.iter().map(|s| s.to_string()));
        self
    }
    fn compile(&self) -> Desired {
        self.compile_named(scope_name)
    }
    fn compile_named(&self, name_of: fn(&str, Option<&str>) -> String) -> Desired {
        compile_named(
            &Inputs {
                service_entries: &self.ses,
                mesh: &self.mesh,
                namespaces: &self.namespaces,
                dns: &self.dns,
                dns_servers: &[],
                allow_cidrs: &[],
                istio_compat: self.compat,
                sidecars: &self.sidecars,
                workload_entries: &self.workloads,
                root_namespace: "istio-system",
                only_namespaces: None,
                routing: Default::default(),
            },
            name_of,
        )
    }
}

/// The rules of one namespace, as sorted `ip:port/proto` strings.
fn rules(d: &Desired, ns: &str) -> Vec<String> {
    let mut out: Vec<String> = d.scopes[ns].rules.keys().map(ToString::to_string).collect();
    out.sort();
    out
}

fn sorted<const N: usize>(items: [&str; N]) -> Vec<String> {
    let mut out: Vec<String> = items.iter().map(|s| s.to_string()).collect();
    out.sort();
    out
}

const WIKIPEDIA: &str = r#"
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: wikipedia-egress}
spec:
  hosts: [www.wikipedia.org]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 443, name: https, protocol: HTTPS}
  resolution: DNS
"#;

#[test]
fn dns_resolution_allows_every_answer_on_every_port() {
    let c = Case::new(WIKIPEDIA).dns("www.wikipedia.org", &["192.0.2.10", "2001:db8::10"]);
    let d = c.compile();
    assert_eq!(
        rules(&d, "default"),
        sorted([
            "192.0.2.10:80/tcp",
            "192.0.2.10:443/tcp",
            "[2001:db8::10]:80/tcp",
            "[2001:db8::10]:443/tcp"
        ])
    );
    assert_eq!(d.scopes["default"].mode, OutboundMode::RegistryOnly);
    assert_eq!(
        dns_names(&c.ses, &c.workloads, false),
        ["www.wikipedia.org".to_string()].into()
    );
    let origin = d.scopes["default"]
        .rules
        .values()
        .next()
        .unwrap()
        .iter()
        .next()
        .unwrap();
    assert_eq!(origin.service_entry, "default/wikipedia-egress");
    assert_eq!(origin.host.as_deref(), Some("www.wikipedia.org"));
}

#[test]
fn unresolved_host_allows_nothing_and_says_so() {
    let d = Case::new(WIKIPEDIA).compile();
    assert!(rules(&d, "default").is_empty());
    assert_eq!(d.notes.len(), 1);
    assert!(d.notes[0].contains("www.wikipedia.org has no DNS answer yet"));
}

#[test]
fn static_endpoints_with_port_mapping_and_target_port() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mongo}
spec:
  hosts: [mymongodb.somedomain]
  addresses: [192.0.2.0/24]
  ports:
  - {number: 27018, name: mongodb, protocol: MONGO, targetPort: 27017}
  - {number: 53, name: dns, protocol: UDP}
  resolution: STATIC
  endpoints:
  - address: 198.51.100.2
  - address: 198.51.100.3
    ports: {mongodb: 30000}
"#;
    let d = Case::new(yaml).compile();
    assert_eq!(
        rules(&d, "default"),
        sorted([
            "192.0.2.0/24:27018/tcp",
            "198.51.100.2:27017/tcp",
            "198.51.100.3:30000/tcp",
            "192.0.2.0/24:53/udp",
            "198.51.100.2:53/udp",
            "198.51.100.3:53/udp",
        ])
    );
}

#[test]
fn dns_endpoints_resolve_the_endpoint_names_not_the_hosts() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: proxied}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: https, protocol: TLS}]
  resolution: DNS
  endpoints: [{address: lb.example.net}, {address: 203.0.113.9}]
"#;
    let c = Case::new(yaml)
        .dns("lb.example.net", &["203.0.113.8"])
        .dns("api.example.com", &["192.0.2.99"]);
    assert_eq!(
        dns_names(&c.ses, &c.workloads, false),
        ["lb.example.net".to_string()].into()
    );
    assert_eq!(
        rules(&c.compile(), "default"),
        ["203.0.113.8:443/tcp", "203.0.113.9:443/tcp"]
    );
}

#[test]
fn none_with_addresses_uses_cidrs() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: net}
spec:
  hosts: [internal.example.com]
  addresses: [203.0.113.0/24, "2001:db8:1::/48"]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  resolution: NONE
"#;
    let c = Case::new(yaml);
    assert!(dns_names(&c.ses, &c.workloads, false).is_empty());
    assert_eq!(
        rules(&c.compile(), "default"),
        sorted(["203.0.113.0/24:8080/tcp", "2001:db8:1::/48:8080/tcp"])
    );
}

#[test]
fn none_without_addresses_strict_and_compat() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: n}
spec:
  hosts: [db.example.com, "*.example.org"]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
"#;
    let mut c = Case::new(yaml).dns("db.example.com", &["198.51.100.20"]);
    let strict = c.compile();
    assert_eq!(
        rules(&strict, "default"),
        sorted(["198.51.100.20:5432/tcp"])
    );
    assert!(strict
        .notes
        .iter()
        .any(|n| n.contains("wildcard host *.example.org")));
    c.compat = true;
    assert!(dns_names(&c.ses, &c.workloads, true).is_empty());
    assert_eq!(
        rules(&c.compile(), "default"),
        ["0.0.0.0/0:5432/tcp", "::/0:5432/tcp"]
    );
}

#[test]
fn ipv4_mapped_addresses_are_canonical() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: m}
spec: {hosts: [m.example.com], addresses: ["::ffff:192.0.2.4", "::ffff:192.0.2.0/120"], ports: [{number: 80, name: http}], resolution: STATIC}
"#;
    assert_eq!(
        rules(&Case::new(yaml).compile(), "default"),
        sorted(["192.0.2.4:80/tcp", "192.0.2.0/24:80/tcp"])
    );
}

#[test]
fn builtins_dns_servers_and_global_cidrs() {
    let ses = Vec::new();
    let mesh = MeshSettings::default();
    let namespaces: BTreeSet<String> = ["x".to_string()].into();
    let dns = BTreeMap::new();
    let servers: Vec<std::net::SocketAddr> = vec![
        "127.0.0.53:53".parse().unwrap(),
        "198.51.100.53:5353".parse().unwrap(),
    ];
    let cidrs = vec![
        "10.96.0.0/12".parse().unwrap(),
        "::ffff:203.0.113.0/120".parse().unwrap(),
    ];
    let d = compile(&Inputs {
        service_entries: &ses,
        mesh: &mesh,
        namespaces: &namespaces,
        dns: &dns,
        dns_servers: &servers,
        allow_cidrs: &cidrs,
        istio_compat: false,
        sidecars: &[],
        workload_entries: &[],
        root_namespace: "istio-system",
        only_namespaces: None,
        routing: Default::default(),
    });
    assert_eq!(
        d.scopes["x"].mode,
        OutboundMode::AllowAny,
        "Istio's default mode"
    );
    assert_eq!(
        rules(&d, "x"),
        sorted([
            "127.0.0.53:53/tcp",
            "127.0.0.53:53/udp",
            "198.51.100.53:5353/tcp",
            "198.51.100.53:5353/udp"
        ]),
        "each resolver on its own port, not on 53"
    );
    let global: Vec<String> = d.global.iter().map(ToString::to_string).collect();
    assert_eq!(
        global,
        ["10.96.0.0/12", "127.0.0.0/8", "203.0.113.0/24", "::1/128"],
        "an IPv4-mapped --allow-cidr is IPv4, as an entry's address is"
    );
}

/// An IPv6 prefix that covers `::ffff:0:0/96` stays IPv6 and does not match IPv4 (as in
/// Istio; the maps split it, see `net::key_nets`). One within `::ffff:0:0/96` can only mean
/// IPv4 and is taken as the IPv4 prefix it maps (see `canonical_net` for why).
#[test]
fn ipv6_prefixes_match_ipv4_only_within_ipv4_mapped() {
    use crate::policy::decide::decide;
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wide}
spec: {hosts: [wide.example.com], addresses: ["::/1"], ports: [{number: 80, name: http}], resolution: STATIC}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mapped}
spec: {hosts: [mapped.example.com], addresses: ["::ffff:198.51.100.0/120", "::ffff:0:0/96"], ports: [{number: 443, name: https}], resolution: STATIC}
"#;
    let d = Case::new(yaml).compile();
    assert_eq!(
        rules(&d, "default"),
        sorted([
            "::/1:80/tcp",
            "198.51.100.0/24:443/tcp",
            "0.0.0.0/0:443/tcp"
        ])
    );
    let allowed =
        |ip: &str, port| decide(&d, "default", ip.parse().unwrap(), port, L4::Tcp).allowed;
    assert!(allowed("2001:db8::10", 80) && allowed("::1:2", 80));
    assert!(!allowed("198.51.100.10", 80) && !allowed("::ffff:198.51.100.10", 80));
    assert!(allowed("198.51.100.10", 443) && allowed("::ffff:203.0.113.30", 443));
    assert!(!allowed("2001:db8::10", 443));
}

#[test]
fn two_entries_for_one_ip_keep_both_origins() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: one}
spec: {hosts: [a.example.com], ports: [{number: 443, name: https, protocol: TLS}], resolution: DNS}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: two}
spec: {hosts: [b.example.com], ports: [{number: 443, name: https, protocol: TLS}], resolution: DNS}
"#;
    let d = Case::new(yaml)
        .dns("a.example.com", &["192.0.2.50"])
        .dns("b.example.com", &["192.0.2.50"])
        .compile();
    let origins = &d.scopes["default"].rules.values().next().unwrap();
    assert_eq!(
        origins.len(),
        2,
        "removing one entry must not remove the other's access"
    );
}

#[test]
fn workload_selector_selects_workload_entries_with_their_ports() {
    // Seed 002: one name served by WorkloadEntries that share a label.
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external-svc}
spec:
  hosts: [app.internal.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  workloadSelector: {labels: {app: external}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm}
spec: {address: 198.51.100.20, labels: {app: external}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: other-port}
spec: {address: 198.51.100.21, labels: {app: external, tier: edge}, ports: {http: 8080}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: unrelated}
spec: {address: 198.51.100.22, labels: {app: internal}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: elsewhere, namespace: other}
spec: {address: 198.51.100.23, labels: {app: external}}
"#;
    let mut c = Case::new(yaml);
    assert_eq!(
        rules(&c.compile(), "default"),
        sorted(["198.51.100.20:80/tcp", "198.51.100.21:8080/tcp"])
    );
    c.workloads.clear();
    let d = c.compile();
    assert!(rules(&d, "default").is_empty());
    assert!(
        d.notes
            .iter()
            .any(|n| n.contains("matches no WorkloadEntry")),
        "{:?}",
        d.notes
    );
}

#[test]
fn dns_workload_entries_are_resolved() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: by-name}
spec:
  hosts: [app.internal.com]
  ports: [{number: 443, name: https, protocol: TLS}]
  resolution: DNS
  workloadSelector: {labels: {app: vm}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm}
spec: {address: vm1.example.net, labels: {app: vm}}
"#;
    let c = Case::new(yaml).dns("vm1.example.net", &["203.0.113.7"]);
    assert_eq!(
        dns_names(&c.ses, &c.workloads, false),
        ["vm1.example.net".to_string()].into()
    );
    assert_eq!(rules(&c.compile(), "default"), ["203.0.113.7:443/tcp"]);
}

const SHOP: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  ports:
  - {number: 443, name: tls, protocol: TLS}
  - {number: 80, name: http, protocol: HTTP}
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: shop}
spec:
  hosts: [db.shop.internal]
  ports: [{number: 5432, name: pg, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 198.51.100.20}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: web, namespace: shop}
spec:
  workloadSelector: {labels: {app: web}}
  egress:
  - port: {number: 443, protocol: TLS, name: tls}
    hosts: ["./api.example.com"]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: batch, namespace: shop}
spec:
  workloadSelector: {labels: {app: batch}}
  outboundTrafficPolicy: {mode: ALLOW_ANY}
"#;

#[test]
fn selecting_sidecars_get_scopes_of_their_own() {
    let d = Case::new(SHOP)
        .dns("api.example.com", &["203.0.113.30"])
        .compile();
    assert_eq!(
        rules(&d, "shop"),
        sorted([
            "198.51.100.20:5432/tcp",
            "203.0.113.30:443/tcp",
            "203.0.113.30:80/tcp"
        ]),
        "workloads no Sidecar selects: the whole namespace"
    );
    assert_eq!(
        rules(&d, "shop/web"),
        ["203.0.113.30:443/tcp"],
        "the web Sidecar imports api.example.com on its 443 listener only"
    );
    assert_eq!(d.scopes["shop/web"].mode, OutboundMode::RegistryOnly);
    assert_eq!(d.scopes["shop/batch"].mode, OutboundMode::AllowAny);
    assert_eq!(d.scopes["shop/web"].namespace, "shop");
    assert_eq!(d.scopes["shop/web"].sidecar.as_deref(), Some("shop/web"));

    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert_eq!(
        d.scope_for("shop", &labels(&[("app", "web"), ("v", "2")])),
        Some("shop/web")
    );
    assert_eq!(
        d.scope_for("shop", &labels(&[("app", "other")])),
        Some("shop")
    );
    assert_eq!(d.scope_for("shop", &BTreeMap::new()), Some("shop"));
    assert_eq!(d.scope_for("nowhere", &BTreeMap::new()), None);
}

#[test]
fn scope_names_stay_short_and_distinct() {
    assert_eq!(scope_name("shop", None), "shop");
    assert_eq!(scope_name("shop", Some("web")), "shop/web");
    let long = "x".repeat(200);
    let a = scope_name("shop", Some(&long));
    let b = scope_name("shop", Some(&format!("{long}y")));
    assert!(a.len() < 64 && b.len() < 64);
    assert_ne!(a, b);
    assert!(scope_name(&"n".repeat(63), Some("w")).len() < 64);
}

#[test]
fn scope_names_never_split_a_character() {
    // Validation rejects such namespaces; the name must still never panic or grow too long.
    for prefix in ["", "a"] {
        for n in 20..40 {
            let ns = format!("{prefix}{}", "é".repeat(n));
            let name = scope_name(&ns, Some(&"w".repeat(30)));
            assert!(name.len() < 64, "{name}");
            assert!(name.contains("/~"), "{name}");
        }
    }
}
