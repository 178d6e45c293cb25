//! The agent's metrics, scraped by a real Prometheus (Debian's): after a known sequence of
//! allowed and refused connections, Prometheus's HTTP API returns those counts per namespace
//! and verdict. `promtool` checks the exposition.

use std::{
    fs,
    io::Write as _,
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::harness::{check, registry_only, Agent, Hosts, Want, World};

const SHOP: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  addresses: [198.51.100.10]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
"#;

/// Prometheus on a free loopback port, scraping `target` every second; killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
}

impl Prometheus {
    fn start(world: &World, target: &str) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let config = world.dir.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s}}\nscrape_configs:\n- job_name: enforcer\n  static_configs: [{{targets: ['{target}']}}]\n"
            ),
        )
        .expect("writing prometheus.yml");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                world.dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(world.dir.join("prometheus.log")).expect("log"))
            .spawn()
            .expect("starting prometheus (cargo xtask setup installs Debian's)");
        Self { child, port }
    }

    /// The value of an instant query's single sample, if it has one.
    fn query(&self, promql: &str) -> Option<f64> {
        let out = Command::new("curl")
            .args(["-s", "-m", "2", "--get"])
            .arg(format!("http://127.0.0.1:{}/api/v1/query", self.port))
            .args(["--data-urlencode", &format!("query={promql}")])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse().ok())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get(addr: &str, path: &str) -> (String, String) {
    let out = Command::new("curl")
        .args(["-s", "-m", "2", "-w", "\n%{http_code}"])
        .arg(format!("http://{addr}{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
    (body.to_string(), code.to_string())
}

#[test]
fn prometheus_counts_allowed_and_refused_connections_per_namespace() {
    let world = World::new("metrics");
    let _hosts = Hosts::new(&world);
    world.write_policy("shop.yaml", SHOP);
    let mesh = registry_only(&world);
    let agent = Agent::start(&world, &["--mesh-config", &mesh, "--namespace", "shop"]);
    let addr = agent.status()["metrics_addr"]
        .as_str()
        .unwrap_or_else(|| panic!("no metrics_addr in the status\n{}", agent.log()))
        .to_string();
    assert_eq!(get(&addr, "/healthz").1, "200");
    assert_eq!(get(&addr, "/readyz").1, "200");

    // 3 allowed, 2 refused, from namespace shop.
    for _ in 0..3 {
        check(&agent, "shop", "tcp", "198.51.100.10", 80, Want::Allowed);
    }
    for _ in 0..2 {
        check(&agent, "shop", "tcp", "198.51.100.11", 80, Want::Denied);
    }

    let (text, code) = get(&addr, "/metrics");
    assert_eq!(code, "200", "{text}");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup installs it)");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("writing to promtool");
    let checked = promtool.wait_with_output().expect("promtool");
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // `enforcer status` reads the same from the running agent.
    let out = Command::new(crate::harness::ENFORCER)
        .arg("status")
        .arg("--status-file")
        .arg(world.dir.join("status.json"))
        .output()
        .expect("enforcer status");
    let table = String::from_utf8_lossy(&out.stdout);
    let shop: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("shop "))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    // Scope, mode, Sidecar, rules (the entry's, and DNS's), workloads (the namespace's
    // cgroup), then the verdicts.
    assert_eq!(shop.len(), 9, "{table}");
    assert_eq!(shop[..3], ["shop", "REGISTRY_ONLY", "-"], "{table}");
    assert!(shop[3].parse::<usize>().is_ok_and(|n| n >= 1), "{table}");
    assert_eq!(shop[4..], ["1", "3", "2", "0", "0"], "{table}");
    assert!(table.contains("allow_exact"), "{table}");

    let prometheus = Prometheus::start(&world, &addr);
    let query = |verdict: &str| {
        format!(
            "sum(enforcer_verdicts_total{{namespace=\"shop\",hook=\"socket\",verdict=\"{verdict}\"}})"
        )
    };
    let start = Instant::now();
    let counts = loop {
        let got = (
            prometheus.query(&query("allowed")),
            prometheus.query(&query("denied")),
        );
        if got == (Some(3.0), Some(2.0)) || start.elapsed() > Duration::from_secs(30) {
            break got;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(
        counts,
        (Some(3.0), Some(2.0)),
        "Prometheus's counts for shop (allowed, denied)\n{}",
        fs::read_to_string(world.dir.join("prometheus.log")).unwrap_or_default()
    );
    assert_eq!(prometheus.query("enforcer_kernel_maps_readable"), Some(1.0));
    // The records, by reason: the two refusals.
    assert_eq!(
        prometheus.query(
            "sum(enforcer_records_total{namespace=\"shop\",verdict=\"denied\",reason=\"no_rule\"})"
        ),
        Some(2.0)
    );
    assert_eq!(
        prometheus.query("enforcer_objects{kind=\"ServiceEntry\"}"),
        Some(1.0)
    );
}

#[test]
fn a_metrics_port_still_taken_is_tried_again_until_it_is_free() {
    let world = World::new("metricsbusy");
    let taken = TcpListener::bind("127.0.0.1:0").expect("a port");
    let addr = taken.local_addr().expect("address").to_string();
    let agent = Agent::start(&world, &["--metrics-addr", &addr]);
    assert!(
        agent.status()["metrics_addr"].is_null(),
        "{}",
        agent.status()
    );
    assert!(
        agent.log().contains("trying again every 5 s"),
        "{}",
        agent.log()
    );
    drop(taken);
    agent.wait_for(
        Duration::from_secs(15),
        "the metrics on the freed port",
        || get(&addr, "/healthz").1 == "200",
    );
}
