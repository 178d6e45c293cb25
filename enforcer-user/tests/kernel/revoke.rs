//! Revocation without TC: a workload in the host's network namespace (local mode, as
//! hostNetwork pods are) keeps established TCP connections and connected UDP sockets open; once
//! the entry that allowed them goes, the agent destroys those sockets (sock_diag SOCK_DESTROY).
//! What the test hosts receive is the evidence, not what the sender thinks.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use enforcer_testkit::{python, script};

use crate::harness::{registry_only, Agent, Hosts, World};

/// Removed during the test: what it allowed must stop arriving.
const API: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  addresses: [198.51.100.10, "2001:db8::10"]
  ports:
  - {number: 443, name: tls, protocol: TLS}
  - {number: 9999, name: udp, protocol: UDP}
  resolution: STATIC
"#;

/// Stays: its flows keep working.
const KEEP: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: keep, namespace: shop}
spec:
  hosts: [keep.example.com]
  addresses: [203.0.113.30]
  ports:
  - {number: 443, name: tls, protocol: TLS}
  - {number: 9999, name: udp, protocol: UDP}
  resolution: STATIC
"#;

/// A flow as `flows.py` takes it, and how the test hosts' log names what arrived on it.
struct Flow {
    spec: &'static str,
    /// Prefix of the host log lines that count one arrival each.
    arrival: &'static str,
    dst: &'static str,
    port: u16,
    proto: &'static str,
}

const REVOKED: [Flow; 4] = [
    Flow {
        spec: "tcp:198.51.100.10:443",
        arrival: "line 198.51.100.10:443 from ",
        dst: "198.51.100.10",
        port: 443,
        proto: "tcp",
    },
    Flow {
        spec: "udp:198.51.100.10:9999",
        arrival: "udp 198.51.100.10:9999 from ",
        dst: "198.51.100.10",
        port: 9999,
        proto: "udp",
    },
    Flow {
        spec: "tcp:[2001:db8::10]:443",
        arrival: "line 2001:db8::10:443 from ",
        dst: "2001:db8::10",
        port: 443,
        proto: "tcp",
    },
    Flow {
        spec: "udp:[2001:db8::10]:9999",
        arrival: "udp 2001:db8::10:9999 from ",
        dst: "2001:db8::10",
        port: 9999,
        proto: "udp",
    },
];

const KEPT: [Flow; 2] = [
    Flow {
        spec: "tcp:203.0.113.30:443",
        arrival: "line 203.0.113.30:443 from ",
        dst: "203.0.113.30",
        port: 443,
        proto: "tcp",
    },
    Flow {
        spec: "udp:203.0.113.30:9999",
        arrival: "udp 203.0.113.30:9999 from ",
        dst: "203.0.113.30",
        port: 9999,
        proto: "udp",
    },
];

/// The workload: killed on drop, also when the test fails. Its output is collected by a thread,
/// so that reading it never blocks the test.
struct Workload {
    child: Child,
    out: Arc<Mutex<Vec<String>>>,
}

impl Workload {
    fn start(agent: &Agent, seconds: u32, flows: &[&Flow]) -> Self {
        let mut child = agent
            .exec("shop", None)
            .arg(python())
            .arg(script("flows.py"))
            .arg(seconds.to_string())
            .args(flows.iter().map(|f| f.spec))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the workload");
        let out = Arc::new(Mutex::new(Vec::new()));
        if let Some(stdout) = child.stdout.take() {
            let out = Arc::clone(&out);
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    out.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            });
        }
        Self { child, out }
    }

    fn output(&self) -> Vec<String> {
        self.out.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn arrivals(hosts: &Hosts, flow: &Flow) -> usize {
    hosts
        .received()
        .iter()
        .filter(|l| l.starts_with(flow.arrival))
        .count()
}

fn generation(agent: &Agent) -> u64 {
    agent.status()["generation"].as_u64().unwrap_or(0)
}

#[test]
fn removing_an_entry_destroys_its_established_sockets_in_the_host_namespace() {
    let world = World::new("revoke");
    let hosts = Hosts::new(&world);
    world.write_policy("api.yaml", API);
    world.write_policy("keep.yaml", KEEP);
    let mesh = registry_only(&world);
    let agent = Agent::start(&world, &["--mesh-config", &mesh, "--namespace", "shop"]);

    let all: Vec<&Flow> = REVOKED.iter().chain(KEPT.iter()).collect();
    let workload = Workload::start(&agent, 30, &all);
    let report = |what: &str| {
        format!(
            "{what}\n--- workload ---\n{}\n--- hosts received (last 40) ---\n{}\n--- agent log ---\n{}",
            workload.output().join("\n"),
            hosts
                .received()
                .iter()
                .rev()
                .take(40)
                .rev()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n"),
            agent.log()
        )
    };
    // Every flow carries data first, as the receiving side counts it.
    let start = Instant::now();
    while !all.iter().all(|f| arrivals(&hosts, f) >= 5) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{}",
            report("the flows did not start")
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let before = generation(&agent);
    let removed = Instant::now();
    world.remove_policy("api.yaml");
    agent.wait_for(
        Duration::from_secs(10),
        "the apply after the removal",
        || generation(&agent) > before,
    );
    let applied = removed.elapsed();
    // Lines already on the wire when the apply finished may still land; then nothing more.
    std::thread::sleep(Duration::from_millis(500));
    let cut: Vec<usize> = REVOKED.iter().map(|f| arrivals(&hosts, f)).collect();
    let kept: Vec<usize> = KEPT.iter().map(|f| arrivals(&hosts, f)).collect();
    std::thread::sleep(Duration::from_millis(1500));
    for (flow, then) in REVOKED.iter().zip(&cut) {
        let now = arrivals(&hosts, flow);
        assert_eq!(
            now,
            *then,
            "{}",
            report(&format!(
                "{} still delivers after its entry was removed ({then} then {now}; applied {applied:?} after the removal)",
                flow.spec
            ))
        );
    }
    for (flow, then) in KEPT.iter().zip(&kept) {
        let now = arrivals(&hosts, flow);
        assert!(
            now > *then,
            "{}",
            report(&format!(
                "{} stopped although its entry stays ({then} then {now})",
                flow.spec
            ))
        );
    }
    eprintln!("applied {applied:?} after the removal; revoked flows silent since");

    // Each destroyed socket is reported like a refusal, and counted in the status.
    let records = agent.denials();
    for flow in &REVOKED {
        let found = records.iter().find(|r| {
            r["verdict"] == "revoked"
                && r["hook"] == "revoke"
                && r["dst"] == flow.dst
                && r["port"] == flow.port
                && r["proto"] == flow.proto
        });
        let record = found.unwrap_or_else(|| {
            panic!(
                "{}",
                report(&format!("no revoked record for {}: {records:?}", flow.spec))
            )
        });
        assert_eq!(record["namespace"], "shop", "{record}");
        eprintln!("{record}");
    }
    assert!(
        !records
            .iter()
            .any(|r| r["verdict"] == "revoked" && r["dst"] == "203.0.113.30"),
        "{records:?}"
    );
    let status = agent.status();
    assert!(
        status["revoked"].as_u64().is_some_and(|n| n >= 4),
        "{}",
        report(&format!("status: {status}"))
    );
    // The workload saw its own side fail, and did not lose the flows whose entry stays.
    let out = workload.output();
    for flow in &KEPT {
        assert!(
            !out.iter()
                .any(|l| l.starts_with(&format!("closed {} ", flow.spec))),
            "{}",
            report("a kept flow was closed")
        );
    }
}
