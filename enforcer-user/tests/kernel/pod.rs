//! Local pods made by the agent (`enforcer exec --netns`), for the TC tests.

use std::{
    io::{BufRead, BufReader, Lines},
    os::unix::process::CommandExt as _,
    process::{Child, ChildStdout, Command, Output, Stdio},
};

use enforcer_testkit::python;

use crate::harness::{quick_probe, Agent};

/// A pod whose main process runs until the pod is dropped; dropping it kills that process, so the
/// agent removes the pod.
pub struct Pod {
    child: Child,
    pub netns: String,
    pub ip: String,
    /// Held open so that the main process can go on writing.
    _output: Lines<BufReader<ChildStdout>>,
}

impl Pod {
    /// Runs `cmd` in a new pod of `workload` ("ns" or "ns:k=v,..") and waits until it prints
    /// "ready" (host.py does; [`Pod::idle`] is a pod that only waits).
    pub fn start(agent: &Agent, workload: &str, netns: &str, cmd: &[&str]) -> Self {
        let mut child = agent
            .exec(workload, Some(netns))
            .args(cmd)
            .stdout(Stdio::piped())
            // Its own process group, so that drop ends the command as well as exec.
            .process_group(0)
            .spawn()
            .expect("starting enforcer exec --netns");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        let mut pod = Self {
            child,
            netns: netns.to_string(),
            ip: String::new(),
            _output: lines,
        };
        assert_eq!(first, "ready", "pod {netns} did not start\n{}", agent.log());
        pod.ip = pod.eth0_ipv4();
        pod
    }

    /// A pod that runs nothing but a wait.
    pub fn idle(agent: &Agent, workload: &str, netns: &str) -> Self {
        let wait = "import time; print('ready', flush=True); time.sleep(120)";
        Self::start(agent, workload, netns, &[python(), "-c", wait])
    }

    /// Runs a command in the pod's network namespace but outside its cgroup, from this test's
    /// own (unmapped) cgroup: only the TC program stands in the way.
    pub fn run_unmapped(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .args(args)
            .output()
            .expect("running ip netns exec")
    }

    /// `probe.py` from the pod's network namespace, outside its cgroup; true if it got a reply.
    pub fn probe_unmapped(&self, kind: &str, host: &str, port: u16) -> bool {
        let args = quick_probe(kind, host, port);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run_unmapped(&args).status.success()
    }

    /// The host side of the pod's veth: the interface whose index eth0 names as its peer.
    pub fn host_if(&self) -> String {
        let eth0 = json(self.run_unmapped(&["ip", "-j", "link", "show", "eth0"]));
        let peer = eth0[0]["link_index"].as_u64().expect("eth0 has a peer");
        let host = json(
            Command::new("ip")
                .args(["-j", "link", "show"])
                .output()
                .expect("ip link"),
        );
        host.as_array()
            .and_then(|links| links.iter().find(|l| l["ifindex"].as_u64() == Some(peer)))
            .and_then(|l| l["ifname"].as_str())
            .expect("the host side of the pod's veth")
            .to_string()
    }

    fn eth0_ipv4(&self) -> String {
        let addrs = json(self.run_unmapped(&["ip", "-j", "-4", "addr", "show", "eth0"]));
        addrs[0]["addr_info"][0]["local"]
            .as_str()
            .expect("the pod's address")
            .to_string()
    }

    /// Ends the pod's process (as a crash would) and waits for it.
    pub fn kill(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.kill();
    }
}

fn json(out: Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// Whether a network namespace of this name exists.
pub fn netns_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .any(|w| w == name)
        })
        .unwrap_or(true)
}

/// Runs a command in network namespace `netns` as `workload`, in that workload's cgroup.
/// `nsenter`, not `ip netns exec`, which mounts a /sys without the cgroup2 filesystem.
pub fn run_in(agent: &Agent, netns: &str, workload: &str, args: &[&str]) -> Output {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .args(agent.exec_argv(workload, None))
        .args(args)
        .output()
        .expect("running enforcer exec in a pod's network namespace")
}
