//! Escaping the cgroup (issue 11, class 5): a local workload that makes a child cgroup and
//! moves into it is still its namespace's, from its first connection; `enforcer exec --user`
//! runs a workload without root, still enforced.

use std::{
    path::PathBuf,
    process::Output,
    time::{Duration, Instant},
};

use crate::harness::{registry_only, start_with_pods, Agent, Hosts, World, ENFORCER};

const ALLOWED: &str = "198.51.100.10";
const REFUSED: &str = "203.0.113.30";
const PORT: u16 = 80;
/// Connections to each host; the loop also stops after two seconds.
const TRIES: u32 = 50;

const POLICY: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: allowed, namespace: default}
spec: {hosts: [allowed.example.com], addresses: [198.51.100.10], ports: [{number: 80, name: http, protocol: TCP}], resolution: STATIC}
"#;

/// Finds its own cgroup (the cgroup2 mount from mountinfo, never a fixed path), makes the child
/// `argv[1]` there, moves into it, and at once connects to `argv[2]` and `argv[3]` on port
/// `argv[4]`, `argv[5]` times each within two seconds. Prints the child's path, then a count
/// of outcomes per host: `refused ok=N eperm=N other=N`, `allowed ...`.
const ESCAPE: &str = r#"
import errno, os, socket, sys, time

def cgroup2():
    for line in open("/proc/self/mountinfo"):
        left, right = line.split(" - ", 1)
        if right.split()[0] == "cgroup2":
            return left.split()[4]
    sys.exit("no cgroup2 mount")

def own():
    for line in open("/proc/self/cgroup"):
        if line.startswith("0::"):
            return line[3:].strip()
    sys.exit("no cgroup v2 line in /proc/self/cgroup")

def connect(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect((host, port))
        return "ok"
    except PermissionError:
        return "eperm"
    except OSError as e:
        errors.add(f"{host}: {e}")
        return "other"
    finally:
        s.close()

errors = set()
name, refused, allowed, port, tries = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
child = os.path.join(cgroup2(), own().lstrip("/"), name)
os.mkdir(child)
with open(os.path.join(child, "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
print("in", own(), flush=True)
counts = {"refused": {"ok": 0, "eperm": 0, "other": 0}, "allowed": {"ok": 0, "eperm": 0, "other": 0}}
deadline = time.monotonic() + 2
for _ in range(tries):
    if time.monotonic() > deadline:
        break
    counts["refused"][connect(refused, port)] += 1
    counts["allowed"][connect(allowed, port)] += 1
for which, c in counts.items():
    print(which, " ".join(f"{k}={v}" for k, v in c.items()))
print("errors:", sorted(errors))
"#;

/// The test's child cgroup, removed (with whatever runs there) however the test ends.
struct ChildCgroup(PathBuf);

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        enforcer_testkit::cgroups::remove_tree(&self.0);
    }
}

fn start(world: &World) -> Agent {
    world.write_policy("allowed.yaml", POLICY);
    let mesh = registry_only(world);
    Agent::start(world, &["--mesh-config", &mesh, "--namespace", "default"])
}

/// The count of `key` on the script's line for `which` (`refused` or `allowed`).
fn count(stdout: &str, which: &str, key: &str) -> u32 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(which)?.strip_prefix(' '))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        })
        .unwrap_or(0)
}

/// How many TCP connections the test hosts accepted on `dst:PORT`, by their own log.
fn arrivals(hosts: &Hosts, dst: &str) -> usize {
    let prefix = format!("tcp {dst}:{PORT} from ");
    hosts
        .received()
        .iter()
        .filter(|l| l.starts_with(&prefix))
        .count()
}

/// Waits (bounded) until the hosts logged `want` arrivals at `dst`: their log is written by the
/// handler thread, a moment after the client's connect returned.
fn settle(hosts: &Hosts, dst: &str, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while arrivals(hosts, dst) < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_child_cgroup_is_enforced_from_its_first_connection() {
    let world = World::new("escape");
    let hosts = Hosts::new(&world);
    let agent = start(&world);
    let name = format!("escape-{}", world.id);
    let root = enforcer_user::cgroup::cgroup2_mount().expect("cgroup2 mount");
    let _child = ChildCgroup(root.join(&agent.cgroup_parent).join("default").join(&name));

    let out = agent
        .exec("default", None)
        .arg(enforcer_testkit::python())
        .args(["-c", ESCAPE, &name, REFUSED, ALLOWED])
        .args([PORT.to_string(), TRIES.to_string()])
        .output()
        .expect("running enforcer exec");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let report = format!(
        "{}\n--- hosts received ---\n{:?}\n--- agent log ---\n{}",
        text(&out),
        hosts.received(),
        agent.log()
    );
    eprintln!("{stdout}");
    assert!(out.status.success(), "{report}");
    assert!(
        stdout.contains(&format!("/default/{name}")),
        "the script moved into its child: {report}"
    );

    // The receiving hosts' own log, not the script's view, says what got through.
    let allowed = count(&stdout, "allowed", "ok");
    settle(&hosts, ALLOWED, allowed as usize);
    let leaked = arrivals(&hosts, REFUSED);
    assert_eq!(leaked, 0, "connections reached the refused host: {report}");
    // A shared machine can make some tries time out; enough must have run to mean something.
    assert!(allowed >= 5, "too few tries ran: {report}");
    assert_eq!(count(&stdout, "refused", "ok"), 0, "{report}");
    assert!(count(&stdout, "refused", "eperm") >= 5, "{report}");
    assert!(
        hosts.reached(ALLOWED, PORT, "198.51.100.1"),
        "the allowed host got nothing: {report}"
    );
    assert!(arrivals(&hosts, ALLOWED) >= allowed as usize, "{report}");

    let denials = agent.denials();
    assert!(
        denials
            .iter()
            .any(|d| d["dst"] == REFUSED && d["port"] == PORT && d["namespace"] == "default"),
        "no refusal record names {REFUSED}: {denials:?}"
    );
}

/// `id -u`, the effective capabilities, whether a child cgroup can be made, then a probe.
const AS_USER: &str = r#"
id -u
grep '^CapEff:' /proc/self/status
mount=$(awk -F ' - ' '{ split($1, a, " "); split($2, b, " ") } b[1] == "cgroup2" { print a[5]; exit }' /proc/self/mountinfo)
cg="$mount$(sed -n 's/^0:://p' /proc/self/cgroup)"
if mkdir "$cg/escape-as-user" 2>/dev/null; then echo "mkdir ok"; rmdir "$cg/escape-as-user"; else echo "mkdir refused"; fi
exec "$0" "$@"
"#;

#[test]
fn exec_user_runs_the_workload_unprivileged_and_enforced() {
    let world = World::new("asuser");
    let hosts = Hosts::new(&world);
    let agent = start(&world);
    let with_user = |user: &str, host: &str| {
        let mut cmd = std::process::Command::new(ENFORCER);
        cmd.args(["exec", "--namespace", "default", "--user", user])
            .args(["--bpffs-root", &agent.pin_root])
            .args(["--cgroup-parent", &agent.cgroup_parent])
            .args(["--", "sh", "-c", AS_USER, enforcer_testkit::python()])
            .arg(enforcer_testkit::script("probe.py"))
            .args(["tcp-connect", host, &PORT.to_string()]);
        cmd.output().expect("running enforcer exec")
    };

    for user in ["nobody", "65534"] {
        let refused = with_user(user, REFUSED);
        let allowed = with_user(user, ALLOWED);
        let report = format!(
            "--- refused ---\n{}\n--- allowed ---\n{}\n--- agent log ---\n{}",
            text(&refused),
            text(&allowed),
            agent.log()
        );
        for out in [&refused, &allowed] {
            let stdout = String::from_utf8_lossy(&out.stdout);
            let mut lines = stdout.lines();
            assert_eq!(lines.next(), Some("65534"), "runs as nobody: {report}");
            assert_eq!(
                lines.next(),
                Some("CapEff:\t0000000000000000"),
                "no capabilities: {report}"
            );
            assert_eq!(
                lines.next(),
                Some("mkdir refused"),
                "cannot make a child cgroup: {report}"
            );
        }
        // probe.py's line comes last.
        let last = |out: &Output| {
            let stdout = String::from_utf8_lossy(&out.stdout);
            stdout.lines().last().unwrap_or_default().to_string()
        };
        assert_eq!(last(&refused), "EPERM", "{report}");
        assert!(last(&allowed).starts_with("ok"), "{report}");
    }
    settle(&hosts, ALLOWED, 2);
    assert_eq!(arrivals(&hosts, REFUSED), 0, "{:?}", hosts.received());
    assert!(
        hosts.reached(ALLOWED, PORT, "198.51.100.1"),
        "{:?}",
        hosts.received()
    );
    assert!(
        agent
            .denials()
            .iter()
            .any(|d| d["dst"] == REFUSED && d["namespace"] == "default"),
        "{:?}",
        agent.denials()
    );
}

#[test]
fn exec_user_in_a_pod_joins_its_netns_unprivileged() {
    const POD_CIDR: &str = "203.0.113.192/26";
    let world = World::new("podusr");
    let hosts = Hosts::new(&world);
    let default = ["--namespace", "default"];
    let policy = ("allowed.yaml", POLICY);
    let agent = start_with_pods(&world, &hosts, policy, &[POD_CIDR], &default);
    let netns = world.netns("enfpod");
    let run = |host: &str| {
        let mut cmd = std::process::Command::new(ENFORCER);
        cmd.args(["exec", "--namespace", "default", "--user", "nobody"])
            .args(["--netns", &netns])
            .args(["--bpffs-root", &agent.pin_root])
            .args(["--cgroup-parent", &agent.cgroup_parent])
            .args(["--", "sh", "-c", "id -u; exec \"$0\" \"$@\""])
            .arg(enforcer_testkit::python())
            .arg(enforcer_testkit::script("probe.py"))
            .args(["tcp-connect", host, &PORT.to_string()]);
        cmd.output().expect("running enforcer exec --netns")
    };
    let refused = run(REFUSED);
    let allowed = run(ALLOWED);
    let report = format!(
        "--- refused ---\n{}\n--- allowed ---\n{}\n--- hosts ---\n{:?}\n--- agent log ---\n{}",
        text(&refused),
        text(&allowed),
        hosts.received(),
        agent.log()
    );
    for out in [&refused, &allowed] {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(stdout.lines().next(), Some("65534"), "{report}");
    }
    assert!(
        String::from_utf8_lossy(&refused.stdout).contains("EPERM"),
        "{report}"
    );
    assert!(
        String::from_utf8_lossy(&allowed.stdout).contains("ok"),
        "{report}"
    );
    settle(&hosts, ALLOWED, 1);
    // The connection came from the pod's address: the workload joined the pod's netns.
    let from_pod = hosts.received().iter().any(|l| {
        l.strip_prefix(&format!("tcp {ALLOWED}:{PORT} from 203.0.113."))
            .and_then(|octet| octet.parse::<u8>().ok())
            .is_some_and(|o| o >= 192)
    });
    assert!(from_pod, "{report}");
    assert_eq!(arrivals(&hosts, REFUSED), 0, "{report}");
}
