//! What the TC program decides on its own: raw sockets, processes outside the pod's cgroup,
//! connections that peers open to a pod, and the programs' clean-up with the pod.

use std::{path::Path, process::Command, time::Duration};

use enforcer_testkit::{python, script};

use crate::{
    harness::{start_with_pods, Agent, Hosts, Outcome, World, ENFORCER},
    pod::{netns_exists, Pod},
};

const POD_CIDR: &str = "203.0.113.192/26";
const POD_CIDR6: &str = "2001:db8:ff::/120";

const SHOP: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  addresses: [198.51.100.10, "2001:db8::10"]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: shop}
spec:
  hosts: [db.example.com]
  addresses: [198.51.100.20]
  ports: [{number: 5432, name: pg, protocol: TCP}]
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
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web-range, namespace: shop}
spec:
  hosts: [web.example.com]
  addresses: [203.0.113.40/31]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: NONE
"#;

fn start(world: &World, hosts: &Hosts) -> Agent {
    let extra = [
        "--namespace",
        "shop",
        "--namespace",
        "other",
        "--allow-cidr",
        "198.51.100.12/32",
    ];
    start_with_pods(
        world,
        hosts,
        ("shop.yaml", SHOP),
        &[POD_CIDR, POD_CIDR6],
        &extra,
    )
}

fn netns_name(world: &World, n: u32) -> String {
    world.netns(&format!("enfp{n}"))
}

#[test]
fn connect_hooks_and_tc_give_the_same_verdicts() {
    let world = World::new("tcagree");
    let hosts = Hosts::new(&world);
    let agent = start(&world, &hosts);
    let shop = Pod::idle(&agent, "shop", &netns_name(&world, 1));
    let other = Pod::idle(&agent, "other", &netns_name(&world, 2));
    // (kind, host, port, allowed in shop); "other" has only the --allow-cidr range.
    let cases: &[(&str, &str, u16, bool)] = &[
        ("tcp", "198.51.100.10", 443, true),
        ("tcp", "198.51.100.10", 80, false),
        ("tcp", "198.51.100.11", 443, false),
        ("tcp", "198.51.100.20", 5432, true),
        ("udp", "203.0.113.30", 9999, true),
        ("udp", "203.0.113.31", 9999, false),
        ("tcp", "203.0.113.41", 80, true),
        ("tcp", "203.0.113.41", 8080, false),
        ("tcp", "198.51.100.12", 27017, true),
        ("tcp", "2001:db8::10", 443, true),
        ("tcp", "2001:db8::10", 80, false),
        ("tcp", "2001:db8::11", 443, false),
    ];
    for (ns, pod) in [("shop", &shop), ("other", &other)] {
        // The TC side times out on a drop, so its probes run at once.
        let through_tc: Vec<bool> = std::thread::scope(|s| {
            let probes: Vec<_> = cases
                .iter()
                .map(|&(kind, host, port, _)| s.spawn(move || pod.probe_unmapped(kind, host, port)))
                .collect();
            probes
                .into_iter()
                .map(|p| p.join().unwrap_or(false))
                .collect()
        });
        for (&(kind, host, port, in_shop), tc) in cases.iter().zip(through_tc) {
            let want = if ns == "shop" {
                in_shop
            } else {
                host == "198.51.100.12"
            };
            let connect = match agent.probe(ns, kind, host, port) {
                Outcome::Ok(_) => true,
                Outcome::Eperm => false,
                other => panic!("{ns}: {kind} {host}:{port}: connect path gave {other:?}"),
            };
            assert_eq!(
                (connect, tc),
                (want, want),
                "{ns}: {kind} {host}:{port}: (connect hooks, tc) disagree or are wrong\n{}",
                agent.log()
            );
        }
    }
    // The TC refusals are on record with the hook that made them.
    let tc_refusals: Vec<_> = agent
        .denials()
        .into_iter()
        .filter(|d| d["hook"] == "tc")
        .collect();
    assert!(
        tc_refusals
            .iter()
            .any(|d| d["namespace"] == "shop" && d["dst"] == "198.51.100.11" && d["port"] == 443),
        "{tc_refusals:?}"
    );
    assert!(
        tc_refusals
            .iter()
            .any(|d| d["namespace"] == "other" && d["dst"] == "198.51.100.10"),
        "{tc_refusals:?}"
    );
    assert!(
        tc_refusals
            .iter()
            .any(|d| d["namespace"] == "shop" && d["dst"] == "2001:db8::11"),
        "{tc_refusals:?}"
    );
}

#[test]
fn raw_sockets_in_a_pod_are_judged_per_packet() {
    let world = World::new("tcraw");
    let hosts = Hosts::new(&world);
    let agent = start(&world, &hosts);
    // In the pod's cgroup a raw socket is refused at creation (the `boundary` tests); from its
    // network namespace outside the cgroup, as a process the socket hooks never see, the TC
    // judge decides each packet.
    let pod = Pod::idle(&agent, "shop", &netns_name(&world, 1));
    let out = Command::new("ip")
        .args(["netns", "exec", &pod.netns])
        .arg(python())
        .arg(script("raw.py"))
        .args([
            "udp:203.0.113.30:9999",
            "udp:198.51.100.11:9999",
            "icmp:198.51.100.10",
        ])
        .output()
        .expect("running raw.py in a pod");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "udp:203.0.113.30:9999 reply",
            "udp:198.51.100.11:9999 silent",
            "icmp:198.51.100.10 silent",
        ],
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    let denials = agent.denials();
    let caught = |dst: &str, proto: &str| {
        denials.iter().any(|d| {
            d["hook"] == "tc"
                && d["dst"] == dst
                && d["proto"] == proto
                && d["namespace"] == "shop"
                && d["verdict"] == "denied"
        })
    };
    assert!(caught("198.51.100.11", "udp"), "{denials:?}");
    assert!(caught("198.51.100.10", "icmp"), "{denials:?}");
}

#[test]
fn a_pod_answers_connections_that_peers_open_to_it() {
    let world = World::new("tcinbound");
    let hosts = Hosts::new(&world);
    let agent = start(&world, &hosts);
    let host_py = script("host.py");
    let server = Pod::start(
        &agent,
        "shop",
        &netns_name(&world, 1),
        &[python(), &host_py.to_string_lossy(), "--tcp", "8080"],
    );
    // REGISTRY_ONLY, and no entry names the test hosts on any port the pod's replies use.
    assert!(
        hosts.probe("tcp", &server.ip, 8080),
        "a test host could not reach the pod's server\n{}",
        agent.log()
    );
    // Still after a policy change, which invalidates cached verdicts but not replies.
    world.remove_policy("shop.yaml");
    agent.wait_for(Duration::from_secs(5), "the removal", || {
        agent.status()["service_entries"] == 0
    });
    assert!(hosts.probe("tcp", &server.ip, 8080), "{}", agent.log());
    // Replies open nothing else: the pod still cannot call the test hosts.
    assert!(!server.probe_unmapped("tcp", "198.51.100.10", 8080));
    let about_server: Vec<_> = agent
        .denials()
        .into_iter()
        .filter(|d| d["port"] != 8080)
        .collect();
    assert!(
        about_server.is_empty(),
        "replies were refused: {about_server:?}"
    );
}

#[test]
fn the_tc_programs_go_with_the_pod_and_outlive_the_agent() {
    let world = World::new("tcclean");
    let hosts = Hosts::new(&world);
    let mut agent = start(&world, &hosts);
    let links = Path::new(&agent.pin_root).join("links");
    let pins = |ifname: &str| {
        [format!("tc_{ifname}"), format!("tc_{ifname}_reply")]
            .iter()
            .filter(|p| links.join(p).exists())
            .count()
    };

    let mut pod = Pod::idle(&agent, "shop", &netns_name(&world, 1));
    let host_if = pod.host_if();
    assert_eq!(pins(&host_if), 2);
    let judge = pinned_link(&links.join(format!("tc_{host_if}")));
    let tracker = pinned_link(&links.join(format!("tc_{host_if}_reply")));
    let (Some((judge, judge_prog)), Some((tracker, tracker_prog))) = (judge, tracker) else {
        panic!("{host_if}: the pinned TC links are not live links");
    };
    assert_eq!(
        (judge_prog.as_str(), tracker_prog.as_str()),
        ("enforcer_tc", "enforcer_reply")
    );
    pod.kill();
    agent.wait_for(Duration::from_secs(5), "the pod's removal", || {
        !netns_exists(&pod.netns) && pins(&host_if) == 0 && !interface_exists(&host_if)
    });
    // With the veth and the pins gone, the kernel has released both links.
    assert!(!link_exists(judge) && !link_exists(tracker));

    // A pod outlives a stopped agent, still enforced; teardown removes it.
    let pod = Pod::idle(&agent, "shop", &netns_name(&world, 2));
    let host_if = pod.host_if();
    agent.stop();
    assert!(pod.probe_unmapped("tcp", "198.51.100.10", 443));
    assert!(!pod.probe_unmapped("tcp", "198.51.100.11", 443));
    let out = Command::new(ENFORCER)
        .args([
            "teardown",
            "--bpffs-root",
            &agent.pin_root,
            "--cgroup-parent",
            &agent.cgroup_parent,
        ])
        .output()
        .expect("running enforcer teardown");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!netns_exists(&pod.netns), "teardown left the pod");
    assert!(!interface_exists(&host_if), "teardown left {host_if}");
    assert!(!Path::new(&agent.pin_root).exists(), "teardown left pins");
}

fn bpftool(args: &[&str]) -> serde_json::Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("running bpftool");
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// The id of a pinned link and the name of its program. (Debian's bpftool predates TCX and
/// cannot list a link's interface.)
fn pinned_link(pin: &Path) -> Option<(u64, String)> {
    let link = bpftool(&["link", "show", "pinned", &pin.to_string_lossy()]);
    let id = link["id"].as_u64()?;
    let prog = link["prog_id"].as_u64()?.to_string();
    let name = bpftool(&["prog", "show", "id", &prog])["name"]
        .as_str()?
        .to_string();
    Some((id, name))
}

fn link_exists(id: u64) -> bool {
    bpftool(&["link", "show"])
        .as_array()
        .into_iter()
        .flatten()
        .any(|l| l["id"].as_u64() == Some(id))
}

fn interface_exists(ifname: &str) -> bool {
    Path::new("/sys/class/net").join(ifname).exists()
}
