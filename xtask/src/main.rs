//! Project tasks: `cargo xtask <task>`. Orchestration only; the product lives in enforcer-user.

mod bench;
mod bench_k8s;
mod bench_tc;
mod check;
mod demo;
mod manifests;
mod setup;
mod sh;
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
    /// Live demo of seeds 000 and 001 on this machine (root).
    Demo,
    /// Measure program cost, connect() overhead, time to enforcement and the TC programs (root).
    Bench {
        /// Only the TC measures (throughput through a pod veth, cost per packet, revocation).
        #[arg(long)]
        tc_only: bool,
        /// Only the Kubernetes-mode measures (churn, occupancy, the ancestor walk).
        #[arg(long, conflicts_with = "tc_only")]
        k8s_only: bool,
    },
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
        Task::Setup => setup::run(true),
        Task::Build => {
            setup::run(false)?;
            check::build_release().map(|_| ())
        }
        Task::BuildAndTest => {
            setup::run(false)?;
            check::build_and_test()
        }
        Task::CheckDeploy => manifests::check(&sh::root()),
        Task::Demo => {
            setup::run(false)?;
            let bin = check::build_release()?;
            demo::run(&bin)
        }
        Task::Bench { tc_only, k8s_only } => {
            setup::run(false)?;
            let bin = check::build_release()?;
            if k8s_only {
                return bench_k8s::run(&bin);
            }
            bench::run(&bin, tc_only)?;
            if !tc_only {
                bench_k8s::run(&bin)?;
            }
            Ok(())
        }
        Task::BenchClient { args } => bench::client(&args),
        Task::VmTest { kernels, enforcer } => vm::run(&kernels, enforcer),
    }
}
