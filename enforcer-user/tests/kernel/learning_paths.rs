//! DNS learning by every path a resolver takes (CNAME chains, AAAA, truncation to TCP, glibc
//! with a search list), what must never teach anything (forged answers, addresses a name must
//! not point at), and the agent's death, expiry without it, and a planned restart.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use enforcer_testkit::{python, script};

use crate::{
    harness::{Hosts, Want, World},
    learning::{
        count, resolve, resolve_at, start_agent, udp_lookups, Upstream, DNS, NODE_LOCAL, ZONES,
    },
};

/// Probes `dst:port` over TCP as a workload of `default`.
fn probe(agent: &crate::harness::Agent, dst: &str, port: u16) -> crate::harness::Outcome {
    agent.probe("default", "tcp", dst, port)
}

#[test]
fn cname_chains_aaaa_truncation_and_search_lists_teach_the_name_asked() {
    let world = World::new("paths");
    let hosts = Hosts::new(&world);
    let upstream = Upstream::start(&world, &hosts, ZONES);
    let agent = start_agent(&world, &[]);

    // alias.example.test (port 80) is a CNAME to a rotating CDN name: its addresses are the
    // alias's, on the alias's port.
    let alias = udp_lookups(
        &agent,
        &[
            "--name",
            "alias.example.test",
            "--count",
            "20",
            "--connect-port",
            "80",
        ],
    );
    assert_eq!(count(&alias, "ok"), 20, "{alias}");
    // The chain's target is not declared: its fresh addresses stay refused.
    let target = udp_lookups(
        &agent,
        &[
            "--name",
            "edge.cdn.test",
            "--count",
            "5",
            "--connect-port",
            "80",
        ],
    );
    assert_eq!(count(&target, "eperm"), 5, "{target}");

    // AAAA answers open IPv6 addresses.
    let v6 = udp_lookups(
        &agent,
        &[
            "--family",
            "6",
            "--pattern",
            "v{i}.example.test",
            "--count",
            "50",
        ],
    );
    assert_eq!(count(&v6, "ok"), 50, "{v6}");
    assert!(hosts
        .received()
        .iter()
        .any(|l| l.starts_with("tcp 2001:db8:1::")));

    // A truncated answer over UDP, then the full one over TCP: both through the proxy.
    let big = resolve(
        &agent,
        "default",
        None,
        &[
            "--mode",
            "udp-unconnected",
            "--pattern",
            "t{i}.big.example.test",
            "--count",
            "20",
        ],
    );
    assert_eq!(count(&big, "ok"), 20, "{big}");
    let queries = upstream.queries();
    assert!(
        queries
            .iter()
            .any(|q| q.starts_with("query tcp t3.big.example.test A")),
        "{queries:?}"
    );

    // glibc's own stub, with a search list: the expanded name is what was asked and learned.
    let glibc = resolve(
        &agent,
        "default",
        None,
        &[
            "--mode",
            "glibc",
            "--private-resolv",
            "--search",
            "example.test",
            "--ndots",
            "2",
            "--pattern",
            "s{i}",
            "--count",
            "30",
        ],
    );
    assert_eq!(count(&glibc, "ok"), 30, "{glibc}");

    // A partial wildcard, `*shop.test`, covers any name ending in it, `shop.test` included
    // (Istio's validation only warns about it).
    for name in ["myshop.test", "shop.test"] {
        let got = udp_lookups(
            &agent,
            &["--name", name, "--count", "5", "--connect-port", "8080"],
        );
        assert_eq!(count(&got, "ok"), 5, "{name}: {got}");
    }

    // A name under the wildcard that points at the metadata service teaches nothing.
    let meta = udp_lookups(
        &agent,
        &[
            "--name",
            "meta.example.test",
            "--count",
            "1",
            "--connect-timeout",
            "1",
        ],
    );
    assert_eq!(count(&meta, "eperm"), 1, "{meta}");
}

#[test]
fn forged_answers_teach_nothing() {
    let world = World::new("forge");
    let hosts = Hosts::new(&world);
    let _upstream = Upstream::start(&world, &hosts, ZONES);
    let agent = start_agent(&world, &[]);

    // A server of the workload's own on a loopback port 53 answers what it likes: the agent
    // proxies only the servers it trusts, so nothing is learned.
    let ready = world.dir.join("forger-ready");
    let mut forger = Command::new(python())
        .arg(script("dns_server.py"))
        .args([
            "--listen",
            "127.0.0.54:53",
            "--static",
            "forged.example.test=198.51.100.77",
        ])
        .arg("--ready")
        .arg(&ready)
        .stdout(Stdio::null())
        .spawn()
        .expect("starting the forging server");
    let start = Instant::now();
    while !ready.exists() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let got = resolve_at(
        &agent,
        "default",
        None,
        "127.0.0.54",
        &[
            "--mode",
            "udp-connected",
            "--name",
            "forged.example.test",
            "--count",
            "3",
        ],
    );
    let _ = forger.kill();
    let _ = forger.wait();
    assert_eq!(count(&got, "eperm"), 3, "{got}");
    assert!(!hosts
        .received()
        .iter()
        .any(|l| l.starts_with("tcp 198.51.100.77")));

    // Sending an "answer" straight to the proxy is refused by the socket hooks, whichever slot
    // it names.
    for slot in ["169.254.53.1", "169.254.53.2"] {
        let host = probe(&agent, slot, 10053);
        assert!(Want::Denied.matches(&host), "{slot}: {host:?}");
    }
    // The address the forger named was never allowed.
    assert!(Want::Denied.matches(&probe(&agent, "198.51.100.77", 443)));
    let status = agent.status();
    assert_eq!(
        status["dns_learning"]["learned_keys"], 0,
        "{}",
        status["dns_learning"]
    );
}

/// Starts `n` copies of `resolve.py` at once as workloads of `default`.
fn clients(agent: &crate::harness::Agent, n: usize, args: &[&str]) -> Vec<std::process::Child> {
    (0..n)
        .map(|_| {
            agent
                .exec("default", None)
                .arg(python())
                .arg(script("resolve.py"))
                .args(["--server", DNS, "--json"])
                .args(args)
                .stdout(Stdio::piped())
                .spawn()
                .expect("resolve.py")
        })
        .collect()
}

/// Their results.
fn results(children: Vec<std::process::Child>) -> Vec<serde_json::Value> {
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().expect("resolve.py");
            serde_json::from_slice(&out.stdout).expect("resolve.py's result")
        })
        .collect()
}

#[test]
fn a_killed_agent_leaves_dns_working_and_what_it_learned_expires_without_it() {
    let world = World::new("killdns");
    let hosts = Hosts::new(&world);
    let _upstream = Upstream::start(&world, &hosts, ZONES);
    let mut agent = start_agent(&world, &["--dns-min-ttl", "1", "--dns-grace", "2"]);

    // Learned before the crash: an address, and a connection to it that stays open.
    let fixed = udp_lookups(&agent, &["--name", "fixed.example.test", "--count", "1"]);
    assert_eq!(count(&fixed, "ok"), 1, "{fixed}");
    let stream = agent
        .exec("default", None)
        .arg(python())
        .arg(script("stream.py"))
        .args(["198.51.100.70", "443", "6"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("stream.py");

    // Four clients resolve in a loop (glibc, one second timeout, two attempts) while the agent
    // is killed.
    let args = [
        "--mode",
        "glibc",
        "--private-resolv",
        "--pattern",
        "k{i}.example.test",
        "--count",
        "1500",
        "--no-connect",
    ];
    let running = clients(&agent, 4, &args);
    std::thread::sleep(Duration::from_millis(300));
    agent.kill();
    let results = results(running);
    let failed: u64 = results
        .iter()
        .map(|r| r["iterations"].as_u64().unwrap_or(0) - count(r, "ok"))
        .sum();
    eprintln!("lookups failed across the kill: {failed} of 6000; {results:?}");
    // A query the agent had read when it died is lost; its client's retry goes direct.
    assert!(failed <= 4, "{results:?}");

    // Down: names still resolve (directly), but nothing new is learned.
    let down = udp_lookups(
        &agent,
        &["--pattern", "d{i}.fresh.example.test", "--count", "10"],
    );
    assert_eq!(count(&down, "eperm"), 10, "{down}");
    // TTL 1 s + grace 2 s: the kernel refuses the learned address although no agent runs;
    // the connection opened while it was valid goes on.
    std::thread::sleep(Duration::from_secs(4));
    assert!(Want::Denied.matches(&probe(&agent, "198.51.100.70", 443)));
    let out = stream.wait_with_output().expect("stream.py");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("stalled"), "{text}");

    // Back: learning resumes.
    agent.respawn();
    let back = udp_lookups(
        &agent,
        &["--pattern", "b{i}.fresh.example.test", "--count", "10"],
    );
    assert_eq!(count(&back, "ok"), 10, "{back}");
}

#[test]
fn a_planned_restart_loses_no_query() {
    let world = World::new("restartdns");
    let hosts = Hosts::new(&world);
    let _upstream = Upstream::start(&world, &hosts, ZONES);
    let mut agent = start_agent(&world, &[]);
    let args = [
        "--mode",
        "glibc",
        "--private-resolv",
        "--pattern",
        "p{i}.example.test",
        "--count",
        "2000",
        "--no-connect",
    ];
    let running = clients(&agent, 4, &args);
    std::thread::sleep(Duration::from_millis(300));
    agent.restart();
    let results = results(running);
    for r in &results {
        assert_eq!(count(r, "ok"), 2000, "{r}");
    }
    let after = udp_lookups(&agent, &["--pattern", "a{i}.example.test", "--count", "10"]);
    assert_eq!(count(&after, "ok"), 10, "{after}");
}

#[test]
fn dns_allow_learned_stops_the_agents_own_lookups_of_hosts() {
    let world = World::new("learnonly");
    let hosts = Hosts::new(&world);
    let _upstream = Upstream::start(&world, &hosts, ZONES);
    let server = format!("{DNS}:53");
    let resolved = |agent: &crate::harness::Agent| {
        let status = agent.status();
        status["dns"].to_string().contains("alias.example.test")
    };
    // Both (the default): the agent resolves the exact host itself as well.
    let agent = start_agent(&world, &["--dns-server", &server]);
    agent.wait_for(Duration::from_secs(5), "the agent's own answer", || {
        resolved(&agent)
    });
    drop(agent);
    // Learned only: it does not; the workload's own answer still allows the address.
    let agent = start_agent(&world, &["--dns-server", &server, "--dns-allow", "learned"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!resolved(&agent), "{}", agent.status()["dns"]);
    let got = udp_lookups(
        &agent,
        &[
            "--name",
            "alias.example.test",
            "--count",
            "5",
            "--connect-port",
            "80",
        ],
    );
    assert_eq!(count(&got, "ok"), 5, "{got}");
}

#[test]
fn an_answer_that_cannot_be_written_is_servfail_never_a_refused_address() {
    let world = World::new("learnfull");
    let hosts = Hosts::new(&world);
    let _upstream = Upstream::start(&world, &hosts, ZONES);
    // Three learned keys at most: the fourth fresh address cannot go in.
    let agent = start_agent(&world, &["--dns-max-learned-per-scope", "3"]);
    let got = udp_lookups(
        &agent,
        &["--pattern", "f{i}.fresh.example.test", "--count", "6"],
    );
    assert_eq!(count(&got, "ok"), 3, "{got}");
    assert_eq!(count(&got, "resolve_failed"), 3, "{got}");
    assert_eq!(count(&got, "eperm"), 0, "{got}");
    agent.wait_for(Duration::from_secs(3), "the failure in the status", || {
        agent.status()["dns_learning"]["learn_failures"]["scope_full"].as_u64() >= Some(3)
    });
}

/// Binds UDP `bind`, then sends `spoof` to 127.0.0.1:`port` from `source` (`IP_PKTINFO`,
/// option 8; no privilege needed for a local address) and `plain` from no chosen source;
/// prints `bind=...` and `send=...` (ok or the errno).
const SPOOF: &str = r#"
import errno, socket, struct, sys
bind, source, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
def attempt(f):
    try:
        f()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
print("bind=" + attempt(lambda: s.bind((bind, 10053))))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
info = struct.pack("i4s4s", 0, socket.inet_aton(source), b"\0" * 4)
print("send=" + attempt(lambda: u.sendmsg([b"spoof"], [(socket.IPPROTO_IP, 8, info)], 0, ("127.0.0.1", port))))
u.sendto(b"plain", ("127.0.0.1", port))
"#;

/// Runs [`SPOOF`] through `cmd` towards a socket of this test, the receiving side: what the
/// script printed, and the datagrams that arrived (payload and source), until `plain` did.
fn spoof(cmd: &mut Command, bind: &str, source: &str) -> (String, Vec<(String, String)>) {
    let victim = std::net::UdpSocket::bind("127.0.0.1:0").expect("a receiving socket");
    victim
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("a timeout");
    let port = victim.local_addr().expect("its port").port().to_string();
    let out = cmd
        .args(["-c", SPOOF, bind, source, &port])
        .output()
        .expect("python");
    let mut got = Vec::new();
    let mut buf = [0u8; 16];
    while let Ok((n, from)) = victim.recv_from(&mut buf) {
        let payload = String::from_utf8_lossy(&buf[..n]).into_owned();
        got.push((payload.clone(), from.ip().to_string()));
        if payload == "plain" {
            break;
        }
    }
    (String::from_utf8_lossy(&out.stdout).into_owned(), got)
}

#[test]
fn only_the_agent_may_bind_or_send_from_the_proxys_addresses() {
    let world = World::new("proxyaddr");
    let hosts = Hosts::new(&world);
    let _upstream = Upstream::start(&world, &hosts, ZONES);
    let agent = start_agent(&world, &[]);
    let refused = (
        "bind=EPERM\nsend=EPERM\n".to_string(),
        vec![("plain".to_string(), "127.0.0.1".to_string())],
    );
    // An enforced workload, and a process in a cgroup no scope claims: the receiver gets the
    // plain datagram only, never one from the proxy's address.
    let workload = spoof(
        agent.exec("default", None).arg(python()),
        "169.254.53.200",
        "169.254.53.1",
    );
    assert_eq!(workload, refused);
    let outside = enforcer_user::cgroup::cgroup2_mount()
        .expect("cgroup2")
        .join(format!("enforcer-test-{}-outside", world.id));
    std::fs::create_dir_all(&outside).expect("a cgroup");
    let got = spoof(
        &mut enforcer_testkit::cgroups::in_cgroup(&outside, python()),
        "169.254.53.200",
        "169.254.53.1",
    );
    let _ = std::fs::remove_dir(&outside);
    assert_eq!(got, refused);
    // The same calls with a loopback address pass: only the proxy's prefix is guarded.
    let fine = spoof(
        agent.exec("default", None).arg(python()),
        "127.0.0.1",
        "127.0.0.1",
    );
    let both = vec![
        ("spoof".to_string(), "127.0.0.1".to_string()),
        ("plain".to_string(), "127.0.0.1".to_string()),
    ];
    assert_eq!(fine, ("bind=ok\nsend=ok\n".to_string(), both));
    // And learning still works: the agent's own sockets are there.
    let got = udp_lookups(&agent, &["--pattern", "g{i}.example.test", "--count", "5"]);
    assert_eq!(count(&got, "ok"), 5, "{got}");
}

#[test]
fn a_node_local_dns_cache_is_one_more_upstream() {
    let world = World::new("nodelocal");
    let hosts = Hosts::new(&world);
    let upstream = Upstream::start(&world, &hosts, ZONES);
    let cidr = format!("{NODE_LOCAL}/32");
    let agent = start_agent(
        &world,
        &["--dns-upstream", NODE_LOCAL, "--allow-cidr", &cidr],
    );
    let got = resolve_at(
        &agent,
        "default",
        None,
        NODE_LOCAL,
        &[
            "--mode",
            "udp-connected",
            "--pattern",
            "n{i}.example.test",
            "--count",
            "20",
        ],
    );
    assert_eq!(count(&got, "ok"), 20, "{got}");
    // The agent asked the node-local address on the workload's behalf.
    let asked = upstream
        .queries()
        .iter()
        .filter(|q| q.contains(".example.test A") && q.starts_with("query udp n"))
        .count();
    assert_eq!(asked, 20);
    let slots = agent.status()["dns_learning"]["upstreams"].to_string();
    assert!(slots.contains(NODE_LOCAL), "{slots}");
}
