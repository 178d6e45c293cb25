//! `cargo xtask image-test`: the image of `cargo xtask image`, run as the DaemonSet runs it,
//! read from `deploy/agent/daemonset.yaml` so that the two cannot drift: its capabilities,
//! seccomp and AppArmor, host network, read-only root, memory limit, mounts, environment and
//! arguments. It runs in Kubernetes mode against the testkit's API server, on this host's
//! kernel, and must load, attach, pin and enforce on a pod's cgroup: an allowed connect
//! reaches the test host, a refused one fails with EPERM and never arrives, and the record
//! names the pod. Then each capability is removed in turn: every one the DaemonSet lists must
//! be needed.
//!
//! What the test adds, and why: `KUBECONFIG` (a mounted file: the API server is the
//! testkit's), `--kubelet-cgroups` (a kubelet tree of its own), and host paths moved aside so
//! that an agent already on this host is not touched (the bpffs directory).

mod spec;
mod world;

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::{
    image::{podman, TAG, ULIMITS},
    sh,
};
use spec::{Source, Spec};
use world::World;

/// How long a variant may take to become healthy before it counts as not starting.
const START_WITHIN: Duration = Duration::from_secs(30);

/// What one run of the container showed.
struct Outcome {
    /// Seconds to the first apply, if there was one.
    healthy: Option<f64>,
    /// Its programs pinned in the host's bpffs, where the next agent finds them.
    pinned: bool,
    allowed: bool,
    refused: bool,
    named: bool,
    /// `enforcer explain --pod` and `enforcer events` in the container, over its control
    /// socket, as an operator runs them with `kubectl exec`.
    asked: bool,
    /// The agent's last error line, when it did not start.
    error: String,
}

impl Outcome {
    fn enforces(&self) -> bool {
        self.healthy.is_some()
            && self.pinned
            && self.allowed
            && self.refused
            && self.named
            && self.asked
    }
}

pub fn run() -> anyhow::Result<()> {
    let root = sh::root();
    let exists = podman()
        .args(["image", "exists", TAG])
        .status()
        .is_ok_and(|s| s.success());
    if !exists {
        bail!("no image {TAG}: run `cargo xtask image` first");
    }
    let spec = Spec::read(&root.join("deploy/agent/daemonset.yaml"))?;
    let world = World::new()?;
    let mut rows = Vec::new();
    let full = variant(&spec, &world, "daemonset", None)?;
    let enforced = full.enforces();
    rows.push(("daemonset".to_string(), full));
    // The runtime's default profile with bpf() and perf_event_open() allowed without
    // SYS_ADMIN, in place of Unconfined: what a Localhost profile could give.
    if spec.seccomp_unconfined {
        let profile = world.seccomp_profile()?;
        let outcome = variant_with(&spec, &world, "seccomp: default+bpf", None, Some(&profile))?;
        rows.push(("seccomp: default+bpf".to_string(), outcome));
    }
    let mut not_needed = Vec::new();
    for cap in &spec.caps_add {
        let name = format!("without {cap}");
        let outcome = variant(&spec, &world, &name, Some(cap))?;
        if outcome.enforces() {
            not_needed.push(cap.clone());
        }
        rows.push((name, outcome));
    }
    println!("\nthe image {TAG} as deploy/agent/daemonset.yaml runs it, on this kernel:");
    println!(
        "  {:<24} {:>8} {:>7} {:>8} {:>8} {:>7} {:>6}  last error",
        "variant", "healthy", "pinned", "allowed", "refused", "record", "asked"
    );
    for (name, o) in &rows {
        let yes = |b: bool| if b { "yes" } else { "-" };
        println!(
            "  {name:<24} {:>8} {:>7} {:>8} {:>8} {:>7} {:>6}  {}",
            o.healthy.map_or("no".to_string(), |s| format!("{s:.1}s")),
            yes(o.pinned),
            yes(o.allowed),
            yes(o.refused),
            yes(o.named),
            yes(o.asked),
            o.error
        );
    }
    if !enforced {
        bail!("the image does not enforce with the DaemonSet's own settings (above)");
    }
    if !not_needed.is_empty() {
        bail!(
            "the DaemonSet adds {} but the agent enforces without: drop them",
            not_needed.join(", ")
        );
    }
    println!("every capability the DaemonSet adds is needed");
    Ok(())
}

/// Runs the container (without `drop`, if given), checks it, and removes it and its pins.
fn variant(spec: &Spec, world: &World, name: &str, drop: Option<&str>) -> anyhow::Result<Outcome> {
    variant_with(spec, world, name, drop, None)
}

/// [`variant`], with a seccomp profile in place of the DaemonSet's, if given.
fn variant_with(
    spec: &Spec,
    world: &World,
    name: &str,
    drop: Option<&str>,
    seccomp: Option<&std::path::Path>,
) -> anyhow::Result<Outcome> {
    eprintln!("image-test: {name}");
    world.reset()?;
    let container = format!("enforcer-image-test-{}", std::process::id());
    let mut run = podman();
    run.args(["run", "-d", "--replace", "--name", &container]);
    run.args(ULIMITS);
    let mut flags = flags(spec, world, drop)?;
    if let Some(profile) = seccomp {
        let at = flags.iter().position(|f| f == "seccomp=unconfined");
        if let Some(at) = at {
            flags[at] = format!("seccomp={}", profile.display());
        }
    }
    run.args(flags);
    run.arg(TAG).args(&spec.args).args(world.extra_args());
    if let Err(err) = sh::run(&mut run) {
        // A container that failed to start is still there.
        let _ = podman().args(["rm", "-f", &container]).output();
        return Err(err).context("podman run");
    }
    let outcome = observe(world, &container);
    let logs = podman()
        .args(["logs", &container])
        .output()
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_default();
    let _ = podman().args(["rm", "-f", "-t", "2", &container]).output();
    world.keep_log(name, &logs);
    world.teardown_pins(spec)?;
    let mut outcome = outcome;
    outcome.named = logs
        .lines()
        .any(|l| l.contains("\"pod\":\"web\"") && l.contains(world::REFUSED));
    if outcome.healthy.is_none() {
        outcome.error = why_not(&logs);
    }
    Ok(outcome)
}

/// The agent's own word for why it stopped (`enforcer: ...`), and the verifier's line where
/// it refused a program.
fn why_not(logs: &str) -> String {
    let short = |l: &str| l.chars().take(110).collect::<String>();
    let stopped = logs
        .lines()
        .find(|l| l.starts_with("enforcer: "))
        .map_or_else(|| "(no error logged)".to_string(), short);
    match logs.lines().find(|l| l.contains("prohibited for !root")) {
        Some(verifier) => format!("{stopped} ... verifier: {}", short(verifier)),
        None => stopped,
    }
}

/// podman's flags for the DaemonSet's pod settings.
fn flags(spec: &Spec, world: &World, drop: Option<&str>) -> anyhow::Result<Vec<String>> {
    let mut f: Vec<String> = Vec::new();
    if spec.host_network {
        f.extend(["--network".into(), "host".into()]);
    }
    if spec.privileged {
        f.push("--privileged".into());
    }
    if spec.drop_all {
        f.extend(["--cap-drop".into(), "all".into()]);
    }
    for cap in spec.caps_add.iter().filter(|c| Some(c.as_str()) != drop) {
        f.extend(["--cap-add".into(), cap.clone()]);
    }
    if spec.seccomp_unconfined {
        f.extend(["--security-opt".into(), "seccomp=unconfined".into()]);
    }
    if spec.apparmor_unconfined {
        f.extend(["--security-opt".into(), "apparmor=unconfined".into()]);
    }
    if spec.no_new_privileges {
        f.extend(["--security-opt".into(), "no-new-privileges".into()]);
    }
    if spec.read_only_root {
        // Kubernetes mounts no tmpfs on /tmp either.
        f.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
    }
    if let Some(memory) = spec.podman_memory() {
        f.extend(["--memory".into(), memory]);
    }
    for m in &spec.mounts {
        let host = match &m.source {
            Source::HostPath(path) => world.host_path(path)?,
            Source::EmptyDir => world.empty_dir(&m.name)?,
        };
        let mut options = vec![if m.read_only { "ro" } else { "rw" }.to_string()];
        if let Some(p) = m.propagation.as_deref() {
            options.push(match p {
                "HostToContainer" => "rslave".to_string(),
                "Bidirectional" => "rshared".to_string(),
                _ => "rprivate".to_string(),
            });
        }
        f.extend([
            "-v".into(),
            format!(
                "{}:{}:{}",
                host.display(),
                m.path.display(),
                options.join(",")
            ),
        ]);
    }
    for (name, value) in spec.environment(|field| world.field(field)) {
        f.extend(["-e".into(), format!("{name}={value}")]);
    }
    f.extend(world.extra_flags());
    Ok(f)
}

/// Waits for the first apply, then probes from the pod's cgroup.
fn observe(world: &World, container: &str) -> Outcome {
    let started = Instant::now();
    let mut outcome = Outcome {
        healthy: None,
        pinned: false,
        allowed: false,
        refused: false,
        named: false,
        asked: false,
        error: String::new(),
    };
    while started.elapsed() < START_WITHIN {
        if world.applied() {
            outcome.healthy = Some(started.elapsed().as_secs_f64());
            break;
        }
        if !running(container) {
            return outcome;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if outcome.healthy.is_none() {
        return outcome;
    }
    outcome.pinned = world.pinned();
    // The pod is mapped from the first apply on, or the next one (a second).
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !(outcome.allowed && outcome.refused) {
        outcome.allowed = world.probe(world::ALLOWED) == Some(0);
        outcome.refused = world.probe(world::REFUSED) == Some(1);
        std::thread::sleep(Duration::from_millis(200));
    }
    // At the test host: the allowed destination arrived, the refused one never did.
    outcome.allowed &= world.reached(world::ALLOWED);
    outcome.refused &= !world.reached(world::REFUSED);
    // Records are printed as they come: give the last one a moment.
    std::thread::sleep(Duration::from_millis(300));
    outcome.asked = ask_in(container);
    outcome
}

/// The agent's own commands in its container: explain answers from the live policy by pod,
/// and events names the pod's refusal.
fn ask_in(container: &str) -> bool {
    let exec = |args: &[&str]| {
        podman()
            .args(["exec", container, "enforcer"])
            .args(args)
            .output()
            .ok()
    };
    let explained = exec(&[
        "explain",
        "-n",
        "shop",
        "--pod",
        "web",
        &format!("{}:80", world::ALLOWED),
    ])
    .is_some_and(|o| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("ServiceEntry shop/api")
    });
    let events = exec(&[
        "events", "-n", "shop", "--pod", "web", "--json", "--last", "20",
    ])
    .is_some_and(|o| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains(world::REFUSED)
    });
    explained && events
}

fn running(container: &str) -> bool {
    podman()
        .args(["inspect", "-f", "{{.State.Running}}", container])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "true")
}
