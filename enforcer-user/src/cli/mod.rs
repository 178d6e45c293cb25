//! Command-line interface: one module per subcommand.

mod analyze;
mod audit_report;
mod events;
mod exec;
mod explain;
mod health;
mod run;
mod status;
mod teardown;
mod user;
mod validate;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::{cgroup::Layout, datapath::bpffs};

#[derive(Parser, Debug)]
#[command(
    name = "enforcer",
    version,
    about = "eBPF egress enforcement from Istio ServiceEntries"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node agent in the foreground.
    Run(Box<run::RunArgs>),
    /// Run a command inside the cgroup of a namespace (local mode).
    Exec(exec::ExecArgs),
    /// Detach the programs and remove everything the agent pinned. Enforcement stops.
    Teardown(teardown::TeardownArgs),
    /// Check ServiceEntry, WorkloadEntry and Sidecar files with Istio's rules.
    Validate(validate::ValidateArgs),
    /// Report cross-object problems with stable codes, like `istioctl analyze`.
    Analyze(analyze::AnalyzeArgs),
    /// Say whether a connection is allowed right now, and why (exit 0 allowed, 1 refused).
    Explain(explain::ExplainArgs),
    /// Exit 0 if the agent has applied a policy and is running (for probes).
    Health(health::HealthArgs),
    /// The running agent's scopes, their verdicts, and the maps' fill.
    Status(status::StatusArgs),
    /// The running agent's records (refusals, AUDIT reports, revocations), recent and live.
    Events(events::EventsArgs),
    /// What REGISTRY_ONLY would have refused in AUDIT namespaces, with ServiceEntries to allow it.
    AuditReport(audit_report::AuditReportArgs),
}

/// How commands reach the running agent's control socket.
#[derive(Args, Debug, Clone)]
pub struct AgentSocket {
    /// The agent's control socket [default: the one its status file names].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The running agent's status file.
    #[arg(long, value_name = "FILE", default_value = crate::observe::status::DEFAULT_PATH)]
    pub status_file: PathBuf,
}

impl AgentSocket {
    pub fn path(&self) -> anyhow::Result<PathBuf> {
        if let Some(path) = &self.socket {
            return Ok(path.clone());
        }
        let status = crate::observe::status::Status::read(&self.status_file)?;
        status.control_socket.ok_or_else(|| {
            anyhow::anyhow!(
                "the agent of {} serves no control socket (--control-socket off)",
                self.status_file.display()
            )
        })
    }
}

/// Where the agent keeps its state; agents and commands that share these see each other.
#[derive(Args, Debug, Clone)]
pub struct Placement {
    /// Directory under bpffs for pinned programs, links and maps [default: <bpffs>/enforcer].
    #[arg(long, value_name = "DIR")]
    pub bpffs_root: Option<PathBuf>,
    /// cgroup (relative to the cgroup2 mount) under which namespace cgroups live.
    #[arg(long, value_name = "NAME", default_value = "enforcer")]
    pub cgroup_parent: String,
    /// The cgroup2 mount to use [default: found in /proc/self/mountinfo]. In a container, the
    /// host's hierarchy mounted in: the programs attach to its root.
    #[arg(long, value_name = "DIR", env = "ENFORCER_CGROUP2")]
    pub cgroup2: Option<PathBuf>,
}

impl Placement {
    pub fn pin_root(&self) -> PathBuf {
        self.bpffs_root
            .clone()
            .unwrap_or_else(bpffs::default_pin_root)
    }

    /// Where `exec --netns` asks the agent for pods.
    pub fn pods_dir(&self) -> PathBuf {
        PathBuf::from("/run/enforcer")
            .join(self.cgroup_parent.trim_matches('/').replace('/', "_"))
            .join("pods")
    }

    pub fn layout(&self, mapped: &[(String, PathBuf)]) -> anyhow::Result<Layout> {
        Layout::new(&self.cgroup_parent, mapped, self.cgroup2.as_deref())
    }
}

/// Runs the parsed command and returns the process exit code.
pub fn main() -> anyhow::Result<i32> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run::run(*args).map(|()| 0),
        Command::Exec(args) => exec::exec(args),
        Command::Teardown(args) => teardown::teardown(args).map(|()| 0),
        Command::Health(args) => health::health(args),
        Command::Status(args) => status::status(args),
        Command::Validate(args) => validate::validate(args),
        Command::Analyze(args) => analyze::analyze(args),
        Command::Events(args) => events::events(args),
        Command::AuditReport(args) => audit_report::audit_report(args),
        // Exit 1 means refused, so errors take 2.
        Command::Explain(args) => explain::explain(args).or_else(|err| {
            eprintln!("enforcer explain: {err:#}");
            Ok(2)
        }),
    }
}
