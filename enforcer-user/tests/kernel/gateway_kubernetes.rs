//! The egress gateway in Kubernetes mode: the gateway is a Service whose EndpointSlices name
//! its pods (here a test host listening where a gateway pod would, on 8080), and the routing
//! objects come from the API server. A pod a ServiceEntry's workloadSelector picks is one of
//! its endpoints (seed 002, step 8).

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use enforcer_testkit::{apiserver::FakeApiServer, python, script};

use crate::{
    harness::{Agent, Dns, Hosts, Want, World},
    kubernetes::{eventually_in, probe_in, uid, KubeletTree, MESH_REGISTRY_ONLY},
    veth::{ip, pod as veth_pod, Made},
};

/// 198.51.100.20 plays the gateway pod (the test hosts listen on 8080); the pod behind
/// app.internal.com has a network namespace and veth of its own, at [`EXT`].
const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {egress-enforcer: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  exportTo: ["*"]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: v1
kind: Service
metadata: {name: istio-egressgateway, namespace: istio-system}
spec:
  clusterIP: 198.51.100.250
  ports: [{name: http2, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: istio-egressgateway-x1
  namespace: istio-system
  labels:
    kubernetes.io/service-name: istio-egressgateway
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
addressType: IPv4
endpoints:
- addresses: [198.51.100.20]
ports:
- {name: http2, port: 8080}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: istio-egressgateway, namespace: istio-system}
spec:
  selector: {istio: egressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [api.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api-via-gateway, namespace: shop}
spec:
  hosts: [api.example.com]
  gateways: [istio-system/istio-egressgateway, mesh]
  http:
  - match:
    - {gateways: [mesh], port: 80}
    route:
    - destination: {host: istio-egressgateway.istio-system.svc.cluster.local, port: {number: 80}}
  - match:
    - {gateways: [istio-system/istio-egressgateway], port: 80}
    route:
    - destination: {host: api.example.com, port: {number: 80}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: app-internal, namespace: shop}
spec:
  hosts: [app.internal.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  workloadSelector: {labels: {app: external}}
"#;

fn pod(name: &str, uid: &str, labels: &str, ip: Option<&str>) -> String {
    let status = match ip {
        Some(ip) => format!("{{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}"),
        None => "{phase: Running}".to_string(),
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, uid: {uid}, labels: {{{labels}}}}}\n\
         spec: {{nodeName: node-a, containers: [{{name: app, image: app:1}}]}}\nstatus: {status}\n"
    )
}

#[test]
fn a_mesh_route_goes_to_the_gateway_services_pods_and_selected_pods_are_endpoints() {
    let world = World::new("k8segw");
    let hosts = Hosts::new(&world);
    let dns = Dns::new(&world, 60, &[("api.example.com", "198.51.100.10")]);
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
        "--socket-lb",
    ];
    let agent = Agent::start_kubernetes(&world, &kubeconfig, &args);
    let web_uid = uid(0x1a);
    server
        .apply(&pod("web", &web_uid, "app: web", None))
        .expect("pod");
    let web = tree.container(&web_uid, '4');

    // api.example.com:80 is answered by the gateway's endpoint on its target port.
    let through = "tcp 198.51.100.20:8080 from ";
    wait_until(&agent, "a connection through the gateway", || {
        let _ = probe_in(&web, "tcp", "198.51.100.10", 80);
        hosts.received().iter().any(|l| l.starts_with(through))
    });
    assert!(
        !hosts
            .received()
            .iter()
            .any(|l| l.starts_with("tcp 198.51.100.10:80 ")),
        "{:?}",
        hosts.received()
    );

    // A pod labelled app=external becomes app.internal.com's endpoint; another address stays
    // refused.
    let _ext = ExtPod::start(&world);
    eventually_in(&agent, &web, EXT, 80, Want::Denied);
    server
        .apply(&pod("ext", &uid(0x1b), "app: external", Some(EXT)))
        .expect("pod");
    eventually_in(&agent, &web, EXT, 80, Want::Allowed);
    eventually_in(&agent, &web, "198.51.100.11", 80, Want::Denied);

    // The VirtualService deleted: direct again.
    server
        .delete("VirtualService", "shop", "api-via-gateway")
        .expect("delete");
    wait_until(&agent, "a direct connection", || {
        let _ = probe_in(&web, "tcp", "198.51.100.10", 80);
        hosts
            .received()
            .iter()
            .any(|l| l.starts_with("tcp 198.51.100.10:80 "))
    });
}

const EXT: &str = "203.0.113.170";

/// A pod of its own network namespace with a listener on port 80, routed from the node.
struct ExtPod {
    _made: Made,
    server: Child,
}

impl ExtPod {
    fn start(world: &World) -> Self {
        let tag = &world.id[world.id.len().saturating_sub(6)..];
        let (netns, host_if) = (format!("enfext-{tag}"), format!("eex{tag}"));
        let mut made = Made {
            netns: Vec::new(),
            links: Vec::new(),
        };
        veth_pod(&mut made, &netns, &host_if, &format!("{EXT}/32"));
        ip(&["route", "add", &format!("{EXT}/32"), "dev", &host_if]);
        ip(&["-n", &netns, "route", "add", "default", "dev", "eth0"]);
        let server = Command::new("ip")
            .args(["netns", "exec", &netns, python()])
            .arg(script("host.py"))
            .args(["--tcp", "80", "--addrs", EXT])
            .stdout(Stdio::null())
            .spawn()
            .expect("starting the pod's server");
        let pod = Self {
            _made: made,
            server,
        };
        let probe = || {
            Command::new(python())
                .arg(script("probe.py"))
                .args(["tcp", EXT, "80", "1"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        let start = Instant::now();
        while !probe() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the pod's server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        pod
    }
}

impl Drop for ExtPod {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

fn wait_until(agent: &Agent, what: &str, cond: impl FnMut() -> bool) {
    agent.wait_for(Duration::from_secs(10), what, cond);
}
