//! The TC part of `cargo xtask bench`, between network namespaces:
//!
//! - TCP throughput (iperf3) from a pod through its veth, with the TC programs and without them
//!   (a bare namespace with the same veth and routing), in interleaved rounds;
//! - the programs' cost per run (bpf_stats) and their share of a core at that rate;
//! - the time from deleting a ServiceEntry to the first dropped packet of an established flow.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use enforcer_testkit::TestNet;

use crate::{
    bench::{median, prog_stats, set_bpf_stats, Bench, TARGET},
    sh,
};

pub const POD_CIDR: &str = "203.0.113.192/26";
const BARE_NETNS: &str = "enforcer-bench-bare";
const BARE_VETH: &str = "enf-bare0";
const BARE_HOST: &str = "203.0.113.129";
const BARE_POD: &str = "203.0.113.130";
pub const BARE_CIDR: &str = "203.0.113.128/30";
const IPERF_PORT: u16 = 5201;
/// host.py's echo on the test host.
pub const ECHO_PORT: u16 = 7000;
const ROUNDS: usize = 7;
const SECONDS: u32 = 2;
const FLOWS: usize = 5;

pub fn entry() -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: tc, namespace: bench}}\nspec:\n  hosts: [tc.example.com]\n  addresses: [{TARGET}]\n  resolution: STATIC\n  ports:\n  - {{number: {IPERF_PORT}, name: tcp-iperf, protocol: TCP}}\n  - {{number: {ECHO_PORT}, name: tcp-echo, protocol: TCP}}\n"
    )
}

/// Runs with the agent started (with `--pod-cidr POD_CIDR`) and the test host up.
pub fn run(bench: &Bench, net: &TestNet) -> anyhow::Result<()> {
    let _bare = Bare::new()?;
    let server = Server::start(net)?;
    let entry_file = bench.work.join("policies/tc.yaml");
    fs::write(&entry_file, entry())?;
    std::thread::sleep(Duration::from_millis(200));

    println!(
        "\nTC programs on a pod veth: iperf3 TCP from a pod to the test host ({ROUNDS} interleaved rounds of {SECONDS} s),\n\
         against a bare namespace with the same veth and routing and no program:"
    );
    set_bpf_stats(false)?;
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // Alternating which goes first, so that neither always runs on a warmer machine.
        if round % 2 == 0 {
            with.push(iperf(&mut bench.enforced(Some("enfbench-pod")))?);
            without.push(iperf(&mut bare_command())?);
        } else {
            without.push(iperf(&mut bare_command())?);
            with.push(iperf(&mut bench.enforced(Some("enfbench-pod")))?);
        }
    }
    // The exact cost, in a separate round: bpf_stats adds two clock reads per run.
    set_bpf_stats(true)?;
    let judge = format!("{}/programs/enforcer_tc", bench.pin_root);
    let reply = format!("{}/programs/enforcer_reply", bench.pin_root);
    let (j0, r0) = (prog_stats(&judge)?, prog_stats(&reply)?);
    let started = Instant::now();
    let rate = iperf(&mut bench.enforced(Some("enfbench-pod")))?;
    let secs = started.elapsed().as_secs_f64();
    let (j1, r1) = (prog_stats(&judge)?, prog_stats(&reply)?);
    set_bpf_stats(false)?;
    let (with, without) = (median(&mut with), median(&mut without));
    println!(
        "  throughput with the programs: {:>6.2} Gbit/s, without: {:>6.2} Gbit/s (median); loss {:+.2}% (noisy: see the exact cost below)",
        with / 1e9,
        without / 1e9,
        (1.0 - with / without) * 100.0
    );
    for (name, (t0, n0), (t1, n1)) in [("enforcer_tc", j0, j1), ("enforcer_reply", r0, r1)] {
        let runs = (n1 - n0).max(1) as f64;
        let ns = (t1 - t0) as f64 / runs;
        println!(
            "  {name:<15} {ns:>6.0} ns/run, {:>9.0} runs/s at {:.2} Gbit/s: {:.2}% of one core",
            runs / secs,
            rate / 1e9,
            (t1 - t0) as f64 / secs / 1e9 * 100.0
        );
    }

    let mut cut = Vec::new();
    for _ in 0..FLOWS {
        fs::write(&entry_file, entry())?;
        cut.push(first_drop_ms(bench, &entry_file)?);
    }
    let max = cut.iter().copied().fold(f64::NAN, f64::max);
    println!(
        "  ServiceEntry file deleted -> first dropped packet of an established flow ({FLOWS} flows, a message every ms):\n  \
         {:>6.1} ms median, {:>6.1} ms max",
        median(&mut cut),
        max
    );
    drop(server);
    Ok(())
}

fn bare_command() -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", BARE_NETNS]);
    c
}

/// Bits per second received by the server in one iperf3 run.
fn iperf(cmd: &mut Command) -> anyhow::Result<f64> {
    let out = sh::output(cmd.args([
        "iperf3",
        "-c",
        TARGET,
        "-p",
        &IPERF_PORT.to_string(),
        "-t",
        &SECONDS.to_string(),
        "-J",
    ]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // iperf3's JSON, read without a JSON dependency: end.sum_received.bits_per_second.
    let tail = text.split("\"sum_received\"").nth(1).with_context(|| {
        format!(
            "iperf3 failed: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let value = tail
        .split("\"bits_per_second\":")
        .nth(1)
        .and_then(|v| v.split([',', '}']).next())
        .context("iperf3 reported no bits_per_second")?;
    Ok(value.trim().parse()?)
}

/// Starts a streaming client in a pod, deletes the entry file, and returns the milliseconds
/// from the deletion to the first message whose echo never came.
fn first_drop_ms(bench: &Bench, entry_file: &std::path::Path) -> anyhow::Result<f64> {
    let mut client = bench
        .enforced(Some("enfbench-flow"))
        .arg(std::env::current_exe()?)
        .args(["bench-client", "stream", &format!("{TARGET}:{ECHO_PORT}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdout = BufReader::new(client.stdout.take().context("client stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    if line.trim() != "ready" {
        let _ = client.kill();
        bail!("the streaming client did not start: {line:?}");
    }
    std::thread::sleep(Duration::from_millis(100));
    writeln!(client.stdin.take().context("client stdin")?, "go")?;
    fs::remove_file(entry_file)?;
    line.clear();
    stdout.read_line(&mut line)?;
    client.wait()?;
    line.trim()
        .parse()
        .with_context(|| format!("the streaming client said {line:?}"))
}

/// The client side of the revocation measure: echoes a message every millisecond; after "go" on
/// stdin, prints the milliseconds from "go" to the send of the first message not answered within
/// 300 ms.
pub fn stream(addr: SocketAddr) -> anyhow::Result<()> {
    // The entry may be a few milliseconds younger than the pod: retry a refusal for a while.
    let start = Instant::now();
    let mut s = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                if start.elapsed() > Duration::from_secs(2) {
                    bail!("connect to {addr}: {e}");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            other => break other?,
        }
    };
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_millis(300)))?;
    let mut buf = [0u8; 64];
    s.write_all(b"ECHO\n")?;
    let _ = s.read(&mut buf)?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        let _ = tx.send(Instant::now());
    });
    println!("ready");
    let mut go = None;
    while start.elapsed() < Duration::from_secs(20) {
        if go.is_none() {
            go = rx.try_recv().ok();
        }
        let sent = Instant::now();
        s.write_all(b"x\n")?;
        if !matches!(s.read(&mut buf), Ok(n) if n > 0) {
            match go {
                Some(go) if sent >= go => {
                    println!("{}", (sent - go).as_secs_f64() * 1000.0);
                }
                _ => println!("stalled before the deletion"),
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    println!("never cut");
    Ok(())
}

/// iperf3's server on the test host.
struct Server(Child);

impl Server {
    fn start(net: &TestNet) -> anyhow::Result<Self> {
        let child = Command::new("ip")
            .args(["netns", "exec", net.name(), "iperf3", "-s", "-B", TARGET])
            .args(["-p", &IPERF_PORT.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s (cargo xtask setup installs iperf3)")?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self(child))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A namespace like a pod's, but with no program on its veth.
struct Bare;

impl Bare {
    fn new() -> anyhow::Result<Self> {
        Self::remove();
        let ip = |args: &[&str]| sh::run(Command::new("ip").args(args));
        ip(&["netns", "add", BARE_NETNS])?;
        let bare = Self;
        ip(&[
            "link", "add", BARE_VETH, "type", "veth", "peer", "name", "eth0", "netns", BARE_NETNS,
        ])?;
        ip(&["addr", "add", &format!("{BARE_HOST}/30"), "dev", BARE_VETH])?;
        ip(&["link", "set", BARE_VETH, "up"])?;
        let pod = format!("{BARE_POD}/30");
        ip(&["-n", BARE_NETNS, "addr", "add", &pod, "dev", "eth0"])?;
        ip(&["-n", BARE_NETNS, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n", BARE_NETNS, "route", "add", "default", "via", BARE_HOST,
        ])?;
        Ok(bare)
    }

    fn remove() {
        let _ = sh::output(Command::new("ip").args(["link", "del", BARE_VETH]));
        let _ = sh::output(Command::new("ip").args(["netns", "del", BARE_NETNS]));
    }
}

impl Drop for Bare {
    fn drop(&mut self) {
        Self::remove();
    }
}
