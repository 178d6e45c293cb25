//! The per-run cost of the kernel programs, this build against a baseline, in one run of
//! `cargo xtask bench` (issue 11: what the boundary checks of 9adaa88 add on both hooks).
//!
//! The baseline agent is built from [`BASELINE`] (or `--baseline REV`): a temporary `git
//! worktree` of that commit is built with `cargo build --release -p enforcer-user --bin
//! enforcer` into a target directory of its own, `<target dir>/bench-baseline/<sha>/target`
//! (seeded with a copy of this build's `release` directory, so only the workspace crates
//! compile), the binary is kept as `<target dir>/bench-baseline/<sha>/enforcer` and the worktree
//! is removed. A later run finds that binary and builds nothing. `--agent REV` measures an agent
//! built the same way instead of this checkout's (when this checkout's cannot run).
//!
//! Then both agents run the same workloads in interleaved rounds (which agent goes first
//! alternates), each against its own `--bpffs-root` (teardown after every round), with
//! `kernel.bpf_stats_enabled=1`; a program's cost is `run_time_ns / run_cnt` of its pin under
//! `<bpffs-root>/programs/` over the workload, and the table shows medians:
//!
//! - connect4: loopback `connect()` to a closed port from the REGISTRY_ONLY namespace (loopback
//!   is allowed by the global trie: the longest allow path);
//! - sendmsg4: unconnected UDP `sendto()` to loopback from the namespace;
//! - the TC judge and the reply program on a pod's veth: connects from a pod to a closed port of
//!   the test host (each a new flow: SYN judged, RST tracked), and small echoes over one
//!   established flow;
//! - this build only: sock_create (a `socket()` loop), setsockopt (`SO_REUSEADDR` in a loop),
//!   and skb_egress, attached on the cgroup root, over the loopback packets of the connect and
//!   sendto workloads.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context as _};
use enforcer_common::program_names as prog;

use crate::{
    bench::{median, prog_stats, set_bpf_stats, Bench, PIN_ROOT, TARGET},
    check, sh,
};

/// "Today" before issue 11's boundary checks (9adaa88): the commit before them whose kernel
/// side the README's earlier figures were taken on.
pub const BASELINE: &str = "0149507";
/// The baseline agent's pins, apart from this build's.
const BASELINE_PIN_ROOT: &str = "/sys/fs/bpf/enforcer-bench-baseline";
const ROUNDS: usize = 5;
const LOOPS: u32 = 20_000;
const POD_CONNECTS: u32 = 2_000;
const ECHOES: u32 = 2_000;
/// A port of the test host nobody listens on: a pod's connect is a SYN and an RST.
const CLOSED_PORT: u16 = 9;

/// One measured row: a program under a workload.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Row {
    Connect4,
    SkbConnect,
    Sendmsg4,
    SkbSendto,
    SockCreate,
    Setsockopt,
    TcSyn,
    ReplySyn,
    TcEcho,
    ReplyEcho,
}

impl Row {
    /// The program and its workload.
    fn describe(self) -> (&'static str, String) {
        let n = LOOPS;
        match self {
            Row::Connect4 => (prog::CONNECT4, format!("{n} loopback connect()s")),
            Row::SkbConnect => (prog::SKB_EGRESS, "the connect()s' packets".into()),
            Row::Sendmsg4 => (prog::SENDMSG4, format!("{n} loopback UDP sendto()s")),
            Row::SkbSendto => (prog::SKB_EGRESS, "the sendto()s' datagrams".into()),
            Row::SockCreate => (prog::SOCK_CREATE, format!("{n} socket()s")),
            Row::Setsockopt => (prog::SETSOCKOPT, format!("{n} setsockopt(SO_REUSEADDR)s")),
            Row::TcSyn => (prog::TC, format!("{POD_CONNECTS} pod connects (new flows)")),
            Row::ReplySyn => (prog::TC_REPLY, "  their RSTs".into()),
            Row::TcEcho => (prog::TC, format!("{ECHOES} pod echoes (one flow)")),
            Row::ReplyEcho => (prog::TC_REPLY, "  their answers".into()),
        }
    }
}

/// ns/run, and runs per operation of the workload.
type Sample = (f64, f64);

/// Builds the baseline agent if needed, then measures both agents: `versions` name the baseline
/// commit and the agent in `bench`.
pub fn run(bench: &mut Bench, versions: [&str; 2]) -> anyhow::Result<()> {
    let [rev, current_label] = versions;
    let baseline = agent_at(rev)?;
    let current = bench.bin.clone();
    bench.baseline = Some((baseline.clone(), BASELINE_PIN_ROOT.into()));
    let entry = bench.work.join("policies/cost.yaml");
    fs::write(&entry, cost_entry())?;
    println!(
        "per-run cost of the programs (bpf_stats run_time_ns / run_cnt), baseline {rev} against {current_label},\n\
         {ROUNDS} interleaved rounds each, medians; workloads from the REGISTRY_ONLY namespace or a pod in it:"
    );
    let mut samples: BTreeMap<(Row, bool), Vec<Sample>> = BTreeMap::new();
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for new in order {
            if new {
                bench.use_agent(current.clone(), PIN_ROOT);
            } else {
                bench.use_agent(baseline.clone(), BASELINE_PIN_ROOT);
            }
            let measured = measure(bench, new);
            let _ = set_bpf_stats(false);
            bench.stop_agent();
            for (row, sample) in measured? {
                samples.entry((row, new)).or_default().push(sample);
            }
        }
    }
    bench.use_agent(current, PIN_ROOT);
    print_table(&samples);
    let routed = with_a_gateway_route(bench);
    fs::remove_file(&entry)?;
    routed
}

/// This build's costs with and without a gateway route in the policy: with one, the hooks look
/// up `ENF_REDIRECTS` on every connect and packet (a miss here: the route is another host's).
fn with_a_gateway_route(bench: &mut Bench) -> anyhow::Result<()> {
    let route = bench.work.join("policies/cost-gateway.yaml");
    let mut samples: BTreeMap<(Row, bool), Vec<Sample>> = BTreeMap::new();
    for round in 0..ROUNDS {
        for routed in [round % 2 == 0, round % 2 != 0] {
            if routed {
                fs::write(&route, GATEWAY_ROUTE)?;
            } else {
                let _ = fs::remove_file(&route);
            }
            let measured = measure(bench, true);
            let _ = set_bpf_stats(false);
            let redirects = redirect_entries(bench);
            bench.stop_agent();
            if redirects? != usize::from(routed) {
                bail!(
                    "the gateway route did not reach ENF_REDIRECTS as expected (routed: {routed})"
                );
            }
            for (row, sample) in measured? {
                samples.entry((row, routed)).or_default().push(sample);
            }
        }
    }
    let _ = fs::remove_file(&route);
    println!(
        "
this build without and with a gateway route in the policy ({ROUNDS} interleaved rounds, medians):"
    );
    for row in [Row::Connect4, Row::Sendmsg4, Row::TcSyn, Row::TcEcho] {
        let get = |routed| {
            samples.get(&(row, routed)).map(|v| {
                let mut ns: Vec<f64> = v.iter().map(|s| s.0).collect();
                median(&mut ns)
            })
        };
        if let (Some(plain), Some(routed)) = (get(false), get(true)) {
            let (name, workload) = row.describe();
            println!(
                "  {name:<21} | {workload:<36} | {plain:>6.0} ns | {routed:>6.0} ns | {:>5.2}x",
                routed / plain
            );
        }
    }
    Ok(())
}

/// How many entries the running agent's `ENF_REDIRECTS` holds.
fn redirect_entries(bench: &Bench) -> anyhow::Result<usize> {
    let pin = format!("{}/maps/ENF_REDIRECTS", bench.pin_root);
    let out = sh::output(Command::new("bpftool").args(["-j", "map", "dump", "pinned", &pin]))?;
    let entries: serde_json::Value =
        serde_json::from_slice(&out.stdout).with_context(|| format!("bpftool map dump {pin}"))?;
    Ok(entries.as_array().map_or(0, Vec::len))
}

/// A VirtualService routing another host's port 80 through a gateway on loopback.
const GATEWAY_ROUTE: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: routed, namespace: bench}
spec:
  hosts: [routed.example.com]
  addresses: [198.51.100.99]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: gateway, namespace: bench}
spec:
  hosts: [gateway.bench.test]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 15080}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gateway, namespace: bench}
spec:
  selector: {istio: egressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [routed.example.com]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: routed, namespace: bench}
spec:
  hosts: [routed.example.com]
  gateways: [gateway, mesh]
  http:
  - match: [{gateways: [mesh], port: 80}]
    route: [{destination: {host: gateway.bench.test, port: {number: 80}}}]
"#;

fn print_table(samples: &BTreeMap<(Row, bool), Vec<Sample>>) {
    let get = |row: Row, new: bool| -> Option<Sample> {
        let v = samples.get(&(row, new))?;
        let (mut ns, mut per): (Vec<f64>, Vec<f64>) = v.iter().copied().unzip();
        Some((median(&mut ns), median(&mut per)))
    };
    println!(
        "  {:<21} | {:<36} | {:>15} | {:>14} | {:>9}",
        "program", "workload", "baseline ns/run", "current ns/run", "ratio"
    );
    let rows = [
        Row::Connect4,
        Row::Sendmsg4,
        Row::TcSyn,
        Row::ReplySyn,
        Row::TcEcho,
        Row::ReplyEcho,
        Row::SockCreate,
        Row::Setsockopt,
        Row::SkbConnect,
        Row::SkbSendto,
    ];
    for row in rows {
        let (name, workload) = row.describe();
        let (old, new) = (get(row, false), get(row, true));
        let cell = |s: Option<Sample>| s.map_or("-".to_string(), |(ns, _)| format!("{ns:.0}"));
        let ratio = match (old, new) {
            (Some((o, _)), Some((n, _))) => format!("{:.2}x", n / o),
            (None, Some(_)) => "new".into(),
            _ => "?".into(),
        };
        let workload = match (row, new) {
            (Row::SkbConnect | Row::SkbSendto, Some((_, per))) => {
                format!("{workload} ({per:.1} each)")
            }
            _ => workload,
        };
        println!(
            "  {name:<21} | {workload:<36} | {:>15} | {:>14} | {ratio:>9}",
            cell(old),
            cell(new)
        );
    }
    // What one enforced loopback connect pays more: the connect4 difference, one socket(), and
    // the skb_egress runs its packets take.
    if let (Some((c_old, _)), Some((c_new, _)), Some((sock, _)), Some((skb, per))) = (
        get(Row::Connect4, false),
        get(Row::Connect4, true),
        get(Row::SockCreate, true),
        get(Row::SkbConnect, true),
    ) {
        println!(
            "  added per enforced loopback connect: {:+.0} ns (connect4 {:+.0}, sock_create {sock:.0}, skb_egress {per:.1} x {skb:.0})",
            c_new - c_old + sock + skb * per,
            c_new - c_old
        );
    }
}

/// One round with the agent in `bench`: its ns/run for each workload.
fn measure(bench: &mut Bench, new: bool) -> anyhow::Result<Vec<(Row, Sample)>> {
    bench.start_agent()?;
    set_bpf_stats(true)?;
    let mut out = Vec::new();
    let closed = crate::bench::closed_port()?.to_string();
    let loops = LOOPS.to_string();
    let skb = |rows: &mut Vec<(Row, &str)>, row| {
        if new {
            rows.push((row, prog::SKB_EGRESS));
        }
    };

    let mut rows = vec![(Row::Connect4, prog::CONNECT4)];
    skb(&mut rows, Row::SkbConnect);
    out.extend(costs(
        bench,
        &rows,
        LOOPS,
        None,
        &["connect", &closed, &loops],
    )?);

    let mut rows = vec![(Row::Sendmsg4, prog::SENDMSG4)];
    skb(&mut rows, Row::SkbSendto);
    out.extend(costs(bench, &rows, LOOPS, None, &["sendto", &loops])?);

    if new {
        let rows = [(Row::SockCreate, prog::SOCK_CREATE)];
        out.extend(costs(bench, &rows, LOOPS, None, &["socket", &loops])?);
        let rows = [(Row::Setsockopt, prog::SETSOCKOPT)];
        out.extend(costs(bench, &rows, LOOPS, None, &["setsockopt", &loops])?);
    }

    let rows = [(Row::TcSyn, prog::TC), (Row::ReplySyn, prog::TC_REPLY)];
    let target = format!("{TARGET}:{CLOSED_PORT}");
    let n = POD_CONNECTS.to_string();
    let pod = Some("enfcost-syn");
    out.extend(costs(
        bench,
        &rows,
        POD_CONNECTS,
        pod,
        &["connect", &target, &n],
    )?);

    let rows = [(Row::TcEcho, prog::TC), (Row::ReplyEcho, prog::TC_REPLY)];
    let target = format!("{TARGET}:{}", crate::bench_tc::ECHO_PORT);
    let n = ECHOES.to_string();
    let pod = Some("enfcost-echo");
    out.extend(costs(bench, &rows, ECHOES, pod, &["echo", &target, &n])?);
    Ok(out)
}

/// Runs `bench-client ARGS` enforced (in a pod named `netns` if given) and returns each
/// program's ns/run over it, and its runs per operation (`ops` of them).
fn costs(
    bench: &Bench,
    rows: &[(Row, &str)],
    ops: u32,
    netns: Option<&str>,
    args: &[&str],
) -> anyhow::Result<Vec<(Row, Sample)>> {
    let pins: Vec<String> = rows
        .iter()
        .map(|(_, name)| format!("{}/programs/{name}", bench.pin_root))
        .collect();
    let before = pins
        .iter()
        .map(|p| prog_stats(p))
        .collect::<Result<Vec<_>, _>>()?;
    let out = sh::output(
        bench
            .enforced(netns)
            .arg(std::env::current_exe()?)
            .arg("bench-client")
            .args(args),
    )?;
    if !out.status.success() {
        bail!(
            "bench-client {} failed: {}{}\nthe agent's log ends with:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            bench.agent_log_tail()
        );
    }
    let mut samples = Vec::new();
    for ((row, _), (pin, (t0, n0))) in rows.iter().zip(pins.iter().zip(before)) {
        let (t1, n1) = prog_stats(pin)?;
        if n1 <= n0 {
            bail!("{pin} did not run during bench-client {}", args.join(" "));
        }
        let runs = (n1 - n0) as f64;
        samples.push((*row, ((t1 - t0) as f64 / runs, runs / f64::from(ops))));
    }
    Ok(samples)
}

/// The test host's closed port, allowed, so that the pod's SYNs are judged and let through.
fn cost_entry() -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: cost, namespace: bench}}\nspec:\n  hosts: [cost.example.com]\n  addresses: [{TARGET}]\n  resolution: STATIC\n  ports:\n  - {{number: {CLOSED_PORT}, name: tcp-closed, protocol: TCP}}\n  - {{number: {}, name: tcp-echo, protocol: TCP}}\n",
        crate::bench_tc::ECHO_PORT
    )
}

/// The agent binary of commit `rev`, built once (see the module comment): the baseline, or with
/// `--agent REV` the agent measured.
pub fn agent_at(rev: &str) -> anyhow::Result<PathBuf> {
    let root = sh::root();
    let out = sh::output(Command::new("git").current_dir(&root).args([
        "rev-parse",
        "--verify",
        &format!("{rev}^{{commit}}"),
    ]))?;
    let sha = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || sha.is_empty() {
        bail!("--baseline {rev}: not a commit of this repository");
    }
    let dir = check::target_dir().join("bench-baseline").join(&sha);
    let bin = dir.join("enforcer");
    if bin.exists() {
        eprintln!("bench: agent {rev} from {}", bin.display());
        return Ok(bin);
    }
    let (src, target) = (dir.join("src"), dir.join("target"));
    let ours = check::target_dir().join("release");
    if !target.exists() && ours.join("deps").exists() {
        fs::create_dir_all(&target)?;
        sh::run(Command::new("cp").arg("-a").arg(&ours).arg(&target))?;
    }
    let worktree = Worktree::add(&src, &sha)?;
    // The kernel crate's build (build.rs puts it under the source's target/bpf), seeded too.
    let bpf = root.join("target/bpf");
    if bpf.exists() {
        fs::create_dir_all(src.join("target"))?;
        sh::run(
            Command::new("cp")
                .arg("-a")
                .arg(&bpf)
                .arg(src.join("target")),
        )?;
    }
    sh::run(
        Command::new("cargo")
            .current_dir(&src)
            .args([
                "build",
                "--release",
                "-p",
                "enforcer-user",
                "--bin",
                "enforcer",
            ])
            .env("CARGO_TARGET_DIR", &target),
    )
    .with_context(|| format!("building the agent at {rev}"))?;
    let partial = dir.join("enforcer.partial");
    fs::copy(target.join("release/enforcer"), &partial)?;
    fs::rename(&partial, &bin)?;
    drop(worktree);
    Ok(bin)
}

/// A detached worktree, removed (with its untracked build output) when dropped.
struct Worktree(PathBuf);

impl Worktree {
    fn add(path: &Path, sha: &str) -> anyhow::Result<Self> {
        Self::remove(path);
        sh::run(
            Command::new("git")
                .current_dir(sh::root())
                .args(["worktree", "add", "--detach"])
                .arg(path)
                .arg(sha),
        )?;
        Ok(Self(path.to_path_buf()))
    }

    fn remove(path: &Path) {
        let git = |args: &[&str]| {
            let _ = sh::output(Command::new("git").current_dir(sh::root()).args(args));
        };
        git(&["worktree", "remove", "--force", &path.to_string_lossy()]);
        let _ = fs::remove_dir_all(path);
        git(&["worktree", "prune"]);
    }
}

impl Drop for Worktree {
    fn drop(&mut self) {
        Self::remove(&self.0);
    }
}

/// The client's workloads: `sendto N` (unconnected UDP to a loopback socket of its own),
/// `socket N` (make and close a TCP socket), `setsockopt N` (`SO_REUSEADDR` on one socket),
/// `echo ADDR N` (N small round trips over one TCP flow to host.py's echo). Each prints the
/// seconds it took.
pub fn client(mode: &str, rest: &[String]) -> anyhow::Result<()> {
    let n =
        |s: Option<&String>| -> anyhow::Result<u32> { Ok(s.context("missing count")?.parse()?) };
    let start = Instant::now();
    match mode {
        "sendto" => {
            let n = n(rest.first())?;
            let sink = UdpSocket::bind("127.0.0.1:0")?;
            let to = sink.local_addr()?;
            let s = UdpSocket::bind("127.0.0.1:0")?;
            for _ in 0..n {
                s.send_to(b"bench", to)?;
            }
        }
        "socket" => {
            for _ in 0..n(rest.first())? {
                // SAFETY: plain socket(2) and close(2) on the descriptor it returns.
                let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                if fd < 0 {
                    bail!("socket: {}", std::io::Error::last_os_error());
                }
                // SAFETY: fd is ours and open.
                unsafe { libc::close(fd) };
            }
        }
        "setsockopt" => {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            let one: libc::c_int = 1;
            for _ in 0..n(rest.first())? {
                // SAFETY: a valid descriptor and an int option of the right length.
                let rc = unsafe {
                    libc::setsockopt(
                        s.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_REUSEADDR,
                        std::ptr::from_ref(&one).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                if rc != 0 {
                    bail!("setsockopt: {}", std::io::Error::last_os_error());
                }
            }
        }
        "echo" => {
            let addr: SocketAddr = rest.first().context("missing ADDR")?.parse()?;
            let n = n(rest.get(1))?;
            let mut s = TcpStream::connect(addr)?;
            s.set_nodelay(true)?;
            let mut buf = [0u8; 64];
            s.write_all(b"ECHO\n")?;
            let _ = s.read(&mut buf)?;
            for _ in 0..n {
                s.write_all(b"x\n")?;
                if s.read(&mut buf)? == 0 {
                    bail!("{addr} closed the flow");
                }
            }
        }
        _ => bail!("unknown bench-client mode {mode}"),
    }
    println!("{}", start.elapsed().as_secs_f64());
    Ok(())
}
