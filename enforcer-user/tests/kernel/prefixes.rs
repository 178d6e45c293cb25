//! IPv6 prefixes: one that covers `::ffff:0:0/96` (where the maps keep IPv4) must not match
//! IPv4 traffic, as Istio never matches IPv4 with an IPv6 CIDR.

use crate::harness::{check, registry_only, Agent, Hosts, Want::*, World};

#[test]
fn an_ipv6_prefix_never_matches_ipv4() {
    let world = World::new("prefix6");
    let hosts = Hosts::new(&world);
    world.write_policy(
        "v6.yaml",
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: half-of-ipv6, namespace: default}
spec:
  hosts: [v6.example.com]
  addresses: ["::/1"]
  ports: [{number: 5432, name: db, protocol: TCP}]
  resolution: STATIC
"#,
    );
    let mesh = registry_only(&world);
    // `::/64` covers `::ffff:0:0/96` as well, for every scope and port.
    let agent = Agent::start(
        &world,
        &[
            "--mesh-config",
            &mesh,
            "--namespace",
            "default",
            "--allow-cidr",
            "::/64",
        ],
    );

    // The hosts see the workload's traffic from the host side of their veth.
    check(&agent, "default", "tcp", "2001:db8::10", 5432, Allowed);
    assert!(
        hosts.reached("2001:db8::10", 5432, "2001:db8::1"),
        "{:?}",
        hosts.received()
    );

    check(&agent, "default", "tcp", "198.51.100.10", 5432, Denied);
    check(
        &agent,
        "default",
        "tcp6mapped",
        "198.51.100.10",
        5432,
        Denied,
    );
    check(&agent, "default", "tcp", "203.0.113.30", 8080, Denied);
    for (dst, port) in [("198.51.100.10", 5432), ("203.0.113.30", 8080)] {
        assert!(
            !hosts.reached(dst, port, "198.51.100.1") && !hosts.reached(dst, port, "203.0.113.1"),
            "{dst}:{port} was reached: {:?}",
            hosts.received()
        );
    }
}
