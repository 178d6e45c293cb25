//! The boundary at the packet layer (issue 11): what a pod sends past its sockets' hooks, from
//! its network namespace but outside its cgroup (as a process the socket hooks never see), so
//! that only the TC judge on its veth stands in the way. Markers are checked for in the test
//! hosts' capture; allowed traffic goes in the same tests.

use std::{
    net::UdpSocket,
    time::{Duration, Instant},
};

use crate::{
    boundary::{assert_never_arrived, assert_recorded, attack, expect_arrival, POLICY},
    harness::{start_with_pods, Agent, Hosts, World},
    pod::Pod,
};

const POD_CIDR: &str = "203.0.113.128/26";
const POD_CIDR6: &str = "2001:db8:fe::/120";

fn start(world: &World, hosts: &Hosts) -> Agent {
    let cidrs = [POD_CIDR, POD_CIDR6];
    start_with_pods(
        world,
        hosts,
        ("shop.yaml", POLICY),
        &cidrs,
        &["--namespace", "shop"],
    )
}

fn netns_name(world: &World) -> String {
    world.netns("enfb")
}

/// `attack.py` in the pod's namespace, outside its cgroup.
fn unmapped(pod: &Pod, args: &[&str]) -> String {
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &pod.netns]);
    attack(cmd, args)
}

fn host_mac(pod: &Pod) -> String {
    let path = format!("/sys/class/net/{}/address", pod.host_if());
    std::fs::read_to_string(&path)
        .expect("the host side's MAC")
        .trim()
        .to_string()
}

#[test]
fn spoofed_sources_and_forged_replies_are_dropped_on_the_veth() {
    let world = World::new("spoof");
    let hosts = Hosts::new(&world);
    let agent = start(&world, &hosts);
    let pod = Pod::idle(&agent, "shop", &netns_name(&world));
    let mac = host_mac(&pod);
    // Its own source, to an allowed host: passes.
    let own = ["raw-ip", &pod.ip, "203.0.113.30", "9999", "ENFX-own"];
    unmapped(&pod, &own);
    // Another source, to the same allowed host: the judge used to look the pod up by it.
    unmapped(
        &pod,
        &[
            "raw-ip",
            "198.51.100.99",
            "203.0.113.30",
            "9999",
            "ENFX-spoof",
        ],
    );
    // A reply forged by a hairpin: "from" the refused host to the pod, turned around by the
    // node, then the pod's datagrams to that host as if they answered it.
    let forged = [
        "frame",
        "eth0",
        &mac,
        "0",
        "203.0.113.31",
        &pod.ip,
        "9999",
        "5555",
        "ENFX-forge",
    ];
    unmapped(&pod, &forged);
    std::thread::sleep(Duration::from_millis(200));
    unmapped(
        &pod,
        &["raw-udp", "203.0.113.31", "9999", "ENFX-afterforge", "5555"],
    );
    expect_arrival(&hosts, "ENFX-own");
    assert_never_arrived(&hosts, &["ENFX-spoof", "ENFX-afterforge"]);
    assert_recorded(&agent, "spoofed_source", Some("203.0.113.30"));
    assert_recorded(&agent, "no_rule", Some("203.0.113.31"));
}

#[test]
fn frames_that_are_not_plain_ip_and_ndp_off_link_are_dropped() {
    let world = World::new("frames");
    let hosts = Hosts::new(&world);
    let agent = start(&world, &hosts);
    let pod = Pod::idle(&agent, "shop", &netns_name(&world));
    let mac = host_mac(&pod);
    let frame = |vlans: &str, dst: &str, marker: &str| {
        let args = [
            "frame", "eth0", &mac, vlans, &pod.ip, dst, "40406", "9999", marker,
        ];
        unmapped(&pod, &args)
    };
    frame("0", "203.0.113.30", "ENFX-untagged");
    // Two priority tags: the kernel strips one before TC and the other after.
    frame("2", "203.0.113.31", "ENFX-vlan2");
    frame("2", "203.0.113.30", "ENFX-vlan2-allowed");
    frame("1", "203.0.113.31", "ENFX-vlan1");
    // A neighbour solicitation with a payload, to a global address.
    unmapped(&pod, &["ndp", "2001:db8::11", "ENFX-ndp"]);
    // IPv6 still works, neighbour discovery with it.
    assert_eq!(
        unmapped(&pod, &["udp", "2001:db8::10", "9999", "ENFX-v6"]),
        "reply"
    );
    expect_arrival(&hosts, "ENFX-untagged");
    expect_arrival(&hosts, "ENFX-v6");
    assert_never_arrived(
        &hosts,
        &["ENFX-vlan2", "ENFX-vlan2-allowed", "ENFX-vlan1", "ENFX-ndp"],
    );
    assert_recorded(&agent, "not_ip", None);
    assert_recorded(&agent, "no_rule", Some("2001:db8::11"));
}

/// Local delivery of 127.0.0.0/8 from the wire, as kube-proxy's route_localnet=1 allows; put
/// back on drop.
struct RouteLocalnet(String);

impl RouteLocalnet {
    fn on(ifname: &str) -> Self {
        let path = format!("/proc/sys/net/ipv4/conf/{ifname}/route_localnet");
        std::fs::write(&path, "1").expect("setting route_localnet");
        Self(path)
    }
}

impl Drop for RouteLocalnet {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, "0");
    }
}

#[test]
fn loopback_destinations_never_leave_a_pod() {
    let world = World::new("loopw");
    let hosts = Hosts::new(&world);
    let agent = start(&world, &hosts);
    let pod = Pod::idle(&agent, "shop", &netns_name(&world));
    let mac = host_mac(&pod);
    let _localnet = RouteLocalnet::on(&pod.host_if());
    // A service on the node's loopback.
    let node_service = UdpSocket::bind("127.0.0.1:0").expect("binding on loopback");
    node_service
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let port = node_service
        .local_addr()
        .expect("address")
        .port()
        .to_string();
    let send = |dst: &str, port: &str, marker: &str| {
        let args = [
            "frame", "eth0", &mac, "0", &pod.ip, dst, "40407", port, marker,
        ];
        unmapped(&pod, &args)
    };
    send("127.0.0.1", &port, "ENFX-loopback");
    send("203.0.113.30", "9999", "ENFX-wire-ok");
    expect_arrival(&hosts, "ENFX-wire-ok");
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        if let Ok(n) = node_service.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    assert!(got.is_empty(), "the node's loopback service got {got:?}");
    assert_recorded(&agent, "loopback", Some("127.0.0.1"));
}

#[test]
fn fragments_and_extension_headers_are_judged_as_their_datagram() {
    let world = World::new("frags");
    let hosts = Hosts::new(&world);
    let agent = start(&world, &hosts);
    let pod = Pod::idle(&agent, "shop", &netns_name(&world));
    // From a pod's own cgroup (a pod of its own, for as long as the command runs): both layers
    // judge. An allowed datagram larger than the MTU goes out in fragments, which all pass,
    // and comes back answered.
    for (dst, marker) in [("203.0.113.30", "ENFX-big4"), ("2001:db8::10", "ENFX-big6")] {
        let in_pod = agent.exec("shop", Some(&format!("{}f", pod.netns)));
        let got = attack(in_pod, &["udp-big", dst, "9999", marker, "3000"]);
        assert_eq!(got, "reply", "{dst}: a fragmented allowed datagram");
        expect_arrival(&hosts, marker);
    }
    // A destination-options header in front of allowed UDP (as root: outside the cgroup).
    assert_eq!(
        unmapped(&pod, &["dstopts", "2001:db8::10", "9999", "ENFX-dstopts"]),
        "reply"
    );
    // A later fragment alone, to a refused host: no first fragment was judged.
    unmapped(
        &pod,
        &[
            "raw-ip",
            &pod.ip,
            "203.0.113.31",
            "9999",
            "ENFX-later",
            "100",
        ],
    );
    // A routing header whose first hop is allowed and whose destination is not.
    unmapped(
        &pod,
        &[
            "rthdr",
            "2001:db8::10",
            "2001:db8::11",
            "9999",
            "ENFX-routed",
        ],
    );
    expect_arrival(&hosts, "ENFX-dstopts");
    assert_never_arrived(&hosts, &["ENFX-later", "ENFX-routed"]);
    assert_recorded(&agent, "unjudgeable", Some("203.0.113.31"));
    assert_recorded(&agent, "source_route", Some("2001:db8::10"));
}

#[test]
fn a_tunnel_from_a_pod_reaches_only_a_remote_the_policy_allows() {
    let world = World::new("tunnel");
    let hosts = Hosts::new(&world);
    let agent = start(&world, &hosts);
    let pod = Pod::idle(&agent, "shop", &netns_name(&world));
    // vxlan needs CAP_NET_ADMIN in the pod's namespace (root here, outside the cgroup). Its
    // packets leave from a kernel socket, which no cgroup hook sees: TC judges the outer one.
    // Inner destinations are on a test range and never leave the tunnel as such.
    let tunnels = [
        (
            "vxr",
            "203.0.113.31",
            "198.51.100.77",
            "ENFX-tunnel-refused",
        ),
        (
            "vxa",
            "203.0.113.30",
            "198.51.100.78",
            "ENFX-tunnel-allowed",
        ),
    ];
    for (i, (name, remote, inner, _)) in tunnels.iter().enumerate() {
        let id = (42 + i).to_string();
        let mac = format!("02:00:00:00:00:0{i}");
        let route = format!("{inner}/32");
        for cmd in [
            vec![
                "link", "add", name, "type", "vxlan", "id", &id, "remote", remote, "local",
                &pod.ip, "dstport", "9999", "dev", "eth0",
            ],
            vec!["link", "set", name, "up"],
            vec!["neigh", "add", inner, "lladdr", &mac, "dev", name],
            vec!["route", "add", &route, "dev", name],
        ] {
            let out = std::process::Command::new("ip")
                .args(["-n", &pod.netns])
                .args(&cmd)
                .output()
                .expect("ip");
            assert!(
                out.status.success(),
                "ip {cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    for (_, _, inner, marker) in tunnels {
        unmapped(&pod, &["udp", inner, "9999", marker]);
    }
    // The allowed remote's UDP port carries what is inside unjudged: that is the limit.
    expect_arrival(&hosts, "ENFX-tunnel-allowed");
    assert_never_arrived(&hosts, &["ENFX-tunnel-refused"]);
    assert_recorded(&agent, "no_rule", Some("203.0.113.31"));
}

#[test]
fn a_revoked_flow_stays_revoked_when_its_cached_verdict_goes() {
    let world = World::new("evict");
    let hosts = Hosts::new(&world);
    let agent = start(&world, &hosts);
    let pod = Pod::idle(&agent, "shop", &netns_name(&world));
    let send = |marker: &str| {
        let args = [
            "raw-ip",
            &pod.ip,
            "203.0.113.30",
            "9999",
            marker,
            "0",
            "6000",
        ];
        unmapped(&pod, &args)
    };
    send("ENFX-before");
    expect_arrival(&hosts, "ENFX-before");
    // The stats entry goes: the flow is revoked.
    let api_only = POLICY.split("---").next().unwrap_or_default();
    world.write_policy("shop.yaml", api_only);
    agent.wait_for(Duration::from_secs(10), "the removal", || {
        agent.status()["service_entries"] == 1
    });
    send("ENFX-revoked");
    assert_recorded(&agent, "no_rule", Some("203.0.113.30"));
    // The flow cache is an LRU shared by every pod: new flows evict old verdicts, in an order
    // the kernel picks. A test cannot drive that order, so it takes the entry out itself.
    forget_cached_verdict(&agent, &pod.ip, "203.0.113.30", 6000, 9999);
    // The peer's datagram to the pod's port, as a reply would come, then the pod again.
    let peer = [
        "raw-ip",
        "203.0.113.30",
        &pod.ip,
        "6000",
        "ENFX-peer",
        "0",
        "9999",
    ];
    assert_eq!(attack(in_hosts(&hosts), &peer), "sent");
    std::thread::sleep(Duration::from_millis(200));
    send("ENFX-after-evict");
    // A peer may still open a flow of its own to the pod, and the pod answer it.
    let opener = [
        "raw-ip",
        "203.0.113.31",
        &pod.ip,
        "6001",
        "ENFX-open",
        "0",
        "9999",
    ];
    attack(in_hosts(&hosts), &opener);
    std::thread::sleep(Duration::from_millis(200));
    let answer = [
        "raw-ip",
        &pod.ip,
        "203.0.113.31",
        "9999",
        "ENFX-answer",
        "0",
        "6001",
    ];
    unmapped(&pod, &answer);
    expect_arrival(&hosts, "ENFX-answer");
    assert_never_arrived(&hosts, &["ENFX-revoked", "ENFX-after-evict"]);
    let revoked = agent
        .denials()
        .into_iter()
        .any(|d| d["verdict"] == "revoked" && d["dst"] == "203.0.113.30");
    assert!(revoked, "no revoked record: {:#?}", agent.denials());
}

fn in_hosts(hosts: &Hosts) -> std::process::Command {
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", hosts.netns()]);
    cmd
}

/// Deletes a UDP flow's entry from the pinned flow cache, as an eviction would.
fn forget_cached_verdict(agent: &Agent, src: &str, dst: &str, sport: u16, dport: u16) {
    let v4 = |a: &str| -> Vec<u8> {
        let ip: std::net::Ipv4Addr = a.parse().expect("an IPv4 address");
        let mut key = vec![0u8; 10];
        key.extend([0xff, 0xff]);
        key.extend(ip.octets());
        key
    };
    // FlowKey: source, destination, ports in host byte order, protocol, padding.
    let mut key = v4(src);
    key.extend(v4(dst));
    key.extend(sport.to_le_bytes());
    key.extend(dport.to_le_bytes());
    key.extend([17, 0, 0, 0]);
    let pin = format!("{}/maps/ENF_FLOWS", agent.pin_root);
    let out = std::process::Command::new("bpftool")
        .args(["map", "delete", "pinned", &pin, "key"])
        .args(key.iter().map(u8::to_string))
        .output()
        .expect("running bpftool");
    assert!(
        out.status.success(),
        "bpftool map delete: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
