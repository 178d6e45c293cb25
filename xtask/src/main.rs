//! Project tasks: `cargo xtask <task>`. Orchestration only; the product lives in enforcer-user.

mod bench;
mod bench_cost;
mod bench_dns;
mod bench_envoy;
mod bench_http;
mod bench_k8s;
mod bench_metrics;
mod bench_tc;
mod check;
mod demo;
mod image;
mod image_test;
mod manifests;
mod setup;
mod sh;
mod vagrant;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install every prerequisite (Debian packages, bpf-linker). Idempotent.
    Setup,
    /// Build target/release/enforcer with the kernel object embedded.
    Build,
    /// fmt, clippy (host and BPF target), unit tests and privileged integration tests.
    BuildAndTest,
    /// Check deploy/ offline: kustomizations complete, objects valid against Kubernetes schemas.
    CheckDeploy,
    /// Live demo of seeds 000 to 003 on this machine (root).
    Demo {
        /// An agent built elsewhere: nothing is built, and only what the demo runs is installed.
        #[arg(long)]
        enforcer: Option<std::path::PathBuf>,
    },
    /// Measure program cost, connect() overhead, time to enforcement, the TC programs, DNS
    /// learning and HTTP through Envoy (root).
    Bench {
        /// Only the TC measures (throughput through a pod veth, cost per packet, revocation).
        #[arg(long)]
        tc_only: bool,
        /// Only the Kubernetes-mode measures (churn, occupancy, the ancestor walk).
        #[arg(long, conflicts_with = "tc_only")]
        k8s_only: bool,
        /// Only the per-run costs of the programs, this build against the baseline.
        #[arg(long, conflicts_with_all = ["tc_only", "k8s_only"])]
        cost_only: bool,
        /// Only DNS learning: lookups through the proxy vs direct, CPU, memory.
        #[arg(long, conflicts_with_all = ["tc_only", "k8s_only", "cost_only"])]
        dns_only: bool,
        /// Only HTTP through Envoy: direct, under the agent, through a sidecar-style Envoy.
        #[arg(long, conflicts_with_all = ["tc_only", "k8s_only", "cost_only", "dns_only"])]
        envoy_only: bool,
        /// The commit whose agent the per-run costs compare with (built once, in a worktree).
        #[arg(long, value_name = "REV", default_value = bench_cost::BASELINE)]
        baseline: String,
        /// Measure the agent built at REV (like the baseline) instead of this checkout's.
        #[arg(long, value_name = "REV")]
        agent: Option<String>,
    },
    /// Build the agent's image with podman from deploy/Dockerfile, with no registry (root).
    Image,
    /// Run that image as deploy/agent/daemonset.yaml runs it, and each capability removed (root).
    ImageTest,
    /// Build the Vagrant box enforcer/bookworm from Debian's mirror and add it (root).
    VagrantBox,
    /// vagrant/Vagrantfile end to end: up (the demo in the VM), the seeds step by step, destroy
    /// (root).
    VagrantTest {
        /// Build the box again even if Vagrant has it.
        #[arg(long)]
        rebuild_box: bool,
        /// Leave the VM running afterwards (`vagrant destroy -f` in vagrant/ removes it).
        #[arg(long)]
        keep: bool,
        /// The agent the VM runs [default: a release build of this checkout].
        #[arg(long)]
        enforcer: Option<std::path::PathBuf>,
    },
    /// The box's root filesystem and disk, run by vagrant-box in a mount namespace of its own.
    #[command(hide = true)]
    VagrantBoxDisk { work: std::path::PathBuf },
    /// Boot Debian kernels in qemu (TCG) and check that the agent loads and enforces (root).
    VmTest {
        /// Kernel package (image or meta-package), repeatable [default: 6.1.0-50, newest 6.1, 6.12].
        #[arg(long = "kernel")]
        kernels: Vec<String>,
        /// The agent binary [default: target/release/enforcer].
        #[arg(long)]
        enforcer: Option<std::path::PathBuf>,
    },
    /// The benchmark's client, run inside the measured cgroup.
    #[command(hide = true)]
    BenchClient {
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(setup::Need::All, true),
        Task::Build => {
            setup::run(setup::Need::Build, false)?;
            check::build_release().map(|_| ())
        }
        Task::BuildAndTest => {
            setup::run(setup::Need::All, false)?;
            check::build_and_test()
        }
        Task::CheckDeploy => manifests::check(&sh::root()),
        Task::Demo { enforcer: None } => {
            setup::run(setup::Need::Build, false)?;
            let bin = check::build_release()?;
            demo::run(&bin)
        }
        Task::Demo {
            enforcer: Some(bin),
        } => {
            setup::runtime()?;
            demo::run(&bin)
        }
        Task::Bench {
            tc_only,
            k8s_only,
            cost_only,
            dns_only,
            envoy_only,
            baseline,
            agent,
        } => {
            setup::run(setup::Need::All, false)?;
            let (bin, label) = match &agent {
                Some(rev) => (bench_cost::agent_at(rev)?, rev.as_str()),
                None => (check::build_release()?, "this build"),
            };
            if k8s_only {
                return bench_k8s::run(&bin);
            }
            let only = match (tc_only, cost_only, dns_only, envoy_only) {
                (true, ..) => bench::Only::Tc,
                (_, true, ..) => bench::Only::Cost,
                (_, _, true, _) => bench::Only::Dns,
                (.., true) => bench::Only::Envoy,
                _ => bench::Only::All,
            };
            bench::run(&bin, only, [baseline.as_str(), label])?;
            if only == bench::Only::All {
                bench_k8s::run(&bin)?;
            }
            Ok(())
        }
        Task::BenchClient { args } => bench::client(&args),
        Task::VmTest { kernels, enforcer } => vm::run(&kernels, enforcer),
        Task::VagrantBox => vagrant::make_box(),
        Task::VagrantBoxDisk { work } => vagrant::box_disk(&work),
        Task::VagrantTest {
            rebuild_box,
            keep,
            enforcer,
        } => vagrant::test(rebuild_box, keep, enforcer),
        Task::Image => image::build(),
        Task::ImageTest => image_test::run(),
    }
}
