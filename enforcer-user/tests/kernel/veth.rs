//! Finding a pod's host-side veth the way Kubernetes mode does, on real interfaces laid out as a
//! routed CNI (Calico-style: a host route per pod) and as a bridge CNI (the bridge plugin) would.

use std::{net::IpAddr, path::Path, process::Command};

use enforcer_user::veth::{host_side, Found};

use crate::harness::World;

pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Network namespaces and links made here, removed on drop.
pub struct Made {
    pub netns: Vec<String>,
    pub links: Vec<String>,
}

impl Drop for Made {
    fn drop(&mut self) {
        for link in &self.links {
            let _ = Command::new("ip").args(["link", "del", link]).output();
        }
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A pod namespace with `eth0` holding `addr`, joined to the host by `host_if`.
pub fn pod(made: &mut Made, netns: &str, host_if: &str, addr: &str) {
    made.netns.push(netns.to_string());
    made.links.push(host_if.to_string());
    ip(&["netns", "add", netns]);
    ip(&[
        "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", netns,
    ]);
    ip(&["-n", netns, "addr", "add", addr, "dev", "eth0"]);
    ip(&["-n", netns, "link", "set", "eth0", "up"]);
    ip(&["link", "set", host_if, "up"]);
}

#[test]
fn the_host_side_veth_is_found_for_routed_and_bridged_pods() {
    let world = World::new("veth");
    let tag = &world.id[world.id.len().saturating_sub(6)..];
    let mut made = Made {
        netns: Vec::new(),
        links: Vec::new(),
    };

    // Routed: the host has a /32 route to the pod through its veth.
    let (routed_ns, routed_if) = (format!("enfvr-{tag}"), format!("evr{tag}"));
    pod(&mut made, &routed_ns, &routed_if, "203.0.113.170/32");
    ip(&["route", "add", "203.0.113.170/32", "dev", &routed_if]);
    let routed: IpAddr = "203.0.113.170".parse().expect("address");
    assert_eq!(
        host_side(routed, None).expect("routed pod"),
        Found::Route(routed_if.clone())
    );

    // Bridged: the route leads to the bridge; the pod's namespace names the peer.
    let (bridged_ns, bridged_if, bridge) = (
        format!("enfvb-{tag}"),
        format!("evb{tag}"),
        format!("ebr{tag}"),
    );
    made.links.push(bridge.clone());
    ip(&["link", "add", &bridge, "type", "bridge"]);
    ip(&["addr", "add", "203.0.113.177/29", "dev", &bridge]);
    ip(&["link", "set", &bridge, "up"]);
    pod(&mut made, &bridged_ns, &bridged_if, "203.0.113.178/29");
    ip(&["link", "set", &bridged_if, "master", &bridge]);
    let bridged: IpAddr = "203.0.113.178".parse().expect("address");
    let netns = Path::new("/var/run/netns").join(&bridged_ns);
    assert_eq!(
        host_side(bridged, Some(&netns)).expect("bridged pod"),
        Found::Peer(bridged_if.clone())
    );
    // Without the namespace the route alone cannot tell, and says so.
    let err = host_side(bridged, None).expect_err("a bridge is not the pod's veth");
    assert!(
        err.to_string().contains("does not lead to a veth"),
        "{err:#}"
    );
    // A namespace that does not hold the address is not taken for the pod's.
    let wrong = Path::new("/var/run/netns").join(&routed_ns);
    let err = host_side(bridged, Some(&wrong)).expect_err("wrong namespace");
    assert!(err.to_string().contains("holds 203.0.113.178"), "{err:#}");
}
