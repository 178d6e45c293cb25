//! Real parts for kernel tests: test hosts in a network namespace, dnsmasq on loopback, the real
//! agent binary, and probes run through `enforcer exec`. Every guard cleans up on drop, also
//! when the test panics.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use enforcer_testkit::{python, script, Dnsmasq, TestNet};

pub const ENFORCER: &str = env!("CARGO_BIN_EXE_enforcer");

/// Tests share the documentation address ranges, so they take turns.
static SERIAL: Mutex<()> = Mutex::new(());

fn sh_quiet(args: &[&str]) {
    let _ = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// One test's world. Dropping it removes everything it made.
pub struct World {
    pub id: String,
    pub dir: PathBuf,
    pub policies: PathBuf,
    _serial: MutexGuard<'static, ()>,
    /// Other test processes (another checkout's tests) use the same ranges: one at a time.
    _machine: fs::File,
}

impl World {
    /// Fails the test, with the reason, where kernel tests cannot run.
    pub fn new(name: &str) -> Self {
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let machine =
            enforcer_testkit::machine_lock().expect("the kernel tests' machine-wide lock");
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        assert_eq!(
            uid.as_deref().ok(),
            Some("0"),
            "kernel tests need root (BPF, cgroups, netns); run them as root"
        );
        assert!(
            Path::new("/sys/kernel/btf/vmlinux").exists()
                || Path::new("/proc/sys/net/core/bpf_jit_enable").exists(),
            "this kernel has no BPF support"
        );
        let id = format!(
            "{}{}",
            &name[..name.len().min(6)],
            std::process::id() % 10000
        );
        let dir = std::env::temp_dir().join(format!("enforcer-test-{id}"));
        let _ = fs::remove_dir_all(&dir);
        let policies = dir.join("policies");
        fs::create_dir_all(&policies).expect("creating the test directory");
        Self {
            id,
            dir,
            policies,
            _serial: serial,
            _machine: machine,
        }
    }

    pub fn write_policy(&self, file: &str, yaml: &str) {
        let tmp = self.dir.join(format!(".{file}.tmp"));
        fs::write(&tmp, yaml).expect("writing policy");
        fs::rename(&tmp, self.policies.join(file)).expect("moving policy in place");
    }

    /// A network namespace name of this test's own, for a local pod.
    pub fn netns(&self, prefix: &str) -> String {
        format!("{prefix}-{}", &self.id[self.id.len().saturating_sub(8)..])
    }

    pub fn remove_policy(&self, file: &str) {
        fs::remove_file(self.policies.join(file)).expect("removing policy");
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Test hosts behind a veth, on documentation addresses, with TCP and UDP listeners.
/// 192.0.2.0/24 is left out: some machines (these among them) use it for their real uplink.
pub struct Hosts(TestNet);

pub const HOST_ADDRS: &[&str] = &[
    "198.51.100.10",
    "198.51.100.11",
    "198.51.100.12",
    "198.51.100.20",
    "198.51.100.21",
    "203.0.113.30",
    "203.0.113.31",
    "203.0.113.40",
    "203.0.113.41",
    "2001:db8::10",
    "2001:db8::11",
];

impl Hosts {
    pub fn new(world: &World) -> Self {
        let veth = format!("enfh{}", &world.id[world.id.len().saturating_sub(9)..]);
        let mut net = TestNet::new(&format!("enft-{}", world.id), &veth, HOST_ADDRS)
            .expect("creating the test hosts");
        net.serve(&[80, 443, 5432, 8080, 27017], &[9999])
            .expect("starting the test host server");
        Self(net)
    }

    /// `probe.py` from the test hosts towards `host` (a pod); true if it got a reply.
    pub fn probe(&self, kind: &str, host: &str, port: u16) -> bool {
        let args = quick_probe(kind, host, port);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.0
            .exec(&args)
            .expect("probing from the test hosts")
            .status
            .success()
    }

    /// Everything the hosts received (`host.py --log` lines), for failure messages.
    pub fn received(&self) -> Vec<String> {
        self.0.received()
    }

    /// Whether a TCP connection from `from` reached `dst:port`, by the host's own log.
    pub fn reached(&self, dst: &str, port: u16, from: &str) -> bool {
        let line = format!("tcp {dst}:{port} from {from}");
        self.0.received().contains(&line)
    }

    /// The test hosts' network namespace.
    pub fn netns(&self) -> &str {
        self.0.name()
    }

    /// Lets replies reach local pods in `cidr`.
    pub fn route_back(&self, cidr: &str) {
        self.0.route_back(cidr).expect("routing back to the pods");
    }
}

/// dnsmasq on loopback, answering from records that tests can change.
pub struct Dns(Dnsmasq);

impl Dns {
    pub fn new(world: &World, ttl: u32, records: &[(&str, &str)]) -> Self {
        let any_port = "127.0.0.1:0".parse().expect("address");
        Self(Dnsmasq::start(any_port, &world.dir, ttl, records).expect("starting dnsmasq"))
    }

    pub fn with_cnames(world: &World, records: &[(&str, &str)], cnames: &[(&str, &str)]) -> Self {
        let any_port = "127.0.0.1:0".parse().expect("address");
        Self(
            Dnsmasq::start_with_cnames(any_port, &world.dir, 60, records, cnames)
                .expect("starting dnsmasq"),
        )
    }

    /// As `new`, with names under `domain` forwarded to a test-host address where nothing
    /// answers: their lookups hang until the resolver gives up.
    pub fn with_blackhole(world: &World, records: &[(&str, &str)], domain: &str) -> Self {
        let any_port = "127.0.0.1:0".parse().expect("address");
        let forwards = [(domain, "203.0.113.250")];
        Self(
            Dnsmasq::start_forwarding(any_port, &world.dir, 1, records, &[], &forwards)
                .expect("starting dnsmasq"),
        )
    }

    pub fn addr(&self) -> String {
        self.0.addr.to_string()
    }

    pub fn set_records(&self, records: &[(&str, &str)]) {
        self.0.set_records(records).expect("changing DNS records");
    }
}

/// The real agent, with its own bpffs directory and cgroup parent.
pub struct Agent {
    child: Option<Child>,
    pub pin_root: String,
    pub cgroup_parent: String,
    status: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    args: Vec<String>,
    /// Working directory and `--policies` as passed (relative to it, or absolute).
    cwd: PathBuf,
    /// `None` in Kubernetes mode.
    policies: Option<PathBuf>,
    env: Vec<(String, String)>,
    /// The cgroup the agent runs in (a pod's container, say); the caller's when `None`.
    cgroup: Option<PathBuf>,
}

impl Agent {
    pub fn start(world: &World, extra: &[&str]) -> Self {
        Self::start_with(world, world.policies.clone(), extra)
    }

    /// Runs from `world.dir` with `--policies` as given, so relative paths can be tested.
    pub fn start_with(world: &World, policies: PathBuf, extra: &[&str]) -> Self {
        Self::launch(world, Some(policies), Vec::new(), None, extra)
    }

    /// `enforcer run --kubernetes` against the API server in `kubeconfig`.
    pub fn start_kubernetes(world: &World, kubeconfig: &Path, extra: &[impl AsRef<str>]) -> Self {
        Self::start_kubernetes_in(world, kubeconfig, None, extra)
    }

    /// As [`Agent::start_kubernetes`], with the agent's process in `cgroup` from its start.
    pub fn start_kubernetes_in(
        world: &World,
        kubeconfig: &Path,
        cgroup: Option<&Path>,
        extra: &[impl AsRef<str>],
    ) -> Self {
        let env = vec![("KUBECONFIG".into(), kubeconfig.display().to_string())];
        let mut args = vec!["--kubernetes"];
        args.extend(extra.iter().map(AsRef::as_ref));
        Self::launch(world, None, env, cgroup, &args)
    }

    fn launch(
        world: &World,
        policies: Option<PathBuf>,
        env: Vec<(String, String)>,
        cgroup: Option<&Path>,
        extra: &[&str],
    ) -> Self {
        let mut agent = Self {
            child: None,
            pin_root: format!("/sys/fs/bpf/enforcer-test-{}", world.id),
            cgroup_parent: format!("enforcer-test-{}", world.id),
            status: world.dir.join("status.json"),
            stdout: world.dir.join("agent.out"),
            stderr: world.dir.join("agent.err"),
            args: extra.iter().map(|s| s.to_string()).collect(),
            cwd: world.dir.clone(),
            policies,
            env,
            cgroup: cgroup.map(Path::to_path_buf),
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        let _ = fs::remove_file(&self.status);
        let open = |p: &Path| {
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .expect("log file")
        };
        // A shell moves itself into the cgroup, then becomes the agent.
        let mut cmd = match &self.cgroup {
            Some(cgroup) => enforcer_testkit::cgroups::in_cgroup(cgroup, ENFORCER),
            None => Command::new(ENFORCER),
        };
        cmd.arg("run").current_dir(&self.cwd).envs(self.env.clone());
        // A port of its own, which the status file names: tests' agents may overlap.
        if !self.args.iter().any(|a| a == "--metrics-addr") {
            cmd.args(["--metrics-addr", "127.0.0.1:0"]);
        }
        if let Some(policies) = &self.policies {
            cmd.arg("--policies").arg(policies);
        }
        let child = cmd
            .args([
                "--bpffs-root",
                &self.pin_root,
                "--cgroup-parent",
                &self.cgroup_parent,
            ])
            .arg("--status-file")
            .arg(&self.status)
            .args(&self.args)
            .stdout(open(&self.stdout))
            .stderr(open(&self.stderr))
            .spawn()
            .expect("starting enforcer run");
        self.child = Some(child);
        let status = self.status.clone();
        self.wait_for(Duration::from_secs(15), "the agent's first apply", || {
            status.exists()
        });
    }

    /// Runs `enforcer explain` against this agent; returns the exit code and stdout.
    pub fn explain(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(ENFORCER)
            .arg("explain")
            .args([
                "--bpffs-root",
                &self.pin_root,
                "--cgroup-parent",
                &self.cgroup_parent,
            ])
            .arg("--status-file")
            .arg(&self.status)
            .args(args)
            .output()
            .expect("running enforcer explain");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }

    /// `enforcer <sub>` pointed at this agent (by its status file), for the commands that ask
    /// its control socket: `events`, `audit-report`, `status`.
    pub fn cli(&self, sub: &str) -> Command {
        let mut cmd = Command::new(ENFORCER);
        cmd.arg(sub).arg("--status-file").arg(&self.status);
        cmd
    }

    /// Stops the agent as an operator would (SIGTERM); what is pinned stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            sh_quiet(&["kill", "-TERM", &child.id().to_string()]);
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Kills the agent as a crash or the OOM killer would (SIGKILL): nothing of it runs after.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the agent again after [`Agent::kill`] or [`Agent::stop`], with the same arguments.
    pub fn respawn(&mut self) {
        self.spawn();
    }

    /// The agent's JSON status.
    pub fn status(&self) -> serde_json::Value {
        fs::read(&self.status)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// The agent's /metrics (classic text), at the address its status names.
    pub fn metrics(&self) -> String {
        let addr = self.status()["metrics_addr"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let out = Command::new("curl")
            .args(["-s", "-m", "2"])
            .arg(format!("http://{addr}/metrics"))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Refusal records printed so far.
    pub fn denials(&self) -> Vec<serde_json::Value> {
        fs::read_to_string(&self.stdout)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// `enforcer exec` as a workload (`ns`, or `ns:k=v,k2=v2` with labels), in a new local pod
    /// named `netns` if given, up to `--`.
    pub fn exec(&self, workload: &str, netns: Option<&str>) -> Command {
        let argv = self.exec_argv(workload, netns);
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd
    }

    /// [`Agent::exec`]'s command line, for a runner that takes a prefix (Envoy's).
    pub fn exec_argv(&self, workload: &str, netns: Option<&str>) -> Vec<String> {
        let (ns, labels) = workload.split_once(':').unwrap_or((workload, ""));
        let mut argv: Vec<String> = [ENFORCER, "exec", "--namespace", ns]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if let Some(netns) = netns {
            argv.extend(["--netns".to_string(), netns.to_string()]);
        }
        argv.extend([
            "--bpffs-root".to_string(),
            self.pin_root.clone(),
            "--cgroup-parent".to_string(),
            self.cgroup_parent.clone(),
        ]);
        if !labels.is_empty() {
            argv.extend(["--label".to_string(), labels.to_string()]);
        }
        argv.push("--".to_string());
        argv
    }

    /// Runs `probe.py` through `enforcer exec` as a workload: `ns`, or `ns:k=v,k2=v2` for a
    /// workload with labels.
    pub fn probe(&self, workload: &str, kind: &str, host: &str, port: u16) -> Outcome {
        let mut cmd = self.exec(workload, None);
        let out = cmd
            .arg(python())
            .arg(script("probe.py"))
            .args([kind, host, &port.to_string()])
            .output()
            .expect("running enforcer exec");
        outcome(&out)
    }

    pub fn wait_for(&self, limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            if start.elapsed() > limit {
                panic!(
                    "timed out after {limit:?} waiting for {what}\n--- agent log ---\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls a probe until it gives `want` (bounded), for changes applied asynchronously.
    pub fn eventually(&self, ns: &str, kind: &str, host: &str, port: u16, want: Want) {
        let mut last = None;
        let limit = Duration::from_secs(8);
        let start = Instant::now();
        loop {
            let got = self.probe(ns, kind, host, port);
            if want.matches(&got) {
                return;
            }
            if start.elapsed() > limit {
                break;
            }
            last = Some(got);
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{ns}: {kind} {host}:{port}: wanted {want:?}, still {last:?} after {limit:?}\n--- agent log ---\n{}", self.log());
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.log());
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        sh_quiet(&[
            ENFORCER,
            "teardown",
            "--bpffs-root",
            &self.pin_root,
            "--cgroup-parent",
            &self.cgroup_parent,
        ]);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Connected and got this reply.
    Ok(String),
    /// Refused by the kernel with EPERM.
    Eperm,
    /// Anything else (timeout, connection refused, exec failure).
    Other(String),
}

/// What `probe.py` reported.
pub fn outcome(out: &std::process::Output) -> Outcome {
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match out.status.code() {
        Some(0) => Outcome::Ok(text),
        Some(1) if text == "EPERM" => Outcome::Eperm,
        _ => Outcome::Other(format!(
            "{text} {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Allowed,
    Denied,
}

impl Want {
    pub fn matches(self, got: &Outcome) -> bool {
        matches!(
            (self, got),
            (Want::Allowed, Outcome::Ok(_)) | (Want::Denied, Outcome::Eperm)
        )
    }
}

/// Asserts one probe's outcome.
#[track_caller]
pub fn check(agent: &Agent, ns: &str, kind: &str, host: &str, port: u16, want: Want) {
    let got = agent.probe(ns, kind, host, port);
    assert!(
        want.matches(&got),
        "{ns}: {kind} {host}:{port}: wanted {want:?}, got {got:?}\n--- agent log ---\n{}",
        agent.log()
    );
    // TCP replies name the address that answered (a UDP listener on `::` cannot).
    if let (Want::Allowed, Outcome::Ok(reply), true) = (want, &got, kind.starts_with("tcp")) {
        assert!(reply.contains(host), "reply {reply:?} is not from {host}");
    }
}

pub const REGISTRY_ONLY: &str = "outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n";

/// A local-mode agent under REGISTRY_ONLY that makes local pods in `cidrs` (IPv4 and IPv6
/// ranges, which the test hosts route back to), with `policy` written as `file` and `extra`
/// arguments.
pub fn start_with_pods(
    world: &World,
    hosts: &Hosts,
    (file, policy): (&str, &str),
    cidrs: &[&str],
    extra: &[&str],
) -> Agent {
    world.write_policy(file, policy);
    let mesh = registry_only(world);
    let mut args = vec!["--mesh-config", mesh.as_str()];
    for &cidr in cidrs {
        hosts.route_back(cidr);
        let flag = if cidr.contains(':') {
            "--pod-cidr6"
        } else {
            "--pod-cidr"
        };
        args.extend([flag, cidr]);
    }
    args.extend(extra);
    Agent::start(world, &args)
}

/// Writes a REGISTRY_ONLY mesh config beside the policies and returns its path, for `--mesh-config`.
pub fn registry_only(world: &World) -> String {
    let mesh = world.dir.join("mesh.yaml");
    fs::write(&mesh, REGISTRY_ONLY).expect("writing the mesh config");
    mesh.display().to_string()
}

/// `probe.py` with a one-second timeout, for paths where a drop shows only as silence.
pub fn quick_probe(kind: &str, host: &str, port: u16) -> Vec<String> {
    vec![
        python().to_string(),
        script("probe.py").to_string_lossy().into_owned(),
        kind.to_string(),
        host.to_string(),
        port.to_string(),
        "1".to_string(),
    ]
}
