use std::{
    collections::BTreeMap,
    os::unix::process::CommandExt as _,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::Args;

use super::{user, Placement};
use crate::{cgroup, datapath};

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Namespace whose cgroup the command runs in; created when needed.
    #[arg(long, short = 'n', value_name = "NS")]
    namespace: String,
    /// A workload label, which Sidecar workloadSelectors match (`app=db`, or `a=1,b=2`).
    /// Repeatable.
    #[arg(long = "label", short = 'l', value_name = "KEY=VALUE", value_parser = cgroup::parse_labels)]
    labels: Vec<BTreeMap<String, String>>,
    /// How long to wait for the agent to claim a new namespace cgroup, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    wait_ms: u64,
    /// Run in a network namespace of this name that the agent creates and joins to the host by
    /// a veth with the TC program on it (a local "pod"); it is removed when CMD exits.
    #[arg(long, value_name = "NAME")]
    netns: Option<String>,
    /// Run CMD as this user (a name or a numeric uid), with its primary group only and no
    /// capabilities, after joining the cgroup (and --netns). Without it CMD runs as the caller;
    /// a root workload can leave its cgroup, so this is what makes a local workload enforced
    /// for good.
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    #[command(flatten)]
    placement: Placement,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

/// Never runs the command unenforced: it waits until the agent has mapped the cgroup.
pub fn exec(args: ExecArgs) -> anyhow::Result<i32> {
    // An unknown user fails before anything is made.
    let who = args.user.as_deref().map(user::resolve).transpose()?;
    let layout = args.placement.layout(&[])?;
    let labels: BTreeMap<String, String> = args
        .labels
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let dir = layout.workload_dir(&args.namespace, &labels)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
    let id = cgroup::cgroup_id(&dir)?;

    let map = datapath::open_cgroup_map(&args.placement.pin_root())?;
    let deadline = Instant::now() + Duration::from_millis(args.wait_ms);
    while map.get(&id, 0).is_err() {
        if Instant::now() > deadline {
            bail!(
                "the agent has not claimed namespace {:?} (cgroup {}) after {} ms; is `enforcer run` running with the same --bpffs-root and --cgroup-parent?",
                args.namespace,
                dir.display(),
                args.wait_ms
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Some(name) = &args.netns {
        return in_pod(&args, name, labels, &dir, who);
    }
    cgroup::enter(&dir)?;
    let (program, rest) = args.command.split_first().context("no command given")?;
    let mut cmd = Command::new(program);
    cmd.args(rest);
    if let Some(who) = who {
        user::run_as(&mut cmd, who);
    }
    // exec only returns on failure.
    let err = cmd.exec();
    eprintln!("enforcer exec: cannot run {program}: {err}");
    Ok(127)
}

/// Asks the agent for a pod, runs CMD in it (and in the workload's cgroup), then lets it go.
fn in_pod(
    args: &ExecArgs,
    name: &str,
    labels: BTreeMap<String, String>,
    cgroup_dir: &std::path::Path,
    who: Option<user::Identity>,
) -> anyhow::Result<i32> {
    anyhow::ensure!(
        crate::pods::valid_name(name),
        "--netns {name:?}: use lowercase letters, digits and '-', at most 32"
    );
    let dir = args.placement.pods_dir();
    let request = dir.join(format!("{name}.json"));
    let ready = dir.join(format!("{name}.ready"));
    anyhow::ensure!(
        dir.is_dir(),
        "{} does not exist: the agent must run with --pod-cidr for --netns",
        dir.display()
    );
    let body = serde_json::to_vec(&crate::pods::PodRequest {
        namespace: args.namespace.clone(),
        labels,
        pid: std::process::id(),
    })?;
    std::fs::write(&request, body).with_context(|| format!("writing {}", request.display()))?;
    let result = (|| {
        let deadline = Instant::now() + Duration::from_millis(args.wait_ms);
        while !crate::pods::answers(&ready, std::process::id()) {
            if Instant::now() > deadline {
                bail!(
                    "the agent has not made pod {name} after {} ms",
                    args.wait_ms
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        cgroup::enter(cgroup_dir)?;
        let mut cmd = pod_command(name, &args.command, who)?;
        let status = cmd
            .status()
            .with_context(|| format!("running {:?} in pod {name}", args.command))?;
        Ok(status.code().unwrap_or(128))
    })();
    let _ = std::fs::remove_file(&request);
    result
}

/// CMD in the pod's network namespace: through `ip netns exec` as the caller (which also
/// gives it the pod's /sys and /etc/netns files), or, for `--user`, joined directly, since
/// `ip netns exec` needs root.
fn pod_command(
    name: &str,
    command: &[String],
    who: Option<user::Identity>,
) -> anyhow::Result<Command> {
    let Some(who) = who else {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", name]).args(command);
        return Ok(cmd);
    };
    let path = std::path::Path::new("/run/netns").join(name);
    let netns =
        std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let (program, rest) = command.split_first().context("no command given")?;
    let mut cmd = Command::new(program);
    cmd.args(rest);
    user::join_netns(&mut cmd, netns);
    user::run_as(&mut cmd, who);
    Ok(cmd)
}
