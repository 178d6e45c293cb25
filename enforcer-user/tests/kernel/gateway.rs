//! Seed 001 steps 5 and 6: mesh traffic to www.wikipedia.org goes through a real Envoy playing
//! Istio's egress gateway, as a local pod in istio-system labelled istio=egressgateway. What
//! reaches the test host is asserted there (which source address connected), never only on
//! the client's side.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use enforcer_testkit::{
    envoy::{EgressGateway, Envoy, Upstream},
    python, script,
};

use crate::{
    harness::{start_with_pods, Agent, Dns, Hosts, World},
    pod::{run_in, Pod},
};

/// The gateway's workload: its namespace and labels.
const GATEWAY: &str = "istio-system:istio=egressgateway";
const POD_CIDR: &str = "203.0.113.128/26";
const POD_CIDR6: &str = "2001:db8:fe::/120";
const WIKI: &str = "203.0.113.30";
const WIKI6: &str = "2001:db8::10";

/// Step 4's entry (exported to istio-system too) and, in local mode, the gateway's Service: the
/// files the demo applies.
const ENTRY: &str = concat!(
    include_str!("../../../policies/001-wikipedia-egress.yaml"),
    "---\n",
    include_str!("../../../policies/001-egress-gateway-service.yaml"),
);

/// Step 5: the seed's Gateway, DestinationRule and VirtualService, the misplaced `port` moved
/// into the gateway's match (`policies/`, as the demo applies them).
const STEP5: &str = include_str!("../../../policies/001-egress-gateway.yaml");

/// The same route for HTTPS, passed through by SNI.
const TLS_ROUTE: &str = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: istio-egressgateway-tls, namespace: istio-system}
spec:
  selector: {istio: egressgateway}
  servers:
  - port: {number: 443, name: tls, protocol: TLS}
    hosts: [www.wikipedia.org]
    tls: {mode: PASSTHROUGH}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: wikipedia-tls, namespace: default}
spec:
  hosts: [www.wikipedia.org]
  gateways: [mesh, istio-system/istio-egressgateway-tls]
  tls:
  - match:
    - {gateways: [mesh], port: 443, sniHosts: [www.wikipedia.org]}
    route:
    - destination: {host: istio-egressgateway.istio-system.svc.cluster.local, port: {number: 443}}
  - match:
    - {gateways: [istio-system/istio-egressgateway-tls], port: 443, sniHosts: [www.wikipedia.org]}
    route:
    - destination: {host: www.wikipedia.org, port: {number: 443}}
"#;

/// The test net, the agent, and Envoy as istio-egressgateway (dropped before the agent).
struct Setup {
    envoy: Envoy,
    gw_ns: String,
    gw_ip: String,
    world: World,
    hosts: Hosts,
    _dns: Dns,
    agent: Agent,
}

impl Setup {
    /// An idle pod in default, whose network namespace clients run in.
    fn client(&self, tag: &str) -> Pod {
        Pod::idle(&self.agent, "default", &self.world.netns(tag))
    }
}

fn setup(name: &str, policy: &str, extra: &[&str]) -> Setup {
    let world = World::new(name);
    let hosts = Hosts::new(&world);
    let dns = Dns::new(
        &world,
        60,
        &[("www.wikipedia.org", WIKI), ("www.wikipedia.org", WIKI6)],
    );
    let dns_addr = dns.addr();
    let mut args = vec![
        "--namespace",
        "default",
        "--namespace",
        "istio-system",
        "--dns-server",
        dns_addr.as_str(),
    ];
    args.extend(extra);
    let agent = start_with_pods(
        &world,
        &hosts,
        ("001-wikipedia.yaml", policy),
        &[POD_CIDR, POD_CIDR6],
        &args,
    );
    let gw_ns = world.netns("enfegw");
    let envoy = gateway(&world, &agent, &gw_ns);
    Setup {
        envoy,
        gw_ip: pod_ip(&gw_ns),
        gw_ns,
        world,
        hosts,
        _dns: dns,
        agent,
    }
}

/// Envoy as istio-egressgateway: a local pod in istio-system labelled istio=egressgateway.
fn gateway(world: &World, agent: &Agent, netns: &str) -> Envoy {
    let argv = agent.exec_argv(GATEWAY, Some(netns));
    let prefix: Vec<&str> = argv.iter().map(String::as_str).collect();
    let any6: SocketAddr = "[::]:8080".parse().expect("address");
    let tls6: SocketAddr = "[::]:8443".parse().expect("address");
    EgressGateway::new(world.dir.join(netns))
        .http_listener(Some(any6))
        .tls_listener(Some(tls6))
        .route_http(
            "www.wikipedia.org",
            Upstream::Static(vec![format!("{WIKI}:80").parse().expect("address")]),
        )
        .route_tls(
            "www.wikipedia.org",
            Upstream::Static(vec![format!("{WIKI}:443").parse().expect("address")]),
        )
        .spawn(&prefix)
        .unwrap_or_else(|e| panic!("starting the gateway: {e:#}\n{}", agent.log()))
}

/// The IPv4 address of `eth0` in a pod's network namespace.
fn pod_ip(netns: &str) -> String {
    let out = std::process::Command::new("ip")
        .args([
            "netns", "exec", netns, "ip", "-j", "-4", "addr", "show", "eth0",
        ])
        .output()
        .expect("ip addr");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v[0]["addr_info"][0]["local"]
        .as_str()
        .expect("the pod's address")
        .to_string()
}

/// curl from a pod as workload `ns`, with www.wikipedia.org pinned to `addr` (the pod cannot
/// reach the test's DNS server).
fn curl(agent: &Agent, pod: &Pod, scheme: &str, addr: &str, port: u16) -> Output {
    curl_as(agent, &pod.netns, "default", scheme, (addr, port))
}

/// [`curl`] as `workload` (`ns` or `ns:k=v`) in the network namespace `netns`.
fn curl_as(agent: &Agent, netns: &str, workload: &str, scheme: &str, to: (&str, u16)) -> Output {
    let (addr, port) = to;
    let pin = format!("www.wikipedia.org:{port}:{addr}");
    let url = format!("{scheme}://www.wikipedia.org:{port}/");
    run_in(
        agent,
        netns,
        workload,
        &["curl", "-sk", "-m", "3", "--resolve", &pin, &url],
    )
}

fn connections_from(hosts: &Hosts, dst: &str, port: u16, from: &str) -> usize {
    let line = format!("tcp {dst}:{port} from {from}");
    hosts.received().iter().filter(|l| **l == line).count()
}

#[test]
fn seed_001_mesh_traffic_goes_through_the_egress_gateway_and_nowhere_else() {
    let s = setup("egw", &format!("{ENTRY}---\n{STEP5}"), &[]);
    let (envoy, gw_ip) = (&s.envoy, &s.gw_ip);
    let client = s.client("enfcli");

    // The gateway pod becomes the gateway Service's endpoint once the agent sees it.
    s.agent.wait_for(
        Duration::from_secs(10),
        "a request through the gateway",
        || curl(&s.agent, &client, "http", WIKI, 80).status.success(),
    );
    let through = connections_from(&s.hosts, WIKI, 80, gw_ip);
    assert!(through >= 1, "{:?}", s.hosts.received());
    assert_eq!(connections_from(&s.hosts, WIKI, 80, &client.ip), 0);
    let log = envoy
        .wait_for_access_log(Duration::from_secs(5), |l| l.contains("www.wikipedia.org"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(log.contains(&format!("\"{WIKI}:80\"")), "{log}");
    assert!(log.contains(" 200 "), "{log}");

    // explain replays it, and the kernel's maps agree.
    let (code, text) = s.agent.explain(&["-n", "default", &format!("{WIKI}:80")]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("redirected to egress gateway istio-system/istio-egressgateway"),
        "{text}"
    );
    assert!(text.contains("a redirect to the egress gateway"), "{text}");
    assert!(!text.contains("DISAGREES"), "{text}");

    // IPv6: the destination's v6 address is redirected to the gateway's v6 address.
    let out = curl(&s.agent, &client, "http", WIKI6, 80);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!s
        .hosts
        .received()
        .iter()
        .any(|l| l.starts_with(&format!("tcp {WIKI6}:80"))));

    // 443 is not routed: it stays direct, as in Istio.
    assert!(curl_reaches(&s, &client, WIKI, 443));

    // Around the gateway: the pod's network namespace outside its cgroup, so only TC judges.
    let bypass = client.run_unmapped(&["curl", "-s", "-m", "2", &format!("http://{WIKI}/")]);
    assert!(!bypass.status.success(), "the bypass got through");
    assert_eq!(
        connections_from(&s.hosts, WIKI, 80, &client.ip),
        0,
        "{:?}",
        s.hosts.received()
    );
    let record = record(&s.agent, |d| d["reason_code"] == "gateway_bypass");
    assert_eq!(record["hook"], "tc", "{record}");
    assert_eq!(
        record["virtual_service"], "default/wikipedia-egress-gateway",
        "{record}"
    );
    assert_eq!(
        record["gateway"], "istio-system/istio-egressgateway",
        "{record}"
    );

    // The gateway's workloads have a scope of their own, which reaches only the routed port:
    // 443 of the same host, which the entry exports to istio-system, is refused to them.
    let gw_443 = curl_as(&s.agent, &s.gw_ns, GATEWAY, "https", (WIKI, 443));
    assert!(!gw_443.status.success());
    assert_eq!(connections_from(&s.hosts, WIKI, 443, gw_ip), 0);
    let (code, text) = s.agent.explain(&[
        "-n",
        "istio-system",
        "--workload",
        "istio=egressgateway",
        &format!("{WIKI}:443"),
    ]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("workloads of Gateway istio-system/istio-egressgateway"),
        "{text}"
    );
    assert!(
        text.contains("scope istio-system/gateway:istio=egressgateway"),
        "{text}"
    );

    // A tenant's pod labelled like the gateway is no gateway workload: it is redirected too.
    let fake = "default:istio=egressgateway";
    let tenant = Pod::idle(&s.agent, fake, &s.world.netns("enffake"));
    let before = connections_from(&s.hosts, WIKI, 80, gw_ip);
    let out = curl_as(&s.agent, &tenant.netns, fake, "http", (WIKI, 80));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(connections_from(&s.hosts, WIKI, 80, gw_ip), before + 1);
    assert_eq!(connections_from(&s.hosts, WIKI, 80, &tenant.ip), 0);

    // Without the VirtualService, traffic goes direct again and the gateway sees none of it.
    s.world.write_policy("001-wikipedia.yaml", ENTRY);
    s.agent
        .wait_for(Duration::from_secs(10), "direct routing", || {
            curl(&s.agent, &client, "http", WIKI, 80).status.success()
                && connections_from(&s.hosts, WIKI, 80, &client.ip) > 0
        });
    // Requests made through the gateway while the change was on its way are logged within
    // Envoy's flush interval (50 ms).
    std::thread::sleep(Duration::from_millis(300));
    let logged = envoy.access_log_lines().len();
    let direct = connections_from(&s.hosts, WIKI, 80, &client.ip);
    assert!(curl(&s.agent, &client, "http", WIKI, 80).status.success());
    assert_eq!(connections_from(&s.hosts, WIKI, 80, &client.ip), direct + 1);
    assert_eq!(envoy.access_log_lines().len(), logged);
}

/// The first record that `want` accepts, waiting for it (records arrive asynchronously).
fn record(agent: &Agent, want: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let mut found = None;
    agent.wait_for(Duration::from_secs(5), "the refusal's record", || {
        found = agent.denials().into_iter().find(|d| want(d));
        found.is_some()
    });
    found.unwrap_or_default()
}

/// Whether curl from the client reached `addr:port` directly (seen from the client's address).
fn curl_reaches(s: &Setup, client: &Pod, addr: &str, port: u16) -> bool {
    let before = connections_from(&s.hosts, addr, port, &client.ip);
    let _ = curl(&s.agent, client, "https", addr, port);
    connections_from(&s.hosts, addr, port, &client.ip) > before
}

#[test]
fn tls_is_passed_through_by_sni_and_strict_mode_closes_the_other_ports() {
    let s = setup(
        "egwtls",
        &format!("{ENTRY}---\n{TLS_ROUTE}"),
        &["--egress-gateway-only"],
    );
    let (envoy, gw_ip) = (&s.envoy, &s.gw_ip);
    let client = s.client("enfcli");

    // The test host speaks no TLS: the ClientHello arriving from the gateway is the proof.
    s.agent.wait_for(
        Duration::from_secs(10),
        "the ClientHello through the gateway",
        || {
            let _ = curl(&s.agent, &client, "https", WIKI, 443);
            connections_from(&s.hosts, WIKI, 443, gw_ip) > 0
        },
    );
    assert_eq!(connections_from(&s.hosts, WIKI, 443, &client.ip), 0);
    let log = envoy
        .wait_for_access_log(Duration::from_secs(5), |l| l.contains("www.wikipedia.org"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(log.contains(&format!("\"{WIKI}:443\"")), "{log}");

    // Strict: port 80 of the routed host is refused at connect, naming the VirtualService.
    let out = curl(&s.agent, &client, "http", WIKI, 80);
    assert!(!out.status.success());
    assert_eq!(connections_from(&s.hosts, WIKI, 80, &client.ip), 0);
    let record = record(&s.agent, |d| {
        d["port"] == 80 && d["reason_code"] == "gateway_bypass"
    });
    assert_eq!(record["hook"], "connect4", "{record}");
    assert_eq!(
        record["virtual_service"], "default/wikipedia-tls",
        "{record}"
    );
    // The allowed traffic of this test is the TLS above, through the gateway.
}

#[test]
fn client_tls_towards_the_gateway_is_refused_at_connect_with_the_reason() {
    let mutual = STEP5.replace(
        "  - name: wikipedia\n",
        "  - name: wikipedia\n    trafficPolicy:\n      tls: {mode: ISTIO_MUTUAL}\n",
    );
    assert_ne!(mutual, STEP5, "the subset is where the test expects it");
    let s = setup("egwmtls", &format!("{ENTRY}---\n{mutual}"), &[]);
    let client = s.client("enfcli");
    let out = curl(&s.agent, &client, "http", WIKI, 80);
    assert!(!out.status.success());
    assert!(!s
        .hosts
        .received()
        .iter()
        .any(|l| l.starts_with(&format!("tcp {WIKI}:80"))));
    let record = record(&s.agent, |d| d["reason_code"] == "gateway_refused");
    let reason = record["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("ISTIO_MUTUAL"), "{record}");
    // 443 is not routed and stays allowed, directly.
    assert!(curl_reaches(&s, &client, WIKI, 443));
}

/// A long-lived TCP flow (`stream.py`) from workload default, in a pod or (`None`) in the
/// host's network namespace, where only the revocation sweep can cut it.
struct Flow {
    child: std::process::Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Flow {
    fn start(agent: &Agent, netns: Option<&str>) -> Self {
        let mut child = agent
            .exec("default", netns)
            .arg(python())
            .arg(script("stream.py"))
            .args([WIKI, "80", "20"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the long-lived flow");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut flow = Self { child, lines };
        for _ in 0..5 {
            let line = flow.next();
            assert!(
                line.starts_with("ok"),
                "before the VirtualService: {line:?}"
            );
        }
        flow
    }

    fn next(&mut self) -> String {
        self.lines.next().and_then(Result::ok).unwrap_or_default()
    }

    /// How long after `since` the flow stalled; panics after 5 s of echoes.
    fn stalled(&mut self, since: Instant, agent: &Agent) -> Duration {
        loop {
            let line = self.next();
            if line.starts_with("stalled") {
                return since.elapsed();
            }
            assert!(
                line.starts_with("ok") && since.elapsed() < Duration::from_secs(5),
                "the direct flow was not cut: {line:?}\n{}",
                agent.log()
            );
        }
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_direct_flow_opened_before_the_virtual_service_is_revoked() {
    let s = setup("egwrev", ENTRY, &[]);
    let netns = s.world.netns("enfcli");
    let mut in_pod = Flow::start(&s.agent, Some(&netns));
    let mut on_host = Flow::start(&s.agent, None);
    s.world
        .write_policy("001-wikipedia.yaml", &format!("{ENTRY}---\n{STEP5}"));
    let applied = Instant::now();
    let cut = [
        in_pod.stalled(applied, &s.agent),
        on_host.stalled(applied, &s.agent),
    ];
    eprintln!("direct flows cut {cut:?} after the VirtualService was written (pod, host)");
    // TC cuts the pod's; the sweep destroys the host's socket, which TC never sees.
    for hook in ["tc", "revoke"] {
        let revoked = record(&s.agent, |d| {
            d["verdict"] == "revoked" && d["reason_code"] == "gateway_bypass" && d["hook"] == hook
        });
        assert_eq!(
            revoked["virtual_service"], "default/wikipedia-egress-gateway",
            "{revoked}"
        );
    }
    // A new connection goes through the gateway.
    let client = s.client("enfcl2");
    s.agent.wait_for(
        Duration::from_secs(10),
        "a request through the gateway",
        || {
            curl(&s.agent, &client, "http", WIKI, 80).status.success()
                && connections_from(&s.hosts, WIKI, 80, &s.gw_ip) > 0
        },
    );
}
