//! The boundary at the socket layer (issue 11): what the address hooks never judged, sent from
//! an enforced workload in the host's network namespace (cgroup-only, as local mode and
//! hostNetwork pods are). Each attack carries a marker; the test hosts' capture says whether
//! it arrived. Allowed traffic goes in the same tests.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use enforcer_testkit::{python, script};

use crate::harness::{registry_only, Agent, Hosts, Outcome, World};

/// Allowed: 198.51.100.10 and 2001:db8::10 (TCP 443 and 8443, UDP 9999), 203.0.113.30 (UDP 9999).
/// Refused: everything else, 203.0.113.31, 198.51.100.11 and 2001:db8::11 among them.
pub const POLICY: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  addresses: [198.51.100.10, "2001:db8::10"]
  ports:
  - {number: 443, name: tls, protocol: TLS}
  - {number: 9999, name: udp, protocol: UDP}
  - {number: 8443, name: mptcp, protocol: TCP}
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: stats, namespace: shop}
spec:
  hosts: [stats.example.com]
  addresses: [203.0.113.30]
  ports: [{number: 9999, name: udp, protocol: UDP}]
  resolution: NONE
"#;

fn start(world: &World) -> Agent {
    world.write_policy("shop.yaml", POLICY);
    let mesh = registry_only(world);
    Agent::start(world, &["--mesh-config", &mesh, "--namespace", "shop"])
}

/// Runs `attack.py` in `cmd` (a workload, or a pod's namespace) and returns what it printed.
pub fn attack(cmd: Command, args: &[&str]) -> String {
    let script = script("attack.py");
    let script = script.to_string_lossy();
    let mut all = vec![script.as_ref()];
    all.extend(args);
    python_says(cmd, &all)
}

/// What python with `args`, run by `cmd`, printed (stdout, then stderr).
fn python_says(mut cmd: Command, args: &[&str]) -> String {
    let out = cmd
        .arg(python())
        .args(args)
        .output()
        .expect("running python");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// Whether a packet with `marker` reached the test hosts (their capture).
pub fn arrived(hosts: &Hosts, marker: &str) -> bool {
    let prefix = format!("pkt {marker} ");
    hosts.received().iter().any(|l| l.starts_with(&prefix))
}

/// Waits (bounded) for the allowed `marker` to arrive, so that the capture has caught up
/// before the refused markers are checked for.
#[track_caller]
pub fn expect_arrival(hosts: &Hosts, marker: &str) {
    let start = Instant::now();
    while !arrived(hosts, marker) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "allowed {marker} never arrived: {:#?}",
            hosts.received()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // What was sent before it has had as long to arrive.
    std::thread::sleep(Duration::from_millis(300));
}

#[track_caller]
pub fn assert_never_arrived(hosts: &Hosts, markers: &[&str]) {
    let got: Vec<_> = markers.iter().filter(|m| arrived(hosts, m)).collect();
    assert!(
        got.is_empty(),
        "these reached the test hosts: {got:?}\n{:#?}",
        hosts.received()
    );
}

/// Asserts a record with this reason code (and destination, if given) was made.
#[track_caller]
pub fn assert_recorded(agent: &Agent, code: &str, dst: Option<&str>) {
    let start = Instant::now();
    loop {
        let found = agent
            .denials()
            .iter()
            .any(|d| d["reason_code"] == code && dst.is_none_or(|dst| d["dst"] == dst));
        if found {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "no {code} record for {dst:?}: {:#?}",
            agent.denials()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Lets unprivileged ping sockets be made in this namespace (containerd does it for pods), and
/// puts the old range back.
struct PingGroups(String);

impl PingGroups {
    const PATH: &'static str = "/proc/sys/net/ipv4/ping_group_range";

    fn open() -> Self {
        let old = std::fs::read_to_string(Self::PATH).expect("reading ping_group_range");
        std::fs::write(Self::PATH, "0 2147483647").expect("writing ping_group_range");
        Self(old)
    }
}

impl Drop for PingGroups {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, self.0.trim());
    }
}

#[test]
fn sockets_the_address_hooks_cannot_judge_are_refused_at_creation() {
    let world = World::new("socks");
    let hosts = Hosts::new(&world);
    let agent = start(&world);
    let _ping = PingGroups::open();
    let shop = || agent.exec("shop", None);
    let tries: &[(&[&str], &str)] = &[
        (
            &["raw-udp", "203.0.113.31", "9999", "ENFX-raw4"],
            "ENFX-raw4",
        ),
        (
            &["raw-ip", "0.0.0.0", "203.0.113.31", "9999", "ENFX-hdrincl"],
            "ENFX-hdrincl",
        ),
        (
            &["raw-udp", "2001:db8::11", "9999", "ENFX-raw6"],
            "ENFX-raw6",
        ),
        (&["ping", "203.0.113.31", "ENFX-ping"], "ENFX-ping"),
        (
            &["udplite", "203.0.113.31", "9999", "ENFX-lite"],
            "ENFX-lite",
        ),
        (
            &["mptcp", "203.0.113.31", "443", "ENFX-mptcp"],
            "ENFX-mptcp",
        ),
    ];
    let mut said = Vec::new();
    for (args, _) in tries {
        said.push((args[0], attack(shop(), args)));
    }
    // SCTP is refused too where the kernel has it (this one may not: then socket() fails).
    let sctp = attack(shop(), &["sctp", "203.0.113.31", "9999"]);
    assert_eq!(
        attack(shop(), &["udp", "203.0.113.30", "9999", "ENFX-allowed"]),
        "reply"
    );
    expect_arrival(&hosts, "ENFX-allowed");
    assert!(
        matches!(
            agent.probe("shop", "tcp", "198.51.100.10", 443),
            Outcome::Ok(_)
        ),
        "plain TCP to an allowed host must still work"
    );
    let markers: Vec<&str> = tries.iter().map(|(_, m)| *m).collect();
    assert_never_arrived(&hosts, &markers);
    let sctp_packets: Vec<_> = hosts
        .received()
        .into_iter()
        .filter(|l| l.starts_with("pkt - 132 "))
        .collect();
    assert!(sctp_packets.is_empty(), "SCTP ({sctp}): {sctp_packets:?}");
    let mptcp_reached = hosts
        .received()
        .iter()
        .any(|l| l.starts_with("tcp 203.0.113.31:443 "));
    assert!(!mptcp_reached, "an MPTCP connection reached 203.0.113.31");
    for (kind, got) in &said {
        assert_eq!(got, "EPERM", "{kind}: the sender was told {got}");
    }
    assert_recorded(&agent, "socket_type", None);
    let kinds: Vec<String> = agent
        .denials()
        .iter()
        .filter(|d| d["hook"] == "sock_create")
        .map(|d| d["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    for kind in ["a raw socket", "ping", "UDP-Lite", "MPTCP"] {
        assert!(
            kinds.iter().any(|r| r.contains(kind)),
            "no record for {kind}: {kinds:#?}"
        );
    }
}

#[test]
fn source_routes_are_refused_by_option_and_by_control_message() {
    let world = World::new("srcrt");
    let hosts = Hosts::new(&world);
    let agent = start(&world);
    let shop = || agent.exec("shop", None);
    // Each names an allowed destination and sends to a refused first hop.
    let routed: &[&[&str]] = &[
        &["lsrr", "203.0.113.31", "198.51.100.10", "9999", "ENFX-lsrr"],
        &[
            "lsrr-cmsg",
            "203.0.113.31",
            "198.51.100.10",
            "9999",
            "ENFX-lsrrcmsg",
        ],
        // IPv6 takes a routing header in a control message only with mobile IPv6 built
        // in; the egress check refuses it like the IPv4 one where it is.
        &[
            "rthdr",
            "2001:db8::11",
            "2001:db8::10",
            "9999",
            "ENFX-rthdr",
        ],
    ];
    let said: Vec<(String, String)> = routed
        .iter()
        .map(|args| (args[0].to_string(), attack(shop(), args)))
        .collect();
    assert_eq!(
        attack(shop(), &["udp", "198.51.100.10", "9999", "ENFX-plain4"]),
        "reply"
    );
    assert_eq!(
        attack(shop(), &["udp", "2001:db8::10", "9999", "ENFX-plain6"]),
        "reply"
    );
    expect_arrival(&hosts, "ENFX-plain4");
    expect_arrival(&hosts, "ENFX-plain6");
    let markers: Vec<&str> = routed.iter().map(|a| a[a.len() - 1]).collect();
    assert_never_arrived(&hosts, &markers);
    for (kind, got) in &said {
        assert_eq!(got, "EPERM", "{kind}: the sender was told {got}");
    }
    assert_recorded(&agent, "source_route", None);
    let hooks: Vec<_> = agent
        .denials()
        .iter()
        .filter(|d| d["reason_code"] == "source_route")
        .map(|d| d["hook"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        hooks.iter().any(|h| h == "setsockopt") && hooks.iter().any(|h| h == "skb_egress"),
        "{hooks:?}"
    );
}

#[test]
fn connected_udp_with_a_control_message_is_judged_by_where_it_is_connected() {
    let world = World::new("udpcm");
    let hosts = Hosts::new(&world);
    let agent = start(&world);
    let shop = || agent.exec("shop", None);
    for (dst, marker) in [
        ("203.0.113.30", "ENFX-tos4"),
        ("2001:db8::10", "ENFX-tclass6"),
    ] {
        let got = attack(shop(), &["udp-tos", dst, "9999", marker]);
        assert_eq!(got, "reply", "{dst}: {}", agent.log());
        expect_arrival(&hosts, marker);
    }
    // Connecting to a refused host is refused as ever.
    let got = attack(
        shop(),
        &["udp-tos", "203.0.113.31", "9999", "ENFX-tos-refused"],
    );
    assert_eq!(got, "EPERM");
    assert_never_arrived(&hosts, &["ENFX-tos-refused"]);
    let nonsense = agent
        .denials()
        .into_iter()
        .filter(|d| d["dst"] == "0.0.0.0" || d["dst"] == "::")
        .count();
    assert_eq!(nonsense, 0, "records of 0.0.0.0:0: {:#?}", agent.denials());
}

/// The host namespace's MPTCP limits, raised so that the client accepts an advertised address,
/// and put back.
struct MptcpLimits(String);

impl MptcpLimits {
    fn accept_addresses() -> Self {
        let out = Command::new("ip")
            .args(["mptcp", "limits", "show"])
            .output()
            .expect("ip mptcp");
        let old = String::from_utf8_lossy(&out.stdout).trim().to_string();
        ip(&[
            "mptcp",
            "limits",
            "set",
            "add_addr_accepted",
            "2",
            "subflows",
            "2",
        ]);
        Self(old)
    }
}

impl Drop for MptcpLimits {
    fn drop(&mut self) {
        let mut args = vec!["mptcp", "limits", "set"];
        args.extend(self.0.split_whitespace());
        ip(&args);
    }
}

#[track_caller]
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An MPTCP client sending to an allowed address for two seconds; prints what it was told.
const MPTCP_CLIENT: &str = "
import socket, sys, time
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
    s.settimeout(2)
    s.connect(('198.51.100.10', 8443))
    end = time.monotonic() + 2
    while time.monotonic() < end:
        s.sendall(b'ENFX-mptcp-data ' * 64)
        time.sleep(0.02)
    print('sent')
except PermissionError:
    print('EPERM')
";

#[test]
fn mptcp_subflows_to_advertised_addresses_go_nowhere() {
    let world = World::new("mptcp");
    let hosts = Hosts::new(&world);
    let agent = start(&world);
    // An MPTCP server on the allowed address that advertises a refused one (ADD_ADDR): the
    // client's kernel opens a subflow there, which no connect() of the workload asks for.
    let mut server = Command::new("ip")
        .args(["netns", "exec", hosts.netns(), python()])
        .arg(script("host.py"))
        .args(["--mptcp", "8443", "--addrs", ""])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting the MPTCP server");
    ip(&[
        "-n",
        hosts.netns(),
        "mptcp",
        "limits",
        "set",
        "subflows",
        "2",
    ]);
    ip(&[
        "-n",
        hosts.netns(),
        "mptcp",
        "endpoint",
        "add",
        "203.0.113.31",
        "signal",
    ]);
    let _limits = MptcpLimits::accept_addresses();
    std::thread::sleep(Duration::from_millis(300));
    let got = python_says(agent.exec("shop", None), &["-c", MPTCP_CLIENT]);
    assert_eq!(
        attack(
            agent.exec("shop", None),
            &["udp", "203.0.113.30", "9999", "ENFX-mp-ok"]
        ),
        "reply"
    );
    expect_arrival(&hosts, "ENFX-mp-ok");
    let _ = server.kill();
    let _ = server.wait();
    let subflow: Vec<_> = hosts
        .received()
        .into_iter()
        .filter(|l| l.contains(" 203.0.113.31") || l.starts_with("tcp 203.0.113.31:"))
        .collect();
    assert!(
        subflow.is_empty(),
        "reached the advertised address: {subflow:#?}"
    );
    assert_eq!(got, "EPERM", "the MPTCP client was told {got}");
    assert_recorded(&agent, "socket_type", None);
}
