//! `cargo xtask bench`: everything measured side by side in one run, reported as ratios.
//!
//! - cost per run of the connect4 program (bpf_stats), with 10 and with 100,000 allow entries;
//! - loopback connect() rate with the programs attached vs detached, interleaved rounds;
//! - time from a ServiceEntry file change to the kernel enforcing it.
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

use crate::sh;

const PIN_ROOT: &str = "/sys/fs/bpf/enforcer-bench";
const CGROUP_PARENT: &str = "enforcer-bench";
const NETNS: &str = "enforcer-bench";
const VETH: &str = "enf-bench0";
const TARGET: &str = "198.51.100.10";
const ROUNDS: usize = 5;
const CONNECTS_PER_ROUND: u32 = 20_000;
const CHANGES: usize = 10;

pub fn run(bin: &Path) -> anyhow::Result<()> {
    if !sh::is_root() {
        bail!("the benchmark loads BPF programs: run it as root");
    }
    let work = std::env::temp_dir().join("enforcer-bench");
    let mut bench = Bench {
        bin: bin.to_path_buf(),
        work,
        agent: None,
        dns: None,
    };
    bench.cleanup();
    let stats_before =
        fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_else(|_| "0".into());
    fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
        .context("enabling kernel.bpf_stats_enabled")?;
    let result = bench.all();
    let _ = fs::write("/proc/sys/kernel/bpf_stats_enabled", stats_before.trim());
    bench.cleanup();
    result
}

struct Bench {
    bin: PathBuf,
    work: PathBuf,
    agent: Option<Child>,
    dns: Option<Child>,
}

struct Listener {
    addr: SocketAddr,
}

impl Listener {
    /// Accepts and drops connections on loopback, on a thread of its own.
    fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                drop(stream);
            }
        });
        Ok(Self { addr })
    }
}

impl Bench {
    fn all(&mut self) -> anyhow::Result<()> {
        fs::create_dir_all(self.work.join("policies"))?;
        fs::write(
            self.work.join("mesh.yaml"),
            "outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n",
        )?;
        self.netns()?;
        let listener = Listener::start()?;
        println!("connect4 cost per run (bpf_stats) and loopback connect() rate, {ROUNDS} interleaved rounds of {CONNECTS_PER_ROUND} connects:");

        let mut table = Vec::new();
        for entries in [10usize, 100_000] {
            self.write_entries(entries)?;
            let mut attached = Vec::new();
            let mut detached = Vec::new();
            let mut ns_per_run = Vec::new();
            for _ in 0..ROUNDS {
                self.start_agent()?;
                let before = prog_stats()?;
                attached.push(self.connect_rate(&listener, true)?);
                let after = prog_stats()?;
                ns_per_run.push((after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64);
                self.stop_agent();
                detached.push(self.connect_rate(&listener, false)?);
            }
            table.push((
                entries,
                median(&mut ns_per_run),
                median(&mut attached),
                median(&mut detached),
            ));
        }
        println!(
            "  {:>8} | {:>14} | {:>16} | {:>16} | {:>8}",
            "entries", "connect4 ns/run", "attached conn/s", "detached conn/s", "overhead"
        );
        for (entries, ns, attached, detached) in &table {
            println!(
                "  {entries:>8} | {ns:>14.0} | {attached:>16.0} | {detached:>16.0} | {:>7.2}%",
                (detached / attached - 1.0) * 100.0
            );
        }
        if let [(_, small, ..), (_, large, ..)] = table.as_slice() {
            println!("  cost ratio, 100,000 vs 10 entries: {:.2}x", large / small);
        }

        println!("\nfile change to enforcement ({CHANGES} changes each; median and max):");
        self.write_entries(0)?;
        self.start_agent()?;
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
        self.stop_agent();
        Ok(())
    }

    fn netns(&self) -> anyhow::Result<()> {
        for args in [
            vec!["ip", "netns", "add", NETNS],
            vec![
                "ip",
                "link",
                "add",
                VETH,
                "type",
                "veth",
                "peer",
                "name",
                "enf-bench1",
            ],
            vec!["ip", "link", "set", "enf-bench1", "netns", NETNS],
            vec!["ip", "addr", "add", "198.51.100.1/24", "dev", VETH],
            vec!["ip", "link", "set", VETH, "up"],
            vec![
                "ip",
                "netns",
                "exec",
                NETNS,
                "ip",
                "addr",
                "add",
                "198.51.100.10/24",
                "dev",
                "enf-bench1",
            ],
            vec![
                "ip",
                "netns",
                "exec",
                NETNS,
                "ip",
                "link",
                "set",
                "enf-bench1",
                "up",
            ],
        ] {
            sh::output(Command::new(args[0]).args(&args[1..]))?;
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

    fn start_agent(&mut self) -> anyhow::Result<()> {
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
                PIN_ROOT,
                "--cgroup-parent",
                CGROUP_PARENT,
            ])
            .args(["--dns-server", "127.0.0.1:5398"])
            .arg("--status-file")
            .arg(&status)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.agent = Some(child);
        let start = Instant::now();
        while !status.exists() {
            if start.elapsed() > Duration::from_secs(60) {
                bail!(
                    "the agent did not start; see {}",
                    self.work.join("agent.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stops the agent and detaches everything: the "detached" side of the comparison.
    fn stop_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = sh::output(Command::new(&self.bin).args([
            "teardown",
            "--bpffs-root",
            PIN_ROOT,
            "--cgroup-parent",
            CGROUP_PARENT,
        ]));
    }

    /// Connects per second from a client in the enforced namespace (or, detached, in a plain
    /// cgroup of the same depth).
    fn connect_rate(&self, listener: &Listener, enforced: bool) -> anyhow::Result<f64> {
        let me = std::env::current_exe()?;
        let mut cmd = if enforced {
            let mut c = Command::new(&self.bin);
            c.args([
                "exec",
                "--namespace",
                "bench",
                "--bpffs-root",
                PIN_ROOT,
                "--cgroup-parent",
                CGROUP_PARENT,
                "--",
            ]);
            c.arg(&me);
            c
        } else {
            Command::new(&me)
        };
        let out = sh::output(cmd.args([
            "bench-client",
            "connect",
            &listener.addr.to_string(),
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
        let mut client = Command::new(&self.bin)
            .args([
                "exec",
                "--namespace",
                "bench",
                "--bpffs-root",
                PIN_ROOT,
                "--cgroup-parent",
                CGROUP_PARENT,
                "--",
            ])
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
        fs::write(
            self.work.join("dns-hosts"),
            format!("{TARGET} change.example.com\n"),
        )?;
        let child = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
            ])
            .args([
                "--listen-address=127.0.0.1",
                "--port=5398",
                "--user=root",
                "--pid-file=",
                "--local-ttl=300",
            ])
            .arg(format!(
                "--addn-hosts={}",
                self.work.join("dns-hosts").display()
            ))
            .stderr(Stdio::null())
            .spawn()
            .context("starting dnsmasq")?;
        self.dns = Some(child);
        std::thread::sleep(Duration::from_millis(300));
        Ok(static_entry().replace(
            &format!("addresses: [{TARGET}]\n  resolution: STATIC"),
            "resolution: DNS",
        ))
    }

    fn cleanup(&mut self) {
        self.stop_agent();
        let _ = sh::output(Command::new("ip").args(["link", "del", VETH]));
        let _ = sh::output(Command::new("ip").args(["netns", "del", NETNS]));
        if let Some(mut child) = self.dns.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.work);
    }
}

fn static_entry() -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: change, namespace: bench}}\nspec:\n  hosts: [change.example.com]\n  addresses: [{TARGET}]\n  resolution: STATIC\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n")
}

/// bpftool's run_time_ns and run_cnt for the pinned connect4 program.
fn prog_stats() -> anyhow::Result<(u64, u64)> {
    let out = sh::output(Command::new("bpftool").args([
        "prog",
        "show",
        "pinned",
        &format!("{PIN_ROOT}/programs/enforcer_connect4"),
    ]))?;
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

fn median(v: &mut [f64]) -> f64 {
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
    let [mode, addr, rest @ ..] = args else {
        bail!("usage: bench-client connect|poll ADDR ...")
    };
    let addr: SocketAddr = addr.parse()?;
    match (mode.as_str(), rest) {
        ("connect", [n]) => {
            let n: u32 = n.parse()?;
            let start = Instant::now();
            for _ in 0..n {
                drop(TcpStream::connect(addr)?);
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
        _ => bail!("usage: bench-client connect ADDR N | poll ADDR allow|deny"),
    }
    Ok(())
}
