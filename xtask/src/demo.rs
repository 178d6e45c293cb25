//! `cargo xtask demo`: seeds 000, 001 (the egress gateway included), 002 and 003 live on this
//! machine.
//!
//! An "internet" network namespace holds test hosts on documentation addresses, dnsmasq on
//! loopback serves their names, and the agent runs from policies copied in step by step. Clients
//! resolve through that dnsmasq (a private mount namespace gives them their own resolv.conf),
//! exactly as an application would. Each expectation is checked, so the demo fails loudly if
//! enforcement does not behave.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use enforcer_testkit::{Dnsmasq, TestNet};

use crate::sh;

mod gateway;

const NETNS: &str = "internet";
const VETH: &str = "enf-demo0";
const PIN_ROOT: &str = "/sys/fs/bpf/enforcer-demo";
const CGROUP_PARENT: &str = "enforcer-demo";
const DNS_IP: &str = "127.0.0.153";
/// A CDN's DNS server, in the "internet" namespace: a fresh address on every answer.
const CDN_DNS: &str = "203.0.113.53";
/// Where its answers point (the test hosts' own, so that every fresh address accepts).
const CDN_POOL: &str = "198.51.100.128/25";
const OTHER_POOL: &str = "198.51.100.64/26";
const WIKI_POOL: &str = "203.0.113.128/25";
// 192.0.2.0/24 is avoided: some hosts (these CI machines among them) use it for their uplink.
const RECORDS: &[(&str, &str)] = &[
    ("www.wikipedia.org", "203.0.113.10"),
    ("www.wikipedia.org", "2001:db8::10"),
    ("db.example.com", "198.51.100.20"),
    ("www.example.org", "203.0.113.30"),
    // Seed 002: one name, two WorkloadEntries.
    ("app.internal.com", "203.0.113.40"),
    ("app.internal.com", "203.0.113.41"),
];

struct Demo {
    bin: PathBuf,
    work: PathBuf,
    agent: Option<Child>,
    net: Option<TestNet>,
    dns: Option<Dnsmasq>,
    cdn: Option<Child>,
    /// Envoy as istio-egressgateway (step 7).
    gateway: Option<enforcer_testkit::envoy::Envoy>,
    /// Local pods' `enforcer exec` processes.
    pods: Vec<Child>,
}

pub fn run(bin: &Path) -> anyhow::Result<()> {
    if !sh::is_root() {
        bail!("the demo loads BPF programs and creates a network namespace: run it as root");
    }
    let work = std::env::temp_dir().join("enforcer-demo");
    let mut demo = Demo {
        bin: bin.to_path_buf(),
        work,
        agent: None,
        net: None,
        dns: None,
        cdn: None,
        gateway: None,
        pods: Vec::new(),
    };
    demo.cleanup();
    let result = demo.scenario();
    demo.cleanup();
    if result.is_ok() {
        println!("\nDemo complete: every expectation held. Cleaned up the netns, dnsmasq, agent, pins and cgroups.");
    }
    result
}

impl Demo {
    fn scenario(&mut self) -> anyhow::Result<()> {
        self.start_world()?;
        let policies = self.work.join("policies");
        let mesh = self.work.join("mesh.yaml");
        let src = sh::root().join("policies");
        fs::copy(src.join("mesh/allow-any.yaml"), &mesh)?;
        self.start_agent(&policies, &mesh)?;

        title("Step 1: mesh outboundTrafficPolicy ALLOW_ANY (Istio's default): everything is reachable");
        self.expect_curl("default", "http://www.wikipedia.org/", true)?;
        self.expect_tcp("default", "www.example.org", 443, true)?;
        self.expect_tcp("default", "db.example.com", 5432, true)?;

        title("Step 2: install with meshConfig.outboundTrafficPolicy.mode REGISTRY_ONLY (policies/mesh/registry-only.yaml)");
        self.change(
            || fs::copy(src.join("mesh/registry-only.yaml"), &mesh).map(drop),
            "default",
            "www.wikipedia.org",
            80,
            false,
        )?;
        self.expect_curl("default", "http://www.wikipedia.org/", false)?;
        self.show_last_denial()?;

        title(
            "Step 3: apply the wikipedia-egress ServiceEntry (policies/001-wikipedia-egress.yaml)",
        );
        let copy = |name: &str| fs::copy(src.join(name), policies.join(name)).map(drop);
        self.change(
            || copy("001-wikipedia-egress.yaml"),
            "default",
            "www.wikipedia.org",
            80,
            true,
        )?;
        self.expect_curl("default", "http://www.wikipedia.org/", true)?;
        self.expect_tcp("default", "www.wikipedia.org", 443, true)?;
        self.expect_tcp("default", "www.example.org", 443, false)?;

        title("Step 4: apply the postgres-db ServiceEntry in namespace frontend (policies/000-postgres-db.yaml)");
        self.change(
            || copy("000-postgres-db.yaml"),
            "frontend",
            "db.example.com",
            5432,
            true,
        )?;
        self.expect_tcp("frontend", "db.example.com", 5432, true)?;
        self.expect_tcp("default", "db.example.com", 5432, false)?;
        self.show_last_denial()?;
        self.events(
            &["-n", "default", "--port", "5432", "--last", "1"],
            "(db.example.com) tcp DENIED no_rule",
        )?;
        self.explain(
            &["-n", "default", "db.example.com:5432"],
            false,
            "exported only to [frontend]",
        )?;
        self.explain(
            &["-n", "frontend", "db.example.com:5432"],
            true,
            "by ServiceEntry frontend/postgres-db",
        )?;

        title("Step 5 (seed 002): app.internal.com served by two WorkloadEntries labelled app=external (policies/002-workload-entry.yaml)");
        self.expect_curl("default", "http://app.internal.com/", false)?;
        self.change(
            || copy("002-workload-entry.yaml"),
            "default",
            "203.0.113.40",
            80,
            true,
        )?;
        self.expect_curl("default", "http://app.internal.com/", true)?;
        self.expect_tcp("default", "203.0.113.40", 80, true)?;
        self.expect_tcp("default", "203.0.113.41", 80, true)?;
        self.expect_tcp("default", "www.example.org", 80, false)?;

        title("Step 6 (seed 003): github, apt and pip hosts, and *.wikipedia.org, with resolution NONE: allowed by what the workload's own DNS answers say (policies/003-*.yaml)");
        self.start_cdn()?;
        copy("003-external-hosts.yaml")?;
        copy("003-wikipedia-wildcard.yaml")?;
        std::thread::sleep(Duration::from_millis(300));
        println!("  {CDN_DNS} answers like a CDN: a fresh address from {CDN_POOL} on every query, TTL 1 s");
        self.expect_lookups(
            "default",
            &[
                "--name",
                "pypi.org",
                "--name",
                "files.pythonhosted.org",
                "--name",
                "github.com",
            ],
            443,
            300,
            true,
        )?;
        self.expect_lookups(
            "default",
            &["--name", "deb.debian.org", "--name", "security.debian.org"],
            80,
            100,
            true,
        )?;
        self.expect_lookups(
            "default",
            &["--pattern", "lang{i}.wikipedia.org"],
            443,
            100,
            true,
        )?;
        self.expect_lookups("default", &["--name", "wikipedia.org"], 443, 5, false)?;
        self.expect_lookups(
            "default",
            &["--name", "downloads.evil.example"],
            443,
            5,
            false,
        )?;
        self.show_last_denial()?;
        self.expect_lookups("frontend", &["--name", "pypi.org"], 443, 5, false)?;
        self.gateway_steps()
    }

    /// The CDN's authoritative server in the "internet" namespace, and its pools made the
    /// test hosts' own addresses.
    fn start_cdn(&mut self) -> anyhow::Result<()> {
        let in_ns = |args: &[&str]| -> anyhow::Result<()> {
            let ok = Command::new("ip")
                .args(["netns", "exec", NETNS])
                .args(args)
                .status()?
                .success();
            anyhow::ensure!(ok, "ip netns exec {NETNS} {}", args.join(" "));
            Ok(())
        };
        in_ns(&["ip", "addr", "add", &format!("{CDN_DNS}/32"), "dev", "lo"])?;
        for pool in [CDN_POOL, OTHER_POOL, WIKI_POOL] {
            in_ns(&["ip", "route", "add", "local", pool, "dev", "lo"])?;
        }
        let ready = self.work.join("cdn-ready");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", NETNS, enforcer_testkit::python()])
            .arg(enforcer_testkit::script("dns_server.py"))
            .args(["--listen", &format!("{CDN_DNS}:53"), "--ttl", "1"]);
        for zone in ["pypi.org", "pythonhosted.org", "github.com", "debian.org"] {
            cmd.args(["--rotate", &format!("{zone}={CDN_POOL}")]);
        }
        cmd.args(["--rotate", &format!("wikipedia.org={WIKI_POOL}")])
            .args(["--rotate", &format!("evil.example={OTHER_POOL}")])
            .arg("--ready")
            .arg(&ready)
            .stdout(Stdio::null());
        self.cdn = Some(cmd.spawn().context("starting dns_server.py")?);
        wait(Duration::from_secs(10), || ready.exists())
            .context("the CDN's DNS server did not start")
    }

    /// `count` lookups through glibc at the CDN's server, each connected to `port` at once;
    /// all must connect (`allowed`) or all be refused.
    fn expect_lookups(
        &self,
        ns: &str,
        names: &[&str],
        port: u16,
        count: u32,
        allowed: bool,
    ) -> anyhow::Result<()> {
        let resolve = enforcer_testkit::script("resolve.py").display().to_string();
        let port_s = port.to_string();
        let count_s = count.to_string();
        let mut cmd = vec![
            enforcer_testkit::python(),
            &resolve,
            "--mode",
            "glibc",
            "--private-resolv",
            "--server",
            CDN_DNS,
            "--json",
            "--connect-port",
            &port_s,
            "--count",
            &count_s,
        ];
        cmd.extend(names);
        let out = sh::output(&mut self.client(ns, &cmd))?;
        let got: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("resolve.py: {}", String::from_utf8_lossy(&out.stderr)))?;
        let class = |c: &str| got["counts"][c].as_u64().unwrap_or(0);
        let what = format!(
            "{count} x resolve+connect {}:{port}",
            names
                .iter()
                .filter(|n| !n.starts_with("--"))
                .copied()
                .collect::<Vec<_>>()
                .join(",")
        );
        let shown = format!(
            "{} connected, {} refused (EPERM), {} failed to resolve",
            class("ok"),
            class("eperm"),
            class("resolve_failed")
        );
        let want = if allowed { "ok" } else { "eperm" };
        report(ns, &what, &shown, class(want) == u64::from(count))
    }

    fn start_world(&mut self) -> anyhow::Result<()> {
        title("Setting up: netns \"internet\" with test hosts, dnsmasq on loopback, the agent");
        fs::create_dir_all(self.work.join("policies"))?;
        let addrs: Vec<&str> = RECORDS.iter().map(|(_, ip)| *ip).collect();
        let mut net = TestNet::new(NETNS, VETH, &addrs)?;
        net.serve(&[80, 443, 5432], &[])?;
        gateway::route_back(&net)?;
        self.net = Some(net);
        fs::write(
            self.work.join("resolv.conf"),
            format!("nameserver {DNS_IP}\n"),
        )?;
        let listen = SocketAddr::new(DNS_IP.parse()?, 53);
        self.dns = Some(Dnsmasq::start(listen, &self.work, 30, RECORDS)?);
        for (name, ip) in RECORDS {
            println!("  {name:<20} -> {ip}");
        }
        Ok(())
    }

    fn start_agent(&mut self, policies: &Path, mesh: &Path) -> anyhow::Result<()> {
        let out = fs::File::create(self.work.join("denials.jsonl"))?;
        let err = fs::File::create(self.work.join("agent.log"))?;
        let status = self.work.join("status.json");
        let agent = Command::new(&self.bin)
            .arg("run")
            .arg("--policies")
            .arg(policies)
            .arg("--mesh-config")
            .arg(mesh)
            .args([
                "--dns-server",
                &format!("{DNS_IP}:53"),
                // The resolvers whose answers teach: the demo's own and the CDN's.
                "--dns-upstream",
                DNS_IP,
                "--dns-upstream",
                CDN_DNS,
                "--allow-cidr",
                &format!("{CDN_DNS}/32"),
                "--namespace",
                "default",
                "--namespace",
                "frontend",
                "--namespace",
                "istio-system",
                "--pod-cidr",
                gateway::POD_CIDR,
                "--pod-cidr6",
                gateway::POD_CIDR6,
            ])
            .args(["--bpffs-root", PIN_ROOT, "--cgroup-parent", CGROUP_PARENT])
            .arg("--status-file")
            .arg(&status)
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("starting the agent")?;
        self.agent = Some(agent);
        wait(Duration::from_secs(15), || status.exists())
            .context("the agent did not start; see /tmp/enforcer-demo/agent.log")?;
        println!(
            "  agent: {} run --policies {} --mesh-config {} (log: {})",
            self.bin.display(),
            policies.display(),
            mesh.display(),
            self.work.join("agent.log").display()
        );
        Ok(())
    }

    /// A client command inside namespace `ns`, resolving names through the demo's dnsmasq.
    fn client(&self, ns: &str, cmd: &[&str]) -> Command {
        let script = format!(
            "mount --bind {} /etc/resolv.conf && exec \"$0\" exec --namespace {ns} --bpffs-root {PIN_ROOT} --cgroup-parent {CGROUP_PARENT} -- \"$@\"",
            self.work.join("resolv.conf").display()
        );
        let mut c = Command::new("unshare");
        c.args(["--mount", "sh", "-c", &script])
            .arg(&self.bin)
            .args(cmd);
        c
    }

    fn expect_curl(&self, ns: &str, url: &str, allowed: bool) -> anyhow::Result<()> {
        let out = sh::output(&mut self.client(
            ns,
            &[
                "curl",
                "-sS",
                "-m",
                "3",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                url,
            ],
        ))?;
        let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let ok = out.status.success() && code == "200";
        let shown = if ok {
            format!("HTTP {code}")
        } else {
            format!(
                "refused: {err} (curl exit {})",
                out.status.code().unwrap_or(-1)
            )
        };
        report(ns, &format!("curl {url}"), &shown, ok == allowed)
    }

    fn expect_tcp(&self, ns: &str, host: &str, port: u16, allowed: bool) -> anyhow::Result<()> {
        let got = self.tcp(ns, host, port)?;
        let ok = got.starts_with("ok");
        let shown = if ok {
            "connected".to_string()
        } else if got == "EPERM" {
            "refused: connect() failed with EPERM".to_string()
        } else {
            got
        };
        report(ns, &format!("connect {host}:{port}"), &shown, ok == allowed)
    }

    fn tcp(&self, ns: &str, host: &str, port: u16) -> anyhow::Result<String> {
        let probe = enforcer_testkit::script("probe.py");
        let probe = probe.display().to_string();
        let out = sh::output(&mut self.client(
            ns,
            &[
                enforcer_testkit::python(),
                &probe,
                "tcp",
                host,
                &port.to_string(),
            ],
        ))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Makes a policy change and reports how long the kernel took to act on it.
    fn change(
        &self,
        act: impl FnOnce() -> std::io::Result<()>,
        ns: &str,
        host: &str,
        port: u16,
        allowed: bool,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        act()?;
        wait(Duration::from_secs(5), || {
            self.tcp(ns, host, port)
                .is_ok_and(|r| r.starts_with("ok") == allowed)
        })
        .with_context(|| format!("the change did not take effect for {host}:{port}"))?;
        println!("  (took effect in {} ms, measured from the file write to the first connect that shows it)", start.elapsed().as_millis());
        Ok(())
    }

    /// Runs `enforcer explain` against the demo agent and checks its verdict and reason.
    fn explain(&self, args: &[&str], allowed: bool, says: &str) -> anyhow::Result<()> {
        let out = Command::new(&self.bin)
            .arg("explain")
            .args(["--bpffs-root", PIN_ROOT, "--cgroup-parent", CGROUP_PARENT])
            .arg("--status-file")
            .arg(self.work.join("status.json"))
            .args(args)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        println!("  $ enforcer explain {}", args.join(" "));
        for line in text.lines() {
            println!("    {line}");
        }
        let as_expected = out.status.code() == Some(if allowed { 0 } else { 1 })
            && text.contains(says)
            && !text.contains("DISAGREES");
        anyhow::ensure!(
            as_expected,
            "enforcer explain did not say {says:?} (exit {:?})",
            out.status.code()
        );
        Ok(())
    }

    /// `enforcer events`, asking the running agent, as an operator would follow refusals.
    fn events(&self, args: &[&str], says: &str) -> anyhow::Result<()> {
        let out = Command::new(&self.bin)
            .arg("events")
            .arg("--status-file")
            .arg(self.work.join("status.json"))
            .args(args)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        println!("  $ enforcer events {}", args.join(" "));
        for line in text.lines() {
            println!("    {line}");
        }
        anyhow::ensure!(
            out.status.success() && text.contains(says),
            "enforcer events did not show {says:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn show_last_denial(&self) -> anyhow::Result<()> {
        std::thread::sleep(Duration::from_millis(100));
        let log = fs::read_to_string(self.work.join("denials.jsonl"))?;
        if let Some(line) = log.lines().last() {
            println!("  agent's refusal record:\n    {line}");
        }
        Ok(())
    }

    fn cleanup(&mut self) {
        // Pods first, while the agent that removes their network namespaces still runs.
        self.gateway = None;
        for mut pod in self.pods.drain(..) {
            let group = format!("-{}", pod.id());
            let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
            let _ = pod.wait();
        }
        if self.agent.is_some() {
            std::thread::sleep(Duration::from_millis(500));
        }
        if let Some(mut agent) = self.agent.take() {
            let _ = Command::new("kill").arg(agent.id().to_string()).status();
            let _ = agent.wait();
        }
        if let Some(mut cdn) = self.cdn.take() {
            let _ = cdn.kill();
            let _ = cdn.wait();
        }
        // Their drops kill dnsmasq and the test hosts, and remove the veth and netns.
        self.dns = None;
        self.net = None;
        let quiet = |args: &[&str]| {
            let _ = Command::new(args[0])
                .args(&args[1..])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        quiet(&[
            &self.bin.display().to_string(),
            "teardown",
            "--bpffs-root",
            PIN_ROOT,
            "--cgroup-parent",
            CGROUP_PARENT,
        ]);
        let _ = fs::remove_dir_all(&self.work);
    }
}

fn title(text: &str) {
    println!("\n== {text}");
}

fn report(ns: &str, what: &str, shown: &str, as_expected: bool) -> anyhow::Result<()> {
    let mark = if as_expected { "ok" } else { "UNEXPECTED" };
    println!("  [{ns:<8}] {what:<38} -> {shown}   [{mark}]");
    if !as_expected {
        bail!("{ns}: {what}: {shown} was not expected");
    }
    Ok(())
}

fn wait(limit: Duration, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > limit {
            bail!("timed out after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
