//! The TC program on local pods' veths (`enforcer exec --netns`): revocation of established
//! flows, and what connect() never sees.

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    time::{Duration, Instant},
};

use enforcer_testkit::{python, script};

use crate::{
    harness::{start_with_pods, Hosts, World},
    pod,
};

const POD_CIDR: &str = "203.0.113.192/26";

const API: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  addresses: [198.51.100.10]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: NONE
"#;

#[test]
fn deleting_an_entry_revokes_an_established_flow_within_a_second() {
    let world = World::new("tcrevoke");
    let hosts = Hosts::new(&world);
    let shop = ["--namespace", "shop"];
    let agent = start_with_pods(&world, &hosts, ("api.yaml", API), &[POD_CIDR], &shop);
    let netns = world.netns("enfpod");
    let mut client = agent
        .exec("shop", Some(&netns))
        .arg(python())
        .arg(script("stream.py"))
        .args(["198.51.100.10", "443", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the pod client");
    let mut lines = BufReader::new(client.stdout.take().expect("stdout")).lines();
    // The flow carries data first.
    for _ in 0..10 {
        let line = lines.next().and_then(Result::ok).unwrap_or_default();
        assert!(
            line.starts_with("ok"),
            "before revocation: {line:?}\n{}",
            agent.log()
        );
    }
    let removed = Instant::now();
    world.remove_policy("api.yaml");
    let stalled = loop {
        let line = lines.next().and_then(Result::ok).unwrap_or_default();
        if line.starts_with("stalled") {
            break removed.elapsed();
        }
        assert!(
            line.starts_with("ok") && removed.elapsed() < Duration::from_secs(5),
            "the flow was not cut: {line:?}\n{}",
            agent.log()
        );
    };
    let _ = client.wait();
    eprintln!("flow cut {stalled:?} after the file was removed (client timeout 0.5 s included)");
    // The client notices 0.5 s after the first dropped packet at most.
    assert!(
        stalled < Duration::from_millis(1500),
        "cut after {stalled:?}"
    );
    let denial = agent
        .denials()
        .into_iter()
        .find(|d| d["verdict"] == "revoked")
        .unwrap_or_else(|| panic!("no revocation record\n{}", agent.log()));
    assert_eq!(denial["dst"], "198.51.100.10", "{denial}");
    assert_eq!(denial["port"], 443, "{denial}");
    assert_eq!(denial["namespace"], "shop", "{denial}");

    // The pod and its TC link go with the client.
    let tc_pins = || {
        std::fs::read_dir(format!("{}/links", agent.pin_root))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("tc_"))
                    .count()
            })
            .unwrap_or(0)
    };
    agent.wait_for(Duration::from_secs(5), "the pod's removal", || {
        !pod::netns_exists(&netns) && tc_pins() == 0
    });
}
