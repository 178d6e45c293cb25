//! Audit per namespace without a Sidecar: the label egress-enforcer=audit enforces a
//! namespace in AUDIT (everything passes, what REGISTRY_ONLY would refuse is recorded), and
//! changing it to enabled refuses from then on.

use std::time::Duration;

use enforcer_testkit::apiserver::FakeApiServer;

use crate::{
    harness::{Agent, Dns, Hosts, Want, World},
    kubernetes::{eventually_in, uid, KubeletTree, MESH_REGISTRY_ONLY},
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
    let dns = Dns::new(&world, 60, &[]);
    let server = FakeApiServer::start(&["v1"]).expect("fake API server");
    server.apply(CLUSTER).expect("applying the cluster");
    server.apply(MESH_REGISTRY_ONLY).expect("the mesh config");
    let kubeconfig = world.dir.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let tree = KubeletTree::new(&world);
    let dns_addr = dns.addr();
    let args = [
        "--node-name",
        "node-a",
        "--kubelet-cgroups",
        &tree.relative,
        "--dns-server",
        &dns_addr,
    ];
    let agent = Agent::start_kubernetes(&world, &kubeconfig, &args);
    let web_uid = uid(0x2a);
    server
        .apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: shop, uid: {web_uid}}}\n\
             spec: {{nodeName: node-a, containers: [{{name: app, image: app:1}}]}}\nstatus: {{phase: Running}}\n"
        ))
        .expect("pod");
    let web = tree.container(&web_uid, '5');

    // AUDIT: the unlisted address is reached, and recorded as REGISTRY_ONLY would refuse it.
    eventually_in(&agent, &web, "198.51.100.11", 80, Want::Allowed);
    agent.wait_for(Duration::from_secs(5), "the audit record", || {
        agent.denials().iter().any(|d| {
            d["verdict"] == "audit" && d["namespace"] == "shop" && d["dst"] == "198.51.100.11"
        })
    });
    eventually_in(&agent, &web, "198.51.100.10", 80, Want::Allowed);
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
    eventually_in(&agent, &web, "198.51.100.11", 80, Want::Denied);
    eventually_in(&agent, &web, "198.51.100.10", 80, Want::Allowed);
}
