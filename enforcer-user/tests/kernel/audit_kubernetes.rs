//! Audit per namespace without a Sidecar: the label egress-enforcer=audit enforces a
//! namespace in AUDIT (everything passes, what REGISTRY_ONLY would refuse is recorded), and
//! changing it to enabled refuses from then on.

use std::time::Duration;

use crate::{
    fake_node::FakeNode,
    harness::{Hosts, Want, World},
    kubernetes::eventually_in,
};

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {egress-enforcer: audit}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  addresses: [198.51.100.10]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
"#;

#[test]
fn a_namespace_labelled_audit_records_what_registry_only_would_refuse() {
    let world = World::new("k8saudit");
    let _hosts = Hosts::new(&world);
    let node = FakeNode::start(&world, CLUSTER);
    let (agent, server) = (&node.agent, &node.server);
    let web = node.pod("shop", "web", 0x2a, "", '5');

    // AUDIT: the unlisted address is reached, and recorded as REGISTRY_ONLY would refuse it.
    eventually_in(agent, &web, "198.51.100.11", 80, Want::Allowed);
    agent.wait_for(Duration::from_secs(5), "the audit record", || {
        agent.denials().iter().any(|d| {
            d["verdict"] == "audit" && d["namespace"] == "shop" && d["dst"] == "198.51.100.11"
        })
    });
    eventually_in(agent, &web, "198.51.100.10", 80, Want::Allowed);
    // The metrics count the pod and the audit verdict.
    let text = agent.metrics();
    assert!(
        text.contains("enforcer_pods{state=\"enforced\"} 1"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("enforcer_verdicts_total{")
                && l.contains("namespace=\"shop\"")
                && l.contains("verdict=\"audit\"")
                && l.contains("hook=\"socket\"")),
        "{text}"
    );

    // The label changed to enabled: REGISTRY_ONLY from the mesh, refused.
    server
        .apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {egress-enforcer: enabled}}")
        .expect("namespace");
    eventually_in(agent, &web, "198.51.100.11", 80, Want::Denied);
    eventually_in(agent, &web, "198.51.100.10", 80, Want::Allowed);
}

/// `explain` in Kubernetes mode asks the agent (no objects exported), by pod; `audit-report`
/// groups what AUDIT recorded, and its ServiceEntry, applied, allows exactly that under
/// REGISTRY_ONLY: the test host receives the audited destination, and not its neighbour.
#[test]
fn explain_asks_the_live_agent_and_the_audit_report_suggests_what_to_allow() {
    let world = World::new("k8sreport");
    let hosts = Hosts::new(&world);
    let node = FakeNode::start(&world, CLUSTER);
    let (agent, server) = (&node.agent, &node.server);
    let web = node.pod("shop", "web", 0x2b, "app: web", '6');
    eventually_in(agent, &web, "198.51.100.11", 80, Want::Allowed);
    agent.wait_for(Duration::from_secs(5), "the audit record", || {
        agent
            .denials()
            .iter()
            .any(|d| d["verdict"] == "audit" && d["pod"] == "web")
    });

    // explain, from the agent's live policy: by pod (its labels), and by namespace alone.
    let (code, text) = agent.explain(&["-n", "shop", "--pod", "web", "198.51.100.10:80"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("pod web: labels app=web"), "{text}");
    assert!(text.contains("policy: the running agent's, live"), "{text}");
    assert!(text.contains("ServiceEntry shop/api"), "{text}");
    assert!(text.contains("kernel: an exact allow entry"), "{text}");
    let (code, text) = agent.explain(&["-n", "shop", "198.51.100.11:80"]);
    assert_eq!(code, 0, "AUDIT allows: {text}");
    assert!(text.contains("AUDIT"), "{text}");
    let (code, text) = agent.explain(&["-n", "shop", "--pod", "nosuch", "198.51.100.11:80"]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("no pod shop/nosuch runs on this node"),
        "{text}"
    );

    // The report names the destination, its port and the pod.
    let out = agent.cli("audit-report").output().expect("audit-report");
    let table = String::from_utf8_lossy(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.contains("198.51.100.11"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        row.starts_with("shop ") && row.contains("80/tcp") && row.contains("web"),
        "{row}"
    );
    assert!(
        !table.contains("198.51.100.10"),
        "allowed, so not in the report: {table}"
    );

    // Its ServiceEntry, applied, and the namespace enforced: the audited destination only.
    let reached_11 = |received: &[String]| {
        received
            .iter()
            .filter(|l| l.starts_with("tcp 198.51.100.11:80 "))
            .count()
    };
    let before = reached_11(&hosts.received());
    let out = agent
        .cli("audit-report")
        .arg("--yaml")
        .output()
        .expect("audit-report --yaml");
    let suggested = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(suggested.contains("- 198.51.100.11"), "{suggested}");
    server
        .apply(&suggested)
        .expect("applying the suggested ServiceEntry");
    server
        .apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {egress-enforcer: enabled}}")
        .expect("namespace");
    // Probed only once enforced: in AUDIT the neighbour would be reached.
    agent.wait_for(Duration::from_secs(10), "shop enforced", || {
        agent.status()["scopes"]["shop"] == "REGISTRY_ONLY"
    });
    eventually_in(agent, &web, "198.51.100.12", 80, Want::Denied);
    eventually_in(agent, &web, "198.51.100.11", 80, Want::Allowed);
    let received = hosts.received();
    assert!(reached_11(&received) > before, "{received:?}");
    assert!(
        !received.iter().any(|l| l.contains("198.51.100.12")),
        "{received:?}"
    );
}
