use std::{
    collections::BTreeMap,
    os::unix::process::CommandExt as _,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::Args;

use super::Placement;
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
    #[command(flatten)]
    placement: Placement,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

/// Never runs the command unenforced: it waits until the agent has mapped the cgroup.
pub fn exec(args: ExecArgs) -> anyhow::Result<i32> {
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
        return in_pod(&args, name, labels, &dir);
    }
    cgroup::enter(&dir)?;
    let (program, rest) = args.command.split_first().context("no command given")?;
    // exec only returns on failure.
    let err = Command::new(program).args(rest).exec();
    eprintln!("enforcer exec: cannot run {program}: {err}");
    Ok(127)
}

/// Asks the agent for a pod, runs CMD in it (and in the workload's cgroup), then lets it go.
fn in_pod(
    args: &ExecArgs,
    name: &str,
    labels: BTreeMap<String, String>,
    cgroup_dir: &std::path::Path,
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
        let status = Command::new("ip")
            .args(["netns", "exec", name])
            .args(&args.command)
            .status()
            .context("running ip netns exec")?;
        Ok(status.code().unwrap_or(128))
    })();
    let _ = std::fs::remove_file(&request);
    result
}
