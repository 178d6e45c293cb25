//! What the running agent tells over its control socket: `enforcer events` (recent and live
//! records, filtered) naming the pod and its labels, for the socket hooks and for TC.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

use crate::{
    harness::{start_with_pods, Hosts, Want, World},
    pod::Pod,
};

const POD_CIDR: &str = "203.0.113.192/26";

/// shop may reach 198.51.100.10:80; `other` declares a host for 198.51.100.12 that shop
/// cannot see, so shop's refusal towards it still names the host.
const POLICY: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  addresses: [198.51.100.10]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: billing, namespace: other}
spec:
  hosts: [billing.example.com]
  addresses: [198.51.100.12]
  exportTo: ["."]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: NONE
"#;

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// Kills `enforcer events --follow` however the test ends.
struct Follower(Child);

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn events_name_the_pod_and_its_labels_and_filter_as_asked() {
    let world = World::new("events");
    let hosts = Hosts::new(&world);
    let shop = ["--namespace", "shop"];
    let agent = start_with_pods(&world, &hosts, ("api.yaml", POLICY), &[POD_CIDR], &shop);
    let netns = world.netns("enfev");
    let pod = Pod::idle(&agent, "shop:app=web", &netns);

    // Allowed and refused, from the pod's cgroup: the hosts see only the allowed one.
    agent.eventually("shop:app=web", "tcp", "198.51.100.10", 80, Want::Allowed);
    agent.eventually("shop:app=web", "tcp", "198.51.100.11", 80, Want::Denied);
    agent.eventually("shop:app=web", "tcp", "198.51.100.12", 80, Want::Denied);
    // From the pod's netns outside its cgroup: only TC judges, and the record comes from TC.
    assert!(!pod.probe_unmapped("tcp", "198.51.100.11", 8080));
    assert!(hosts
        .received()
        .iter()
        .any(|l| l.starts_with("tcp 198.51.100.10:80 ")));
    assert!(
        !hosts
            .received()
            .iter()
            .any(|l| l.contains("198.51.100.11") || l.contains("198.51.100.12")),
        "{:?}",
        hosts.received()
    );
    agent.wait_for(Duration::from_secs(5), "the TC record", || {
        agent.denials().iter().any(|d| d["hook"] == "tc")
    });

    let events = |args: &[&str]| {
        json_lines(
            &agent
                .cli("events")
                .arg("--json")
                .args(args)
                .output()
                .unwrap(),
        )
    };
    let all = events(&["--last", "100"]);
    let connect = all
        .iter()
        .find(|r| r["dst"] == "198.51.100.11" && r["hook"] == "connect4")
        .unwrap_or_else(|| panic!("{all:#?}"));
    assert_eq!(connect["namespace"], "shop");
    assert_eq!(connect["labels"]["app"], "web", "{connect}");
    let tc = all.iter().find(|r| r["hook"] == "tc").unwrap();
    assert_eq!(tc["pod"], netns.as_str(), "{tc}");
    assert_eq!(tc["port"], 8080);

    // Each filter keeps what it names, and only that.
    let by_pod = events(&["--pod", &netns]);
    assert!(
        !by_pod.is_empty() && by_pod.iter().all(|r| r["pod"] == netns.as_str()),
        "{by_pod:#?}"
    );
    let to_11 = events(&["--to", "198.51.100.11/32", "--port", "80"]);
    assert!(
        !to_11.is_empty()
            && to_11
                .iter()
                .all(|r| r["dst"] == "198.51.100.11" && r["port"] == 80),
        "{to_11:#?}"
    );
    let billing = events(&["--host", "*.example.com"]);
    assert!(
        !billing.is_empty() && billing.iter().all(|r| r["host"] == "billing.example.com"),
        "{billing:#?}"
    );
    assert!(events(&["--namespace", "bank"]).is_empty());
    assert!(events(&["--verdict", "audit"]).is_empty());
    assert_eq!(events(&["--last", "1"]).len(), 1);

    // Following: a record made after the reader came arrives, and only one that matches.
    let mut follower = agent
        .cli("events")
        .args(["--json", "--follow", "--last", "0", "--port", "5432"])
        .stdout(Stdio::piped())
        .spawn()
        .map(Follower)
        .expect("enforcer events --follow");
    let stdout = follower.0.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // Until the follower is connected, records go unseen: try a few times, bounded.
    let mut got = None;
    for _ in 0..10 {
        agent.eventually("shop:app=web", "tcp", "198.51.100.11", 5432, Want::Denied);
        if let Ok(line) = rx.recv_timeout(Duration::from_secs(1)) {
            got = Some(line);
            break;
        }
    }
    let line: serde_json::Value = serde_json::from_str(&got.expect("a followed record")).unwrap();
    assert_eq!(line["port"], 5432);
    assert_eq!(line["labels"]["app"], "web");
    drop(follower);

    // Followers that leave free their place: more come and go than the agent takes at once
    // (16), and each is still served.
    // (A place is freed when the agent sees the socket close: a few tries allow for that.)
    let follow_once = || {
        let mut f = agent
            .cli("events")
            .args(["--json", "--follow", "--last", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map(Follower)
            .expect("enforcer events --follow");
        let mut first = String::new();
        let _ = BufReader::new(f.0.stdout.take().expect("stdout")).read_line(&mut first);
        first.contains("\"verdict\"")
    };
    for i in 0..20 {
        let served = (0..10).any(|_| {
            follow_once() || {
                std::thread::sleep(Duration::from_millis(50));
                false
            }
        });
        assert!(served, "follower {i} was turned away\n{}", agent.log());
    }

    // The readable form names the workload and the verdict.
    let out = agent
        .cli("events")
        .args(["--pod", &netns])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "shop/{netns} -> 198.51.100.11:8080 tcp DENIED no_rule tc"
        )),
        "{text}"
    );
    drop(pod);
}
