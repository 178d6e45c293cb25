//! Every resolution mode, IPv4 and IPv6, TCP and UDP, and the IPv4-mapped bypass attempt.

use crate::harness::{check, registry_only, Agent, Dns, Hosts, Want::*, World};

#[test]
fn dns_resolution_allows_a_and_aaaa_on_declared_ports_only() {
    let world = World::new("dns");
    let _hosts = Hosts::new(&world);
    let dns = Dns::new(
        &world,
        60,
        &[
            ("www.wikipedia.org", "198.51.100.10"),
            ("www.wikipedia.org", "2001:db8::10"),
        ],
    );
    world.write_policy(
        "wikipedia.yaml",
        r#"
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: wikipedia-egress}
spec:
  hosts: [www.wikipedia.org]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 443, name: https, protocol: HTTPS}
  resolution: DNS
"#,
    );
    let mesh = registry_only(&world);
    let agent = Agent::start(
        &world,
        &[
            "--mesh-config",
            &mesh,
            "--dns-server",
            &dns.addr(),
            "--namespace",
            "default",
        ],
    );

    // The first answers are awaited for a second at most; a slow dnsmasq start (seen once in
    // CI) lands in the next apply.
    agent.eventually("default", "tcp", "198.51.100.10", 80, Allowed);
    check(&agent, "default", "tcp", "198.51.100.10", 443, Allowed);
    check(&agent, "default", "tcp", "2001:db8::10", 443, Allowed);
    check(&agent, "default", "tcp", "198.51.100.10", 8080, Denied);
    check(&agent, "default", "tcp", "198.51.100.11", 80, Denied);
    check(&agent, "default", "tcp", "2001:db8::11", 80, Denied);
    // UDP to a TCP-only entry is refused, connected or not.
    check(&agent, "default", "udp", "198.51.100.10", 9999, Denied);

    let denials = agent.denials();
    let d = denials
        .iter()
        .find(|d| d["dst"] == "198.51.100.10" && d["port"] == 8080)
        .expect("a refusal record");
    assert_eq!(d["namespace"], "default");
    assert_eq!(d["proto"], "tcp");
    assert_eq!(d["host"], "www.wikipedia.org");
    assert!(
        d["comm"].as_str().is_some_and(|c| c.starts_with("python")),
        "{d}"
    );
    assert!(d["pid"].as_u64().is_some_and(|p| p > 0));
    assert!(
        d["reason"].as_str().is_some_and(|r| r.starts_with(
            "no ServiceEntry visible to namespace default allows 198.51.100.10:8080/tcp"
        )),
        "{d}"
    );
}

#[test]
fn static_endpoints_udp_and_dns_round_robin_endpoint() {
    let world = World::new("static");
    let _hosts = Hosts::new(&world);
    let dns = Dns::new(&world, 60, &[("lb.example.net", "203.0.113.30")]);
    world.write_policy(
        "static.yaml",
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mongo}
spec:
  hosts: [mymongodb.somedomain]
  ports:
  - {number: 27018, name: mongodb, protocol: MONGO, targetPort: 27017}
  - {number: 9999, name: stats, protocol: UDP}
  resolution: STATIC
  endpoints:
  - address: 198.51.100.20
  - address: "2001:db8::11"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: behind-lb}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS_ROUND_ROBIN
  endpoints: [{address: lb.example.net}]
"#,
    );
    let mesh = registry_only(&world);
    let agent = Agent::start(
        &world,
        &[
            "--mesh-config",
            &mesh,
            "--dns-server",
            &dns.addr(),
            "--namespace",
            "default",
        ],
    );

    check(&agent, "default", "tcp", "198.51.100.20", 27017, Allowed);
    check(&agent, "default", "tcp", "2001:db8::11", 27017, Allowed);
    check(&agent, "default", "udp", "198.51.100.20", 9999, Allowed);
    check(
        &agent,
        "default",
        "udp-sendto",
        "198.51.100.20",
        9999,
        Allowed,
    );
    check(
        &agent,
        "default",
        "udp-sendto",
        "2001:db8::11",
        9999,
        Allowed,
    );
    check(
        &agent,
        "default",
        "udp-sendto",
        "198.51.100.21",
        9999,
        Denied,
    );
    check(&agent, "default", "udp", "198.51.100.21", 9999, Denied);
    check(&agent, "default", "tcp", "198.51.100.21", 27017, Denied);
    check(&agent, "default", "tcp", "203.0.113.30", 443, Allowed);
    check(&agent, "default", "tcp", "203.0.113.31", 443, Denied);
}

#[test]
fn none_resolution_with_cidrs_and_without_addresses() {
    let world = World::new("none");
    let _hosts = Hosts::new(&world);
    let dns = Dns::new(&world, 60, &[("db.example.com", "198.51.100.20")]);
    world.write_policy(
        "none.yaml",
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: internal-range}
spec:
  hosts: [internal.example.com]
  addresses: [198.51.100.0/28, "2001:db8::/120"]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db-none}
spec:
  hosts: [db.example.com]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
"#,
    );
    let mesh = registry_only(&world);
    let mut agent = Agent::start(
        &world,
        &[
            "--mesh-config",
            &mesh,
            "--dns-server",
            &dns.addr(),
            "--namespace",
            "default",
        ],
    );

    check(&agent, "default", "tcp", "198.51.100.10", 8080, Allowed);
    check(&agent, "default", "tcp", "198.51.100.12", 8080, Allowed);
    check(&agent, "default", "tcp", "2001:db8::10", 8080, Allowed);
    check(&agent, "default", "tcp", "198.51.100.20", 8080, Denied);
    // Strict: NONE without addresses resolves the host.
    check(&agent, "default", "tcp", "198.51.100.20", 5432, Allowed);
    check(&agent, "default", "tcp", "203.0.113.30", 5432, Denied);
    agent.stop();
    drop(agent);

    // --istio-compat: as in Istio, any address on that TCP port.
    let compat = Agent::start(
        &world,
        &[
            "--mesh-config",
            &mesh,
            "--dns-server",
            &dns.addr(),
            "--namespace",
            "default",
            "--istio-compat",
        ],
    );
    check(&compat, "default", "tcp", "203.0.113.30", 5432, Allowed);
    check(&compat, "default", "tcp", "2001:db8::11", 5432, Allowed);
    check(&compat, "default", "tcp", "203.0.113.30", 443, Denied);
}

#[test]
fn ipv4_mapped_ipv6_is_judged_as_ipv4() {
    let world = World::new("mapped");
    let _hosts = Hosts::new(&world);
    world.write_policy(
        "one.yaml",
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: one}
spec: {hosts: [one.example.com], addresses: [198.51.100.10], ports: [{number: 80, name: http}], resolution: STATIC}
"#,
    );
    let mesh = registry_only(&world);
    let agent = Agent::start(&world, &["--mesh-config", &mesh, "--namespace", "default"]);

    check(&agent, "default", "tcp6mapped", "198.51.100.11", 80, Denied);
    check(
        &agent,
        "default",
        "tcp6mapped",
        "198.51.100.10",
        80,
        Allowed,
    );
    check(&agent, "default", "tcp", "198.51.100.10", 80, Allowed);
    let d = agent.denials();
    assert!(
        d.iter().any(|d| d["dst"] == "198.51.100.11"),
        "the mapped refusal is reported as its IPv4 address: {d:?}"
    );
}

#[test]
fn cname_chains_are_followed() {
    let world = World::new("cname");
    let _hosts = Hosts::new(&world);
    // api.example.com -> edge.example.net -> lb.example.net -> 198.51.100.12
    let dns = Dns::with_cnames(
        &world,
        &[("lb.example.net", "198.51.100.12")],
        &[
            ("api.example.com", "edge.example.net"),
            ("edge.example.net", "lb.example.net"),
        ],
    );
    world.write_policy(
        "api.yaml",
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api}\nspec:\n  hosts: [api.example.com]\n  ports: [{number: 443, name: https, protocol: HTTPS}]\n  resolution: DNS\n",
    );
    let mesh = registry_only(&world);
    let agent = Agent::start(
        &world,
        &[
            "--mesh-config",
            &mesh,
            "--dns-server",
            &dns.addr(),
            "--namespace",
            "default",
        ],
    );
    check(&agent, "default", "tcp", "198.51.100.12", 443, Allowed);
    check(&agent, "default", "tcp", "198.51.100.11", 443, Denied);
}

#[test]
fn workload_entries_selected_by_label_serve_one_host_live() {
    let world = World::new("seed002");
    let _hosts = Hosts::new(&world);
    let seed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../policies/002-workload-entry.yaml"
    ))
    .expect("seed 002 policy");
    world.write_policy("002.yaml", &seed);
    let mesh = registry_only(&world);
    let agent = Agent::start(&world, &["--mesh-config", &mesh, "--namespace", "default"]);

    // Both endpoints behind app.internal.com are allowed; an unrelated address is not.
    check(&agent, "default", "tcp", "203.0.113.40", 80, Allowed);
    check(&agent, "default", "tcp", "203.0.113.41", 80, Allowed);
    check(&agent, "default", "tcp", "198.51.100.12", 80, Denied);

    // A WorkloadEntry added with the label joins, live; one removed leaves.
    world.write_policy(
        "third.yaml",
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: third}\nspec: {address: 198.51.100.12, labels: {app: external}, ports: {http: 8080}}\n",
    );
    agent.eventually("default", "tcp", "198.51.100.12", 8080, Allowed);
    check(&agent, "default", "tcp", "198.51.100.12", 80, Denied);
    world.write_policy("002.yaml", &seed.replace("  name: second-endpoint\nspec:\n  address: 203.0.113.41\n  labels:\n    app: external\n", "  name: second-endpoint\nspec:\n  address: 203.0.113.41\n  labels:\n    app: retired\n"));
    agent.eventually("default", "tcp", "203.0.113.41", 80, Denied);
    check(&agent, "default", "tcp", "203.0.113.40", 80, Allowed);
}
