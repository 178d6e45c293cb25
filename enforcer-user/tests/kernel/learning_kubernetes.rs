//! DNS learning in Kubernetes mode: pods learn from their own answers, and a pod whose DNS an
//! Istio sidecar captures is left to it (its queries are not redirected, so it learns nothing).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use enforcer_testkit::{apiserver::FakeApiServer, cgroups::in_cgroup, python, script};

use crate::{
    harness::{Agent, Hosts, World},
    kubernetes::{uid, KubeletTree},
    learning::{count, Upstream, DNS, ZONES},
};

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {egress-enforcer: enabled}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: enforcer-mesh, namespace: enforcer-system}
data:
  mesh: |
    outboundTrafficPolicy:
      mode: REGISTRY_ONLY
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cdn, namespace: shop}
spec:
  hosts: ["*.example.test"]
  ports: [{number: 443, name: https, protocol: TLS}]
  resolution: NONE
"#;

fn pod(name: &str, uid: &str, annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, uid: {uid}, annotations: {{{annotations}}}}}\n\
         spec: {{nodeName: node-a, containers: [{{name: app, image: app:1}}]}}\nstatus: {{phase: Running}}\n"
    )
}

/// `resolve.py` in a container cgroup: 20 rotating names, each connected to at once.
fn resolve_in(cgroup: &Path) -> serde_json::Value {
    let out = in_cgroup(cgroup, python())
        .arg(script("resolve.py"))
        .args(["--server", DNS, "--json", "--mode", "udp-connected"])
        .args(["--pattern", "k{i}.example.test", "--count", "20"])
        .output()
        .expect("resolve.py");
    serde_json::from_slice(&out.stdout).expect("resolve.py's result")
}

#[test]
fn pods_learn_from_their_answers_unless_istio_captures_their_dns() {
    let world = World::new("k8sdns");
    let hosts = Hosts::new(&world);
    let _upstream = Upstream::start(&world, &hosts, ZONES);
    let server = FakeApiServer::start(&["v1"]).expect("fake API server");
    server.apply(CLUSTER).expect("applying the cluster");
    let kubeconfig = world.dir.join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let tree = KubeletTree::new(&world);
    let args = [
        "--node-name",
        "node-a",
        "--kubelet-cgroups",
        &tree.relative,
        "--dns-upstream",
        DNS,
        "--allow-cidr",
        "203.0.113.53/32",
    ];
    let agent = Agent::start_kubernetes(&world, &kubeconfig, &args);
    let (plain, meshed) = (uid(0x51), uid(0x52));
    server
        .apply(&format!(
            "{}---\n{}",
            pod("plain", &plain, ""),
            pod("meshed", &meshed, "sidecar.istio.io/status: '{}'")
        ))
        .expect("pods");
    let container = |uid: &str, n: char| tree.container(uid, n);
    let plain_cg = container(&plain, 'a');
    let meshed_cg = container(&meshed, 'b');

    // Once mapped, the plain pod's lookups teach its scope every address they return.
    let start = Instant::now();
    let got = loop {
        let got = resolve_in(&plain_cg);
        if count(&got, "ok") == 20 || start.elapsed() > Duration::from_secs(10) {
            break got;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(count(&got, "ok"), 20, "{got}\n{}", agent.log());
    // The meshed pod's queries go where they were sent (Istio's DNS capture would take
    // them): its answers teach nothing, and the fresh addresses stay refused.
    let meshed_got = resolve_in(&meshed_cg);
    assert_eq!(count(&meshed_got, "eperm"), 20, "{meshed_got}");
    // Refused as a mapped pod of shop whose answers the proxy never saw, not as an unmapped
    // one (the plain pod had no refusal once mapped).
    agent.wait_for(Duration::from_secs(5), "the meshed pod's records", || {
        agent
            .denials()
            .iter()
            .filter(|d| d["namespace"] == "shop" && d["learning"] == "never_answered")
            .count()
            >= 20
    });
}
