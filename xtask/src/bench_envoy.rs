//! Envoy in `cargo xtask bench`: what an HTTP request pays on each way out of a workload, side by
//! side in one run, rounds interleaved:
//!
//! - (a) direct: from the host namespace to the test host (198.51.100.10) through the veth;
//! - (b) the same from a cgroup the agent enforces under REGISTRY_ONLY, the host in a
//!   ServiceEntry;
//! - (c) through a sidecar-style Envoy on loopback (Istio's REGISTRY_ONLY routes; no iptables:
//!   the client connects to its listener as its sidecar's redirect would make it);
//! - (d) through an egress gateway (Envoy on loopback, routing by Host), the workload's
//!   connect() to the server's other port redirected there by the kernel, as a VirtualService
//!   bound to `mesh` makes it.
//!
//! Each request is a `GET` with a small fixed answer from a std-thread server in the test hosts'
//! namespace (`bench_http`), one connection per request, or one kept for all. Reported: rate,
//! p50 and p99 latency (medians of the rounds), CPU per request of the client, Envoy and the
//! server (summed over the rounds, since /proc counts 10 ms ticks), and what each way adds to (a).

use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    process::{Child, Command, Stdio},
};

use anyhow::{bail, Context as _};
use enforcer_testkit::envoy::{sidecar_registry_only, EgressGateway, Envoy, Upstream};

use crate::{
    bench::{median, Bench, TARGET},
    bench_dns::{cpu_ticks, ticks_per_second},
    sh,
};

const HOST: &str = "www.bench.test";
const SERVER_PORT: u16 = 8080;
/// Istio's outbound capture port; on loopback only.
const SIDECAR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15001));
/// A port of the test host that no ServiceEntry of the benchmark names.
const UNLISTED: &str = "198.51.100.10:9";
const ROUNDS: usize = 3;
const REQUESTS: usize = 2_000;

/// The port (d) connects to: the VirtualService sends it through the gateway, which forwards
/// to SERVER_PORT. Nothing listens on it, so what answers went through the gateway.
const ROUTED_PORT: u16 = 8081;
/// The gateway's listener, as its Service's endpoint (127.0.0.1, target port).
const GATEWAY: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15080));

const POLICY: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: envoy-bench, namespace: bench}
spec:
  hosts: [www.bench.test]
  addresses: [198.51.100.10]
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}, {number: 8081, name: http-routed, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: egress-gateway, namespace: bench}
spec:
  hosts: [egress-gateway.bench.test]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 15080}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: egress-gateway, namespace: bench}
spec:
  selector: {istio: egressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [www.bench.test]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: via-gateway, namespace: bench}
spec:
  hosts: [www.bench.test]
  gateways: [egress-gateway, mesh]
  http:
  - match: [{gateways: [mesh], port: 8081}]
    route: [{destination: {host: egress-gateway.bench.test, port: {number: 80}}}]
  - match: [{gateways: [egress-gateway]}]
    route: [{destination: {host: www.bench.test, port: {number: 8080}}}]
"#;

/// A way out, (a) to (d).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    Direct,
    Enforced,
    Sidecar,
    GatewayRedirect,
}

impl Way {
    const ALL: [Way; 4] = [
        Way::Direct,
        Way::Enforced,
        Way::Sidecar,
        Way::GatewayRedirect,
    ];

    fn label(self) -> &'static str {
        match self {
            Way::Direct => "(a) direct",
            Way::Enforced => "(b) enforcer, REGISTRY_ONLY",
            Way::Sidecar => "(c) sidecar Envoy, loopback",
            Way::GatewayRedirect => "(d) egress gateway, redirect",
        }
    }

    /// The client command up to its own arguments, and where it connects.
    fn client(self, bench: &Bench, me: &Path, server: SocketAddr) -> (Command, SocketAddr) {
        match self {
            Way::Direct => (Command::new(me), server),
            Way::Enforced => {
                let mut cmd = bench.enforced(None);
                cmd.arg(me);
                (cmd, server)
            }
            Way::Sidecar => (Command::new(me), SIDECAR),
            Way::GatewayRedirect => {
                let mut cmd = bench.enforced(None);
                cmd.arg(me);
                (cmd, SocketAddr::new(server.ip(), ROUTED_PORT))
            }
        }
    }
}

/// One way and one connection mode, over the rounds.
#[derive(Default)]
struct Totals {
    rates: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    requests: f64,
    client_cpu: f64,
    envoy_cpu: f64,
    server_cpu: f64,
}

/// Runs with the test hosts up in `netns` and no agent running; starts and stops its own.
pub fn run(bench: &mut Bench, netns: &str) -> anyhow::Result<()> {
    println!(
        "\nHTTP through Envoy ({ROUNDS} interleaved rounds of {REQUESTS} GETs per way, to a Rust server on {TARGET}:{SERVER_PORT};\n\
         latency medians of the rounds; CPU per request summed over the rounds)"
    );
    let server_addr = SocketAddr::new(TARGET.parse()?, SERVER_PORT);
    let server = Server::start(netns, server_addr)?;
    let policy = bench.work.join("policies/envoy-bench.yaml");
    fs::write(&policy, POLICY)?;
    bench.start_agent()?;
    let result = measure_all(bench, &server, server_addr);
    bench.stop_agent();
    let _ = fs::remove_file(&policy);
    result
}

fn measure_all(bench: &Bench, server: &Server, server_addr: SocketAddr) -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    check_enforced(bench, &me)?;
    let sidecar = sidecar_registry_only(
        &bench.work.join("sidecar"),
        SIDECAR,
        &[HOST],
        &Upstream::Static(vec![server_addr]),
        None,
        false,
    )?
    .spawn(&[])?;
    // The gateway runs beside the bench, unenforced: its own scope is not what is measured.
    let gateway = EgressGateway::new(bench.work.join("gateway"))
        .http_listener(Some(GATEWAY))
        .route_http(HOST, Upstream::Static(vec![server_addr]))
        .spawn(&[])?;
    println!(
        "  {:<29} {:<10} {:>8} {:>8} {:>8} {:>7} {:>7} {:>11} {:>10} {:>10}",
        "way",
        "conn",
        "req/s",
        "p50 us",
        "p99 us",
        "+p50",
        "+p99",
        "client us",
        "envoy us",
        "server us"
    );
    for keep_alive in [false, true] {
        let mut totals: Vec<Totals> = Way::ALL.iter().map(|_| Totals::default()).collect();
        for _ in 0..ROUNDS {
            for (way, total) in Way::ALL.iter().zip(totals.iter_mut()) {
                let (cmd, target) = way.client(bench, &me, server_addr);
                let ctx = Measured {
                    server,
                    envoy: match way {
                        Way::Sidecar => Some(&sidecar),
                        Way::GatewayRedirect => Some(&gateway),
                        Way::Direct | Way::Enforced => None,
                    },
                    keep_alive,
                };
                ctx.once(cmd, target, total)
                    .with_context(|| format!("{} ({})", way.label(), mode(keep_alive)))?;
            }
        }
        report(&mut totals, keep_alive);
    }
    println!(
        "  +p50/+p99: against (a) in the same mode. (c) keeps its upstream connections, so with close\n  \
         only the loopback leg is new (the server's share drops). Envoy {}, --concurrency 1, no access log;\n  \
         client and server are this xtask build.",
        enforcer_testkit::envoy::VERSION
    );
    Ok(())
}

fn mode(keep_alive: bool) -> &'static str {
    if keep_alive {
        "keep-alive"
    } else {
        "close"
    }
}

/// A client in the enforced cgroup must be refused what no ServiceEntry names: else (b) would
/// measure nothing but (a).
fn check_enforced(bench: &Bench, me: &Path) -> anyhow::Result<()> {
    let out = sh::output(
        bench
            .enforced(None)
            .arg(me)
            .args(["bench-client", "refused", UNLISTED]),
    )?;
    let said = String::from_utf8_lossy(&out.stdout);
    if said.trim() != "refused" {
        bail!(
            "a client under the agent reached {UNLISTED}, which no ServiceEntry names ({}{}); agent log:\n{}",
            said.trim(),
            String::from_utf8_lossy(&out.stderr),
            bench.agent_log_tail()
        );
    }
    Ok(())
}

struct Measured<'a> {
    server: &'a Server,
    /// The Envoy this way goes through, whose CPU it is charged.
    envoy: Option<&'a Envoy>,
    keep_alive: bool,
}

impl Measured<'_> {
    /// One client run of REQUESTS, added to `total`, with the CPU Envoy and the server spent.
    fn once(&self, mut cmd: Command, target: SocketAddr, total: &mut Totals) -> anyhow::Result<()> {
        let envoy_ticks = || self.envoy.map_or(Ok(0), |e| cpu_ticks(e.pid()));
        let (envoy0, server0) = (envoy_ticks()?, cpu_ticks(self.server.pid())?);
        let out = sh::output(cmd.args([
            "bench-client",
            "http",
            &target.to_string(),
            HOST,
            &REQUESTS.to_string(),
            mode(self.keep_alive),
        ]))?;
        let (envoy1, server1) = (envoy_ticks()?, cpu_ticks(self.server.pid())?);
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "the client said {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let field = |k: &str| got[k].as_f64().unwrap_or(f64::NAN);
        total.rates.push(REQUESTS as f64 / field("secs"));
        total.p50.push(field("p50_us"));
        total.p99.push(field("p99_us"));
        total.requests += REQUESTS as f64;
        total.client_cpu += field("cpu_secs");
        total.envoy_cpu += (envoy1 - envoy0) as f64 / ticks_per_second();
        total.server_cpu += (server1 - server0) as f64 / ticks_per_second();
        Ok(())
    }
}

fn report(totals: &mut [Totals], keep_alive: bool) {
    let base = totals
        .first_mut()
        .map(|t| (median(&mut t.p50), median(&mut t.p99)))
        .unwrap_or((f64::NAN, f64::NAN));
    for (way, t) in Way::ALL.iter().zip(totals.iter_mut()) {
        let (p50, p99) = (median(&mut t.p50), median(&mut t.p99));
        let per_request = |secs: f64| secs / t.requests * 1e6;
        println!(
            "  {:<29} {:<10} {:>8.0} {:>8.1} {:>8.1} {:>+7.1} {:>+7.1} {:>11.1} {:>10.1} {:>10.1}",
            way.label(),
            mode(keep_alive),
            median(&mut t.rates),
            p50,
            p99,
            p50 - base.0,
            p99 - base.1,
            per_request(t.client_cpu),
            per_request(t.envoy_cpu),
            per_request(t.server_cpu),
        );
    }
}

/// `bench-client http-serve` in the test hosts' namespace; killed on drop.
struct Server(Child);

impl Server {
    fn start(netns: &str, addr: SocketAddr) -> anyhow::Result<Self> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(std::env::current_exe()?)
            .args(["bench-client", "http-serve", &addr.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the bench's HTTP server")?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        let server = Self(child);
        if line.trim() != "ready" {
            bail!("the bench's HTTP server did not start on {addr}");
        }
        Ok(server)
    }

    /// `ip netns exec` execs the server, so this is the server's own process.
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
