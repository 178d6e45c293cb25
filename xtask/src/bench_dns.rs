//! DNS learning in `cargo xtask bench`: what the proxy adds to a lookup, side by side with
//! direct DNS in the same run (two namespaces of one agent, one that learns and one that does
//! not, alternated round by round); the time from an answer to its addresses in the kernel;
//! the agent's CPU per 1,000 lookups; its memory with 100,000 learned addresses.

use std::{
    fs,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use enforcer_testkit::{python, script, TestNet};

use crate::{
    bench::{median, rss_kib, Bench, CGROUP_PARENT},
    sh,
};

/// In the test hosts' /24, which the node routes to them (and nowhere else).
const DNS: &str = "198.51.100.53";
const POOL: &str = "198.51.100.128/25";
const POOL6: &str = "2001:db8:1::/64";
const ROUNDS: usize = 5;
const LOOKUPS: u32 = 2_000;
const LEARNED: u32 = 100_000;
const POD: &str = "bench-dns-pod";
/// Where the test host listens on every address (`bench_tc::ECHO_PORT`).
const PORT: &str = "7000";

const POLICY: &str = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cdn, namespace: learn}
spec:
  hosts: ["*.bench.test"]
  ports: [{number: 7000, name: tcp, protocol: TCP}]
  resolution: NONE
"#;

pub fn run(bench: &Bench, net: &TestNet) -> anyhow::Result<()> {
    println!("\nDNS learning (the proxy vs direct DNS, one agent, alternating rounds of {LOOKUPS} lookups)");
    let mut upstream = Upstream::start(bench, net)?;
    let mut agent = Agent::start(bench)?;
    let result = measure(bench, &agent);
    agent.stop(bench);
    upstream.stop();
    result
}

fn measure(bench: &Bench, agent: &Agent) -> anyhow::Result<()> {
    println!(
        "  {:<34} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "lookup (ms)", "learn p50", "direct p50", "learn p99", "direct p99", "+p50", "+p99"
    );
    for (label, netns, mode) in [
        ("UDP, host namespace", None, "udp-connected"),
        ("TCP, host namespace", None, "tcp"),
        ("UDP, pod", Some(POD), "udp-connected"),
        ("TCP, pod", Some(POD), "tcp"),
    ] {
        let (mut lp50, mut dp50, mut lp99, mut dp99) = (vec![], vec![], vec![], vec![]);
        for _ in 0..ROUNDS {
            for (ns, p50, p99) in [
                ("learn", &mut lp50, &mut lp99),
                ("direct", &mut dp50, &mut dp99),
            ] {
                let got = lookups(bench, ns, netns, mode, LOOKUPS, false)?;
                p50.push(got["resolve_ms"]["p50"].as_f64().unwrap_or(f64::NAN));
                p99.push(got["resolve_ms"]["p99"].as_f64().unwrap_or(f64::NAN));
            }
        }
        let (l50, d50, l99, d99) = (
            median(&mut lp50),
            median(&mut dp50),
            median(&mut lp99),
            median(&mut dp99),
        );
        println!(
            "  {label:<34} {l50:>10.3} {d50:>10.3} {l99:>10.3} {d99:>10.3} {:>+9.3} {:>+9.3}",
            l50 - d50,
            l99 - d99
        );
    }

    // Connects right after each answer: the race the proxy closes; and the agent's CPU.
    let cpu_before = cpu_ticks(agent.pid())?;
    let started = Instant::now();
    let got = lookups(bench, "learn", None, "udp-connected", 10_000, true)?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_s = (cpu_ticks(agent.pid())? - cpu_before) as f64 / ticks_per_second();
    let ok = got["counts"]["ok"].as_u64().unwrap_or(0);
    let rate = 10_000.0 / elapsed;
    let class = |c: &str| got["counts"][c].as_u64().unwrap_or(0);
    if class("eperm") > 0 {
        let records = fs::read_to_string(bench.work.join("dns-records.jsonl")).unwrap_or_default();
        println!(
            "  REFUSED after an answer: {}\n  last record: {}",
            got["failures"],
            records.lines().last().unwrap_or("none")
        );
    }
    println!(
        "  10,000 x resolve and connect at once: {ok} connected, {} refused (EPERM), {} other failures; {rate:.0} lookups and connects/s",
        class("eperm"),
        10_000 - ok - class("eperm")
    );
    println!(
        "  agent CPU: {:.1} ms per 1,000 lookups ({:.0}% of a core at {rate:.0} lookups/s)",
        cpu_s * 1000.0 / 10.0,
        cpu_s / elapsed * 100.0
    );
    let status = agent.status(bench)?;
    let learning = &status["dns_learning"];
    println!(
        "  answer to kernel entry (parse, lock, map writes): mean {:.1} us, max {:.1} us",
        learning["learn_us_mean"].as_f64().unwrap_or(f64::NAN),
        learning["learn_us_max"].as_f64().unwrap_or(f64::NAN)
    );

    // Memory: 100,000 distinct AAAA answers, each a learned address.
    let rss_before = rss_kib(agent.pid(), "VmRSS:");
    let started = Instant::now();
    let got = lookups_v6(bench, LEARNED)?;
    let keys = wait_for_keys(bench, agent, u64::from(LEARNED))?;
    let rss_after = rss_kib(agent.pid(), "VmRSS:");
    println!(
        "  {keys} learned addresses ({} lookups in {:.1} s): agent RSS {:.1} -> {:.1} MiB (+{:.0} bytes each); learned map {}",
        got["iterations"].as_u64().unwrap_or(0),
        started.elapsed().as_secs_f64(),
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        (rss_after.saturating_sub(rss_before) * 1024) as f64 / keys.max(1) as f64,
        map_memory(&bench.pin_root).unwrap_or_else(|e| format!("? ({e})"))
    );
    Ok(())
}

/// `resolve.py` as a workload of `ns`: its JSON result.
fn lookups(
    bench: &Bench,
    ns: &str,
    netns: Option<&str>,
    mode: &str,
    count: u32,
    connect: bool,
) -> anyhow::Result<serde_json::Value> {
    let mut cmd = exec(bench, ns, netns);
    cmd.arg(python())
        .arg(script("resolve.py"))
        .args(["--server", DNS, "--json", "--mode", mode])
        .args([
            "--pattern",
            "r{i}.bench.test",
            "--count",
            &count.to_string(),
        ])
        .args(["--connect-port", PORT]);
    if !connect {
        cmd.arg("--no-connect");
    }
    json(&mut cmd)
}

fn lookups_v6(bench: &Bench, count: u32) -> anyhow::Result<serde_json::Value> {
    let mut cmd = exec(bench, "learn", None);
    cmd.arg(python())
        .arg(script("resolve.py"))
        .args([
            "--server",
            DNS,
            "--json",
            "--mode",
            "udp-connected",
            "--family",
            "6",
        ])
        .args([
            "--pattern",
            "m{i}.bench.test",
            "--count",
            &count.to_string(),
        ])
        .args(["--no-connect", "--deadline", "300"]);
    json(&mut cmd)
}

fn json(cmd: &mut Command) -> anyhow::Result<serde_json::Value> {
    let out = sh::output(cmd)?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "resolve.py: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn exec(bench: &Bench, ns: &str, netns: Option<&str>) -> Command {
    let mut c = Command::new(&bench.bin);
    c.args(["exec", "--namespace", ns]);
    if let Some(netns) = netns {
        c.args(["--netns", netns]);
    }
    c.args([
        "--bpffs-root",
        &bench.pin_root,
        "--cgroup-parent",
        CGROUP_PARENT,
        "--",
    ]);
    c
}

fn wait_for_keys(bench: &Bench, agent: &Agent, want: u64) -> anyhow::Result<u64> {
    let start = Instant::now();
    loop {
        let keys = agent.status(bench)?["dns_learning"]["learned_keys"]
            .as_u64()
            .unwrap_or(0);
        if keys >= want || start.elapsed() > Duration::from_secs(5) {
            return Ok(keys);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// bpftool's `memlock` of the learned map.
fn map_memory(pin_root: &str) -> anyhow::Result<String> {
    let pin = format!("{pin_root}/maps/ENF_ALLOW_LEARNED");
    let out = sh::output(Command::new("bpftool").args(["map", "show", "pinned", &pin]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    words.find(|w| *w == "memlock").context("no memlock")?;
    let bytes: f64 = words
        .next()
        .context("no memlock")?
        .trim_end_matches('B')
        .parse()?;
    Ok(format!("{:.1} MiB (memlock)", bytes / 1024.0 / 1024.0))
}

/// utime + stime of a process and its exited threads, in clock ticks.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command's closing parenthesis: fields 14 and 15 are utime and stime.
    let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// `dns_server.py` in the bench's test-host namespace, its pools made the hosts' own.
struct Upstream(Option<Child>);

impl Upstream {
    fn start(bench: &Bench, net: &TestNet) -> anyhow::Result<Self> {
        let in_ns = |args: &[&str]| -> anyhow::Result<()> {
            let out = net.exec(args)?;
            if !out.status.success() {
                bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        };
        in_ns(&["ip", "addr", "replace", &format!("{DNS}/32"), "dev", "lo"])?;
        in_ns(&["ip", "route", "replace", "local", POOL, "dev", "lo"])?;
        in_ns(&["ip", "-6", "route", "replace", "local", POOL6, "dev", "lo"])?;
        let ready = bench.work.join("dns-ready");
        let child = Command::new("ip")
            .args(["netns", "exec", net.name(), python()])
            .arg(script("dns_server.py"))
            .args(["--listen", &format!("{DNS}:53"), "--ttl", "60"])
            .args(["--rotate", &format!("bench.test={POOL}")])
            .args(["--rotate", &format!("bench.test={POOL6}")])
            .arg("--ready")
            .arg(&ready)
            .stdout(Stdio::null())
            .spawn()
            .context("starting dns_server.py")?;
        let start = Instant::now();
        while !ready.exists() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("dns_server.py did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self(Some(child)))
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An agent with namespace `learn` (a wildcard entry: its DNS goes through the proxy) and
/// `direct` (nothing to learn: its DNS goes to the server as sent).
struct Agent {
    child: Option<Child>,
    status: std::path::PathBuf,
}

impl Agent {
    fn start(bench: &Bench) -> anyhow::Result<Self> {
        let dir = bench.work.join("dns-policies");
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("cdn.yaml"), POLICY)?;
        let status = bench.work.join("dns-status.json");
        let _ = fs::remove_file(&status);
        let log = fs::File::create(bench.work.join("dns-agent.log"))?;
        let child = Command::new(&bench.bin)
            .arg("run")
            .arg("--policies")
            .arg(&dir)
            .arg("--mesh-config")
            .arg(bench.work.join("mesh.yaml"))
            .args(["--namespace", "learn", "--namespace", "direct"])
            .args([
                "--bpffs-root",
                &bench.pin_root,
                "--cgroup-parent",
                CGROUP_PARENT,
            ])
            .args(["--dns-upstream", DNS, "--allow-cidr", &format!("{DNS}/32")])
            .args(["--pod-cidr", crate::bench_tc::POD_CIDR])
            .args([
                "--dns-max-learned",
                "262144",
                "--dns-max-learned-per-scope",
                "200000",
            ])
            .arg("--status-file")
            .arg(&status)
            .stdout(fs::File::create(bench.work.join("dns-records.jsonl"))?)
            .stderr(log)
            .spawn()?;
        let agent = Self {
            child: Some(child),
            status,
        };
        let start = Instant::now();
        while !agent.status.exists() {
            if start.elapsed() > Duration::from_secs(30) {
                bail!(
                    "the agent did not start; see {}",
                    bench.work.join("dns-agent.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(agent)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The status, rewritten by the agent within a second of learning.
    fn status(&self, _bench: &Bench) -> anyhow::Result<serde_json::Value> {
        std::thread::sleep(Duration::from_millis(1100));
        Ok(serde_json::from_slice(&fs::read(&self.status)?)?)
    }

    fn stop(&mut self, bench: &Bench) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = sh::output(Command::new(&bench.bin).args([
            "teardown",
            "--bpffs-root",
            &bench.pin_root,
            "--cgroup-parent",
            CGROUP_PARENT,
        ]));
    }
}
