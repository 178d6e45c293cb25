//! Records under attack (issue 11): one workload's refusal flood neither drowns another's
//! records nor goes uncounted.

use std::time::Duration;

use enforcer_testkit::python;

use crate::{
    boundary::{assert_recorded, POLICY},
    harness::{registry_only, Agent, Outcome, World},
};

/// Refused datagrams as fast as one process sends them, for two seconds at most.
const FLOOD: &str = "
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
n, end = 0, time.monotonic() + 2
while n < 50000 and time.monotonic() < end:
    try:
        s.sendto(b'x', ('203.0.113.31', 9999))
    except PermissionError:
        n += 1
print(n)
";

/// A change that makes the agent apply (and write its status) again.
const NUDGE: &str = "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: nudge, namespace: other}
spec:
  hosts: [nudge.example.com]
  addresses: [198.51.100.21]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
";

#[test]
fn a_flood_of_refusals_is_limited_per_scope_and_counted() {
    let world = World::new("flood");
    world.write_policy("shop.yaml", POLICY);
    let mesh = registry_only(&world);
    let agent = Agent::start(
        &world,
        &[
            "--mesh-config",
            &mesh,
            "--namespace",
            "shop",
            "--namespace",
            "other",
        ],
    );
    let flood = std::thread::scope(|s| {
        let flood = s.spawn(|| {
            let out = agent
                .exec("shop", None)
                .args([python(), "-c", FLOOD])
                .output()
                .expect("running the flood");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
        });
        // Another namespace's one refusal, in the middle of it.
        std::thread::sleep(Duration::from_millis(500));
        let got = agent.probe("other", "tcp", "198.51.100.11", 443);
        assert_eq!(got, Outcome::Eperm);
        flood.join().unwrap_or(0)
    });
    assert!(flood > 2000, "the flood made only {flood} refusals");
    assert_recorded(&agent, "no_rule", Some("198.51.100.11"));
    let flooded = agent
        .denials()
        .iter()
        .filter(|d| d["dst"] == "203.0.113.31")
        .count() as u64;
    // 200 a second per CPU, over at most three windows on each of this machine's CPUs.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    assert!(
        flooded > 0 && flooded <= 200 * 3 * cpus,
        "{flooded} records of {flood} refusals"
    );
    // The status counts what was not recorded (written at the next apply).
    world.write_policy("nudge.yaml", NUDGE);
    agent.wait_for(Duration::from_secs(10), "the counted loss", || {
        let lost = &agent.status()["records_lost"];
        let limited = lost["rate_limited"].as_u64().unwrap_or(0);
        limited + flooded + lost["ring_full"].as_u64().unwrap_or(0) >= flood
    });
}
