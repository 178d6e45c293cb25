//! `cargo xtask bench`: everything measured side by side in one run, reported as ratios.
//!
//! - cost per run of every program, this build against a baseline commit (`bench_cost`);
//! - cost per run of the connect4 program (bpf_stats), with 10 and with 100,000 allow entries;
//! - loopback connect() rate with the programs attached vs detached, interleaved rounds;
//! - time from a ServiceEntry file change to the kernel enforcing it;
//! - the TC programs on a pod veth (`bench_tc`);
//! - DNS learning: lookups through the proxy vs direct, CPU, memory (`bench_dns`);
//! - HTTP direct, under the agent and through a sidecar-style Envoy (`bench_envoy`).
//!
//! Loopback stays always-allowed, so an enforced connect to 127.0.0.1 takes the longest allow
//! path: cgroup lookup, exact-map miss, scoped trie miss, global trie hit.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use enforcer_testkit::{Dnsmasq, TestNet};

use crate::sh;

pub const PIN_ROOT: &str = "/sys/fs/bpf/enforcer-bench";
pub const CGROUP_PARENT: &str = "enforcer-bench";
const NETNS: &str = "enforcer-bench";
const VETH: &str = "enf-bench0";
pub const TARGET: &str = "198.51.100.10";
const DNS_PORT: u16 = 5398;
const ROUNDS: usize = 7;
const CONNECTS_PER_ROUND: u32 = 20_000;
const CHANGES: usize = 10;

/// Which parts run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Only {
    All,
    /// The TC measures.
    Tc,
    /// The per-run costs against the baseline.
    Cost,
    /// DNS learning: lookup latency through the proxy vs direct, CPU, memory.
    Dns,
    /// HTTP requests direct, under the agent and through Envoy.
    Envoy,
}

/// Runs the measures `only` selects; `versions` name the commit the per-run costs compare with
/// and the agent `bin` (a commit, or "this build").
pub fn run(bin: &Path, only: Only, versions: [&str; 2]) -> anyhow::Result<()> {
    if !sh::is_root() {
        bail!("the benchmark loads BPF programs: run it as root");
    }
    let work = std::env::temp_dir().join("enforcer-bench");
    eprintln!("bench: waiting for the kernel tests' machine-wide lock");
    let lock = enforcer_testkit::machine_lock()?;
    let mut bench = Bench {
        bin: bin.to_path_buf(),
        pin_root: PIN_ROOT.into(),
        baseline: None,
        only,
        work,
        agent: None,
        dns: None,
        net: None,
        stats_before: fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
            .unwrap_or_else(|_| "0".into()),
        _machine: lock,
    };
    bench.cleanup();
    bench.all(versions)
    // Dropping `bench` cleans up, on failure (or a panic) too.
}

struct Row {
    entries: usize,
    ns_per_run: f64,
    attached: f64,
    detached: f64,
    peak_rss_mib: f64,
}

pub struct Bench {
    /// The agent binary in use, and its `--bpffs-root`.
    pub bin: PathBuf,
    pub pin_root: String,
    /// The baseline agent and its pin root, once built: torn down too when cleaning up.
    pub baseline: Option<(PathBuf, String)>,
    pub work: PathBuf,
    only: Only,
    agent: Option<Child>,
    dns: Option<Dnsmasq>,
    net: Option<TestNet>,
    /// kernel.bpf_stats_enabled as found, restored when done.
    stats_before: String,
    /// The kernel tests' machine-wide lock: they use the same address ranges and cgroup root.
    _machine: fs::File,
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = fs::write(
            "/proc/sys/kernel/bpf_stats_enabled",
            self.stats_before.trim(),
        );
        self.cleanup();
    }
}

/// A loopback port with no listener: each connect() is answered by an RST from the kernel, so a
/// round measures the syscall and the hook, with no user-space peer to compete for the CPU.
pub fn closed_port() -> anyhow::Result<SocketAddr> {
    let probe = TcpListener::bind("127.0.0.1:0")?;
    Ok(probe.local_addr()?)
}

impl Bench {
    fn all(&mut self, versions: [&str; 2]) -> anyhow::Result<()> {
        fs::create_dir_all(self.work.join("policies"))?;
        fs::write(
            self.work.join("mesh.yaml"),
            "outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n",
        )?;
        // A test host for the change measurements; it needs no listener (RST means allowed).
        let mut net = TestNet::new(NETNS, VETH, &[TARGET])?;
        net.serve(&[crate::bench_tc::ECHO_PORT], &[])?;
        // Pods' replies go back through the host.
        net.route_back(crate::bench_tc::POD_CIDR)?;
        net.route_back(crate::bench_tc::BARE_CIDR)?;
        self.net = Some(net);
        if self.only == Only::Envoy {
            return crate::bench_envoy::run(self, NETNS);
        }
        if self.only == Only::Dns {
            if let Some(net) = &self.net {
                crate::bench_dns::run(self, net)?;
            }
            return Ok(());
        }
        if self.only != Only::Tc {
            crate::bench_cost::run(self, versions)?;
            crate::bench_metrics::run(self)?;
        }
        if self.only == Only::Cost {
            return Ok(());
        }
        if self.only == Only::All {
            println!();
            self.connect_costs()?;
        }
        self.write_entries(0)?;
        self.start_agent()?;
        if self.only == Only::All {
            self.change_times()?;
        }
        if let Some(net) = &self.net {
            crate::bench_tc::run(self, net)?;
        }
        self.stop_agent();
        if self.only == Only::All {
            if let Some(net) = &self.net {
                crate::bench_dns::run(self, net)?;
            }
            crate::bench_envoy::run(self, NETNS)?;
        }
        Ok(())
    }

    /// Switches to another agent binary with its own pin root (the previous one stopped).
    pub fn use_agent(&mut self, bin: PathBuf, pin_root: &str) {
        self.stop_agent();
        self.bin = bin;
        self.pin_root = pin_root.into();
    }

    fn connect_costs(&mut self) -> anyhow::Result<()> {
        let target = closed_port()?;
        println!(
            "connect4 cost per run (bpf_stats), loopback connect() rate ({ROUNDS} interleaved rounds of {CONNECTS_PER_ROUND} connects\n\
             to a closed port, from a REGISTRY_ONLY namespace; loopback is allowed by the global trie, the longest\n\
             allow path: cgroup lookup, exact miss, scoped trie miss, global trie hit), and the agent's peak memory:"
        );

        let connect4 = format!("{}/programs/enforcer_connect4", self.pin_root);
        let mut table = Vec::new();
        for entries in [10usize, 100_000] {
            self.write_entries(entries)?;
            let mut attached = Vec::new();
            let mut detached = Vec::new();
            let mut ns_per_run = Vec::new();
            let mut peak_rss = 0u64;
            for _ in 0..ROUNDS {
                self.start_agent()?;
                // Rates with bpf_stats off (it adds two clock reads per run), then the exact
                // per-run cost in a separate pass with it on.
                set_bpf_stats(false)?;
                attached.push(self.connect_rate(target, true)?);
                set_bpf_stats(true)?;
                let before = prog_stats(&connect4)?;
                self.connect_rate(target, true)?;
                let after = prog_stats(&connect4)?;
                ns_per_run.push((after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64);
                set_bpf_stats(false)?;
                peak_rss = peak_rss.max(self.agent_peak_rss_kib());
                self.stop_agent();
                detached.push(self.connect_rate(target, false)?);
            }
            table.push(Row {
                entries,
                ns_per_run: median(&mut ns_per_run),
                attached: median(&mut attached),
                detached: median(&mut detached),
                peak_rss_mib: peak_rss as f64 / 1024.0,
            });
        }
        println!(
            "  {:>8} | {:>15} | {:>15} | {:>15} | {:>16} | {:>17} | {:>14}",
            "entries",
            "connect4 ns/run",
            "attached conn/s",
            "detached conn/s",
            "rate overhead",
            "ns/run / connect",
            "agent peak RSS"
        );
        for r in &table {
            // The program's exact cost as a share of one detached connect: noise-free, unlike the rates.
            let share = r.ns_per_run / (1e9 / r.detached) * 100.0;
            println!(
                "  {:>8} | {:>15.0} | {:>15.0} | {:>15.0} | {:>15.2}% | {:>16.2}% | {:>10.1} MiB",
                r.entries,
                r.ns_per_run,
                r.attached,
                r.detached,
                (r.detached / r.attached - 1.0) * 100.0,
                share,
                r.peak_rss_mib
            );
        }
        if let [small, large] = table.as_slice() {
            println!(
                "  connect4 cost, 100,000 vs 10 entries: {:.2}x",
                large.ns_per_run / small.ns_per_run
            );
        }

        Ok(())
    }

    fn change_times(&mut self) -> anyhow::Result<()> {
        println!("\nfile change to enforcement ({CHANGES} changes each; median and max):");
        for (label, yaml) in [
            ("STATIC entry added", static_entry()),
            ("DNS entry added (agent resolves first)", self.dns_entry()?),
        ] {
            let (mut add, mut remove) = (Vec::new(), Vec::new());
            for _ in 0..CHANGES {
                add.push(self.time_change(Some(&yaml), true)?);
                remove.push(self.time_change(None, false)?);
            }
            println!(
                "  {label:<40} allow: {:>6.1} ms median, {:>6.1} ms max",
                median(&mut add.clone()),
                max(&add)
            );
            println!(
                "  {:<40} deny:  {:>6.1} ms median, {:>6.1} ms max",
                "... and removed",
                median(&mut remove.clone()),
                max(&remove)
            );
        }
        Ok(())
    }

    /// A ServiceEntry with `n` IPv6 addresses (never contacted), so `n` exact map entries.
    fn write_entries(&self, n: usize) -> anyhow::Result<()> {
        let path = self.work.join("policies/bulk.yaml");
        if n == 0 {
            let _ = fs::remove_file(path);
            return Ok(());
        }
        let mut yaml = String::from(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: bulk, namespace: bench}\nspec:\n  hosts: [bulk.example.com]\n  resolution: STATIC\n  ports: [{number: 443, name: https, protocol: HTTPS}]\n  addresses:\n",
        );
        for i in 0..n {
            yaml.push_str(&format!(
                "  - 2001:db8:{:x}:{:x}::1\n",
                i / 65536 + 1,
                i % 65536
            ));
        }
        fs::write(path, yaml)?;
        Ok(())
    }

    pub fn start_agent(&mut self) -> anyhow::Result<()> {
        let status = self.work.join("status.json");
        let _ = fs::remove_file(&status);
        let log = fs::File::create(self.work.join("agent.log"))?;
        let child = Command::new(&self.bin)
            .arg("run")
            .arg("--policies")
            .arg(self.work.join("policies"))
            .arg("--mesh-config")
            .arg(self.work.join("mesh.yaml"))
            .args([
                "--namespace",
                "bench",
                "--bpffs-root",
                &self.pin_root,
                "--cgroup-parent",
                CGROUP_PARENT,
            ])
            .args(["--dns-server", &format!("127.0.0.1:{DNS_PORT}")])
            .args(["--pod-cidr", crate::bench_tc::POD_CIDR])
            .arg("--status-file")
            .arg(&status)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.agent = Some(child);
        let start = Instant::now();
        while !status.exists() {
            let exited = self
                .agent
                .as_mut()
                .and_then(|a| a.try_wait().ok().flatten());
            if exited.is_some() || start.elapsed() > Duration::from_secs(60) {
                bail!(
                    "the agent {} did not start; its log ends with:\n{}",
                    self.bin.display(),
                    self.agent_log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The last lines of the agent's log, for an error.
    pub fn agent_log_tail(&self) -> String {
        let log = fs::read_to_string(self.work.join("agent.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Stops the agent and detaches everything: the "detached" side of the comparison.
    pub fn stop_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        teardown(&self.bin, &self.pin_root);
    }

    /// The agent's peak RSS.
    fn agent_peak_rss_kib(&self) -> u64 {
        self.agent_pid().map_or(0, |pid| rss_kib(pid, "VmHWM:"))
    }

    /// The running agent's pid.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// `enforcer exec` into the bench namespace (and a local pod named `netns`), up to `--`.
    pub fn enforced(&self, netns: Option<&str>) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(["exec", "--namespace", "bench"]);
        if let Some(netns) = netns {
            c.args(["--netns", netns]);
        }
        c.args([
            "--bpffs-root",
            &self.pin_root,
            "--cgroup-parent",
            CGROUP_PARENT,
            "--",
        ]);
        c
    }

    fn connect_rate(&self, target: SocketAddr, enforced: bool) -> anyhow::Result<f64> {
        let me = std::env::current_exe()?;
        let mut cmd = if enforced {
            let mut c = self.enforced(None);
            c.arg(&me);
            c
        } else {
            Command::new(&me)
        };
        let out = sh::output(cmd.args([
            "bench-client",
            "connect",
            &target.to_string(),
            &CONNECTS_PER_ROUND.to_string(),
        ]))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let secs: f64 = text.trim().parse().with_context(|| {
            format!(
                "bench client said {text:?} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok(f64::from(CONNECTS_PER_ROUND) / secs)
    }

    /// Writes (or removes) the policy file and measures until a connect from the namespace shows it.
    fn time_change(&self, yaml: Option<&str>, allowed: bool) -> anyhow::Result<f64> {
        let mut client = self
            .enforced(None)
            .arg(std::env::current_exe()?)
            .args([
                "bench-client",
                "poll",
                &format!("{TARGET}:80"),
                if allowed { "allow" } else { "deny" },
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut stdout = BufReader::new(client.stdout.take().context("client stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?; // "ready": the client is in its cgroup and polling.
        let path = self.work.join("policies/change.yaml");
        let start = Instant::now();
        match yaml {
            Some(yaml) => fs::write(&path, yaml)?,
            None => fs::remove_file(&path)?,
        }
        writeln!(client.stdin.take().context("client stdin")?, "go")?;
        line.clear();
        stdout.read_line(&mut line)?;
        let elapsed = start.elapsed();
        client.wait()?;
        if line.trim() != "done" {
            bail!("the change was not seen within the client's limit: {line:?}");
        }
        Ok(elapsed.as_secs_f64() * 1000.0)
    }

    /// A DNS entry, answered by a dnsmasq started here on loopback.
    fn dns_entry(&mut self) -> anyhow::Result<String> {
        let listen = SocketAddr::from(([127, 0, 0, 1], DNS_PORT));
        self.dns = Some(Dnsmasq::start(
            listen,
            &self.work,
            300,
            &[("change.example.com", TARGET)],
        )?);
        Ok(static_entry().replace(
            &format!("addresses: [{TARGET}]\n  resolution: STATIC"),
            "resolution: DNS",
        ))
    }

    fn cleanup(&mut self) {
        self.stop_agent();
        if let Some((bin, pin_root)) = &self.baseline {
            teardown(bin, pin_root);
        }
        // Their drops stop dnsmasq and remove the veth and netns.
        self.dns = None;
        self.net = None;
        let _ = fs::remove_dir_all(&self.work);
    }
}

/// `enforcer teardown` of an agent's pins and cgroup links.
fn teardown(bin: &Path, pin_root: &str) {
    let _ = sh::output(Command::new(bin).args([
        "teardown",
        "--bpffs-root",
        pin_root,
        "--cgroup-parent",
        CGROUP_PARENT,
    ]));
}

fn static_entry() -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: change, namespace: bench}}\nspec:\n  hosts: [change.example.com]\n  addresses: [{TARGET}]\n  resolution: STATIC\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n")
}

pub fn set_bpf_stats(on: bool) -> anyhow::Result<()> {
    fs::write(
        "/proc/sys/kernel/bpf_stats_enabled",
        if on { "1" } else { "0" },
    )
    .context("setting kernel.bpf_stats_enabled")
}

/// bpftool's run_time_ns and run_cnt for a pinned program.
pub fn prog_stats(pin: &str) -> anyhow::Result<(u64, u64)> {
    let out = sh::output(Command::new("bpftool").args(["prog", "show", "pinned", pin]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> Option<u64> {
        let mut words = text.split_whitespace();
        words.find(|w| *w == name)?;
        words.next()?.parse().ok()
    };
    Ok((
        field("run_time_ns").unwrap_or(0),
        field("run_cnt").unwrap_or(0),
    ))
}

/// A `/proc/PID/status` memory line (`VmHWM:` peak, `VmRSS:` now), in KiB.
pub fn rss_kib(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

/// The client side, run inside the measured cgroup: `bench-client connect ADDR N` prints the
/// seconds N connects took; `bench-client poll ADDR allow|deny` prints `ready`, waits for a line,
/// then connects every 0.2 ms until the verdict flips (at most 10 s) and prints `done`.
pub fn client(args: &[String]) -> anyhow::Result<()> {
    if let [mode, rest @ ..] = args {
        if matches!(mode.as_str(), "sendto" | "socket" | "setsockopt" | "echo") {
            return crate::bench_cost::client(mode, rest);
        }
        if matches!(mode.as_str(), "http" | "http-serve" | "refused") {
            return crate::bench_http::client(mode, rest);
        }
    }
    let [mode, addr, rest @ ..] = args else {
        bail!("usage: bench-client connect|poll ADDR ...")
    };
    let addr: SocketAddr = addr.parse()?;
    match (mode.as_str(), rest) {
        ("connect", [n]) => {
            let n: u32 = n.parse()?;
            let start = Instant::now();
            for _ in 0..n {
                match TcpStream::connect(addr) {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                    Err(e) => bail!("connect to {addr}: {e}"),
                    Ok(_) => bail!("{addr} was expected to be closed"),
                }
            }
            println!("{}", start.elapsed().as_secs_f64());
        }
        ("poll", [want]) => {
            let want_allowed = want == "allow";
            println!("ready");
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                // EPERM is the kernel's refusal; anything else (even "connection refused") got through.
                let refused = matches!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)), Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied);
                if refused != want_allowed {
                    println!("done");
                    return Ok(());
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            println!("timeout");
        }
        ("stream", []) => crate::bench_tc::stream(addr)?,
        _ => bail!("usage: bench-client connect ADDR N | poll ADDR allow|deny | stream ADDR"),
    }
    Ok(())
}
