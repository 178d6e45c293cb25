//! Unit tests of `plan`.

use std::path::PathBuf;

use super::*;
use crate::policy::{Origin, Rule, ScopePolicy, L4};

#[test]
fn keys_use_scope_ids_and_mapped_ipv4() {
    let mut desired = Desired::default();
    let mut rules = BTreeMap::new();
    rules.insert(
        Rule::host(L4::Udp, 53, "192.0.2.1".parse().unwrap()),
        vec![std::sync::Arc::new(Origin::builtin("t"))],
    );
    rules.insert(
        Rule::new(L4::Tcp, 443, "2001:db8::/32".parse().unwrap()),
        Vec::new(),
    );
    desired.scopes.insert(
        "a".into(),
        ScopePolicy {
            namespace: "a".into(),
            mode: OutboundMode::RegistryOnly,
            rules,
            ..ScopePolicy::default()
        },
    );
    desired.scopes.insert(
        "b".into(),
        ScopePolicy {
            namespace: "b".into(),
            mode: OutboundMode::Audit,
            ..ScopePolicy::default()
        },
    );
    // Workloads in b labelled app=db have a scope of their own.
    desired.scopes.insert(
        "b/db".into(),
        ScopePolicy {
            namespace: "b".into(),
            mode: OutboundMode::AllowAny,
            ..ScopePolicy::default()
        },
    );
    let mut idle_rules = BTreeMap::new();
    idle_rules.insert(
        Rule::host(L4::Tcp, 80, "198.51.100.7".parse().unwrap()),
        Vec::new(),
    );
    desired.scopes.insert(
        "b/idle".into(),
        ScopePolicy {
            namespace: "b".into(),
            rules: idle_rules,
            ..ScopePolicy::default()
        },
    );
    let db = BTreeMap::from([("app".to_string(), "db".to_string())]);
    desired
        .selectors
        .insert("b".into(), vec![(db.clone(), "b/db".into())]);
    desired.global.insert("127.0.0.0/8".parse().unwrap());
    let cgroups = BTreeMap::from([
        (
            100,
            Assignment {
                namespace: "a".into(),
                labels: db.clone(),
                path: PathBuf::from("/x/a"),
                pod: None,
            },
        ),
        (
            200,
            Assignment {
                namespace: "b".into(),
                labels: BTreeMap::new(),
                path: PathBuf::from("/x/b"),
                pod: None,
            },
        ),
        (
            201,
            Assignment {
                namespace: "b".into(),
                labels: db.clone(),
                path: PathBuf::from("/x/b/app=db"),
                pod: None,
            },
        ),
        (
            300,
            Assignment {
                namespace: "unknown".into(),
                labels: BTreeMap::new(),
                path: PathBuf::from("/x/u"),
                pod: None,
            },
        ),
    ]);
    let ids = BTreeMap::from([
        ("a".to_string(), 7),
        ("b".to_string(), 9),
        ("b/db".to_string(), 11),
        ("b/idle".to_string(), 12),
        (UNENFORCED.to_string(), 13),
    ]);
    let trees = BTreeMap::from([(
        400,
        Assignment {
            namespace: "b".into(),
            labels: db.clone(),
            path: PathBuf::from("/kubepods/pod-x"),
            pod: None,
        },
    )]);
    let workloads = Workloads {
        cgroups: &cgroups,
        trees: &trees,
        pods: &[],
        agent: Some(500),
    };
    let plan = build(&desired, workloads, &ids);
    assert_eq!(
        plan.trees[&400],
        CgroupScope {
            scope: 11,
            mode: mode::ALLOW_ANY
        },
        "a pod's cgroup tree gets its workload's scope"
    );

    assert_eq!(
        plan.cgroups[&100],
        CgroupScope {
            scope: 7,
            mode: mode::REGISTRY_ONLY
        }
    );
    assert_eq!(
        plan.cgroups[&200],
        CgroupScope {
            scope: 9,
            mode: mode::AUDIT
        }
    );
    assert_eq!(
        plan.cgroups[&201],
        CgroupScope {
            scope: 11,
            mode: mode::ALLOW_ANY
        },
        "a workload a Sidecar selects gets that Sidecar's scope"
    );
    assert_eq!(
        plan.cgroups[&100].scope, 7,
        "labels only matter where a Sidecar selects them"
    );
    assert!(!plan.cgroups.contains_key(&300), "a namespace no scope has");
    assert_eq!(
        plan.cgroups[&500],
        CgroupScope {
            scope: 13,
            mode: mode::ALLOW_ANY
        },
        "the agent's own cgroup is exempt, whatever its ancestors"
    );

    assert!(
        plan.exact.iter().all(|k| k.scope != 12),
        "no workload runs in b/idle: its rules stay out of the maps"
    );
    let exact = plan.exact.iter().next().unwrap();
    assert_eq!((exact.scope, exact.port, exact.proto), (7, 53, proto::UDP));
    assert_eq!(
        exact.addr,
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 1]
    );

    let cidrs: Vec<(u32, u32, u16)> = plan
        .cidr
        .iter()
        .map(|(len, k)| (*len, k.scope, k.port))
        .collect();
    assert_eq!(cidrs, [(64 + 32, 7, 443), (64 + 104, GLOBAL_SCOPE, 0)]);
}

/// A REGISTRY_ONLY scope of namespace `ns` with `rules`, asked for by nothing in particular.
fn registry_only(ns: &str, rules: impl IntoIterator<Item = Rule>) -> ScopePolicy {
    ScopePolicy {
        namespace: ns.into(),
        mode: OutboundMode::RegistryOnly,
        rules: rules.into_iter().map(|r| (r, Vec::new())).collect(),
        ..ScopePolicy::default()
    }
}

/// The plan for one cgroup (id 100) of namespace `ns`, whose scope has id `id`.
fn plan_of_one_cgroup(desired: &Desired, ns: &str, id: u32) -> MapPlan {
    let cgroups = BTreeMap::from([(
        100,
        Assignment {
            namespace: ns.into(),
            labels: BTreeMap::new(),
            path: PathBuf::from(format!("/x/{ns}")),
            pod: None,
        },
    )]);
    let workloads = Workloads {
        cgroups: &cgroups,
        trees: &BTreeMap::new(),
        pods: &[],
        agent: None,
    };
    build(desired, workloads, &BTreeMap::from([(ns.to_string(), id)]))
}

fn key(scope: u32, port: u16, proto: u8, ip: &str) -> PolicyKey {
    PolicyKey {
        scope,
        port,
        proto,
        pad: 0,
        addr: key_bytes(ip.parse().unwrap()),
    }
}

fn cidr(scope: u32, port: u16, proto: u8, net: &str) -> (u32, PolicyKey) {
    let net: ipnet::IpNet = net.parse().unwrap();
    (
        POLICY_KEY_HEADER_BITS + u32::from(key_prefix_len(&net)),
        key(scope, port, proto, &net.network().to_string()),
    )
}

#[test]
fn allows_judges_keys_as_the_kernel_looks_them_up() {
    let mut plan = MapPlan::default();
    plan.exact.insert(key(7, 443, proto::TCP, "198.51.100.10"));
    plan.cidr
        .insert(cidr(7, 5432, proto::TCP, "203.0.113.0/25"));
    plan.cidr.insert(cidr(7, 53, proto::UDP, "2001:db8::/33"));
    plan.cidr
        .insert(cidr(GLOBAL_SCOPE, 0, proto::ANY, "127.0.0.0/8"));

    assert!(plan.allows(&key(7, 443, proto::TCP, "198.51.100.10")));
    assert!(
        !plan.allows(&key(7, 443, proto::UDP, "198.51.100.10")),
        "protocol"
    );
    assert!(
        !plan.allows(&key(7, 444, proto::TCP, "198.51.100.10")),
        "port"
    );
    assert!(
        !plan.allows(&key(8, 443, proto::TCP, "198.51.100.10")),
        "scope"
    );
    assert!(
        !plan.allows(&key(7, 443, proto::TCP, "198.51.100.11")),
        "address"
    );

    assert!(plan.allows(&key(7, 5432, proto::TCP, "203.0.113.127")));
    assert!(
        !plan.allows(&key(7, 5432, proto::TCP, "203.0.113.128")),
        "outside /25"
    );
    assert!(!plan.allows(&key(7, 5433, proto::TCP, "203.0.113.1")));
    assert!(plan.allows(&key(7, 53, proto::UDP, "2001:db8:7fff::1")));
    assert!(
        !plan.allows(&key(7, 53, proto::UDP, "2001:db8:8000::1")),
        "outside /33"
    );

    // The global entries: any scope, port and protocol.
    assert!(plan.allows(&key(9, 8080, proto::UDP, "127.1.2.3")));
    assert!(plan.allows(&key(FAILED_SCOPE, 1, proto::TCP, "127.0.0.1")));
    assert!(!plan.allows(&key(9, 8080, proto::UDP, "128.0.0.1")));
    // An IPv4 rule covers the IPv4-mapped IPv6 address (the same key bytes).
    assert!(plan.allows(&key(7, 443, proto::TCP, "::ffff:198.51.100.10")));
    assert!(!MapPlan::default().allows(&key(7, 443, proto::TCP, "198.51.100.10")));
}

#[test]
fn allows_agrees_with_build() {
    let mut desired = Desired::default();
    desired.scopes.insert(
        "a".into(),
        registry_only(
            "a",
            [Rule::new(L4::Tcp, 443, "198.51.100.0/24".parse().unwrap())],
        ),
    );
    desired.global.insert("::1/128".parse().unwrap());
    let plan = plan_of_one_cgroup(&desired, "a", 3);
    assert!(plan.allows(&key(3, 443, proto::TCP, "198.51.100.99")));
    assert!(!plan.allows(&key(3, 443, proto::TCP, "198.51.101.1")));
    assert!(plan.allows(&key(3, 22, proto::TCP, "::1")));
}

#[test]
fn a_scope_without_an_id_fails_closed() {
    let mut desired = Desired::default();
    desired.scopes.insert(
        "open".into(),
        ScopePolicy {
            namespace: "open".into(),
            mode: OutboundMode::AllowAny,
            ..ScopePolicy::default()
        },
    );
    let cgroups = BTreeMap::from([(
        100,
        Assignment {
            namespace: "open".into(),
            labels: BTreeMap::new(),
            path: PathBuf::from("/x/open"),
            pod: None,
        },
    )]);
    let pods = [PodAssignment {
        ip: "203.0.113.5".parse().unwrap(),
        namespace: "open".into(),
        labels: BTreeMap::new(),
        pod: None,
    }];
    let workloads = Workloads {
        cgroups: &cgroups,
        trees: &BTreeMap::new(),
        pods: &pods,
        agent: None,
    };
    let plan = build(&desired, workloads, &BTreeMap::new());
    assert_eq!(plan.cgroups[&100], FAILED, "refused, not unenforced");
    assert_eq!(plan.pods.values().next(), Some(&FAILED));
    assert_eq!(plan.scope_ids_in_use(), BTreeSet::from([FAILED_SCOPE]));
}

#[test]
fn a_namespace_without_workloads_on_this_node_costs_no_entries() {
    let mut desired = Desired::default();
    desired.scopes.insert(
        "elsewhere".into(),
        registry_only(
            "elsewhere",
            [Rule::host(L4::Tcp, 443, "198.51.100.7".parse().unwrap())],
        ),
    );
    let ids = BTreeMap::from([("elsewhere".to_string(), 3)]);
    let none = BTreeMap::new();
    let workloads = Workloads {
        cgroups: &none,
        trees: &none,
        pods: &[],
        agent: None,
    };
    assert!(build(&desired, workloads, &ids).exact.is_empty());
    let here = BTreeMap::from([(
        7,
        Assignment {
            namespace: "elsewhere".into(),
            labels: BTreeMap::new(),
            path: PathBuf::from("/x/e"),
            pod: None,
        },
    )]);
    let workloads = Workloads {
        cgroups: &here,
        ..workloads
    };
    assert_eq!(build(&desired, workloads, &ids).exact.len(), 1);
}

#[test]
fn ipv6_prefixes_never_key_ipv4() {
    let mut desired = Desired::default();
    desired.scopes.insert(
        "a".into(),
        registry_only("a", [Rule::new(L4::Tcp, 5432, "::/1".parse().unwrap())]),
    );
    desired.global.insert("::/64".parse().unwrap());
    let plan = plan_of_one_cgroup(&desired, "a", 7);
    // The address part of each trie entry, as a prefix.
    let covers = |ip: &str| -> Vec<u32> {
        let ip = std::net::Ipv6Addr::from(key_bytes(ip.parse().unwrap()));
        plan.cidr
            .iter()
            .filter(|(len, k)| {
                let len = u8::try_from(len - POLICY_KEY_HEADER_BITS).unwrap();
                ipnet::Ipv6Net::new(k.addr.into(), len)
                    .unwrap()
                    .contains(&ip)
            })
            .map(|(_, k)| k.scope)
            .collect::<BTreeSet<u32>>()
            .into_iter()
            .collect()
    };
    assert_eq!(plan.cidr.len(), 95 + 32);
    assert!(covers("198.51.100.10").is_empty());
    assert!(covers("0.0.0.0").is_empty());
    assert_eq!(covers("2001:db8::10"), [7]);
    assert_eq!(
        covers("::1:2:3:4"),
        BTreeSet::from([GLOBAL_SCOPE, 7])
            .into_iter()
            .collect::<Vec<_>>()
    );
}
