//! `enforcer explain`: is this connection allowed right now, and why.
//!
//! The policy is compiled again from the agent's own inputs (its status file names the policy
//! directory and holds its DNS answers), or from `--policies`. When pinned maps exist, the
//! kernel's entries are looked up too, and a disagreement is reported.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use anyhow::{bail, Context as _};
use clap::Args;
use ipnet::IpNet;

use super::{AgentSocket, Placement};
use crate::{
    cgroup,
    datapath::{
        inspect::{KernelMatch, LiveMaps},
        plan::mode_value,
    },
    istio::OutboundMode,
    observe::status::{Inputs, Status},
    observe::{
        control::{ask_one, Request},
        explain_live::{ExplainAnswer, ExplainQuery, ExplainRow},
    },
    policy::{decide::describe_scope, dns_names, L4},
    resolver::Resolver,
    sources::Sources,
};

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// Namespace of the connecting workload.
    #[arg(long, short = 'n', value_name = "NS")]
    namespace: String,
    /// The workload's labels, which select Sidecars (`app=web,version=v2`).
    #[arg(long, value_name = "LABELS", value_parser = cgroup::parse_labels)]
    workload: Option<BTreeMap<String, String>>,
    /// Destination: `host:port`, `ip:port` or `[ipv6]:port`.
    #[arg(value_name = "HOST_OR_IP:PORT")]
    target: String,
    /// UDP instead of TCP.
    #[arg(long)]
    udp: bool,
    /// Compile from this directory instead of the running agent's inputs.
    #[arg(long, value_name = "DIR")]
    policies: Option<PathBuf>,
    /// With --policies: the mesh config.
    #[arg(long, value_name = "FILE")]
    mesh_config: Option<PathBuf>,
    /// With --policies: the root namespace.
    #[arg(long, value_name = "NS", default_value = "istio-system")]
    root_namespace: String,
    /// With --policies: Istio's reading of `resolution: NONE` without addresses.
    #[arg(long)]
    istio_compat: bool,
    /// With --policies: always-allowed CIDRs, as given to the agent.
    #[arg(long, value_name = "CIDR")]
    allow_cidr: Vec<IpNet>,
    /// DNS server for names the agent has no answer for [default: the system's].
    #[arg(long, value_name = "IP:PORT")]
    dns_server: Option<SocketAddr>,
    /// A pod of this node (with --namespace): the running agent says what it gets, from its live
    /// policy and the pod's labels. Kubernetes mode always asks the agent.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["workload", "policies"])]
    pod: Option<String>,
    #[command(flatten)]
    agent: AgentSocket,
    #[command(flatten)]
    placement: Placement,
}

/// Exit 0 when every address of the target is allowed, 1 when any is refused.
pub fn explain(args: ExplainArgs) -> anyhow::Result<i32> {
    let (host, port) = parse_target(&args.target)?;
    let from_api = || {
        Status::read(&args.agent.status_file)
            .is_ok_and(|s| s.inputs.policies.as_os_str().is_empty())
    };
    if args.policies.is_none() && (args.pod.is_some() || from_api()) {
        return explain_live(&args, host, port);
    }
    let l4 = if args.udp { L4::Udp } else { L4::Tcp };
    let labels = args.workload.clone().unwrap_or_default();
    let (mut inputs, source) = inputs(&args)?;
    inputs.namespaces.insert(args.namespace.clone());
    let sources = Sources::load(&inputs.policies, inputs.mesh_config.as_deref());
    if args.policies.is_some() {
        let mut names = dns_names(&sources.entries, &sources.workloads, inputs.istio_compat);
        names.extend(crate::policy::routing_names(&sources.routing(&inputs)));
        for (name, answer) in Resolver::resolve_blocking(args.dns_server, &names)? {
            match answer {
                Ok(ips) => {
                    inputs.answers.insert(name, ips);
                }
                Err(err) => {
                    eprintln!("note: {name} does not resolve ({err}); nothing is allowed for it")
                }
            }
        }
    }
    let desired = sources.compile(&inputs);

    let ips = match host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => match inputs.answers.get(&host) {
            Some(ips) if !ips.is_empty() => ips.clone(),
            _ => {
                let names = BTreeSet::from([host.clone()]);
                match Resolver::resolve_blocking(args.dns_server, &names)?.remove(&host) {
                    Some(Ok(ips)) if !ips.is_empty() => ips,
                    Some(Err(err)) => bail!("{host} does not resolve: {err}"),
                    _ => bail!("{host} does not resolve"),
                }
            }
        },
    };

    let scope = desired
        .scope_for(&args.namespace, &labels)
        .unwrap_or(&args.namespace)
        .to_string();
    println!(
        "{}",
        describe_scope(&desired, &args.namespace, &labels, &scope)
    );
    println!("policy: {source}");
    let live = LiveMaps::open(&args.placement.pin_root())?;
    let rows: Vec<ExplainRow> = ips
        .into_iter()
        .map(|ip| ExplainRow::decide(&desired, &scope, ip, port, l4))
        .collect();
    let all_allowed = print_rows(live.as_ref(), &scope, &rows, port, l4);
    if let Ok(status) = Status::read(&args.agent.status_file) {
        print_learned(&status, &scope, &host);
    }
    if live.is_none() {
        println!(
            "kernel: no agent maps are pinned at {}; nothing is enforced now",
            args.placement.pin_root().display()
        );
    }
    Ok(if all_allowed { 0 } else { 1 })
}

/// Asks the running agent, which decides on the policy it compiled (in Kubernetes mode, from
/// objects no file holds), then looks the kernel's maps up as the files' path does.
fn explain_live(args: &ExplainArgs, host: String, port: u16) -> anyhow::Result<i32> {
    let query = ExplainQuery {
        namespace: args.namespace.clone(),
        pod: args.pod.clone(),
        labels: args.workload.clone().unwrap_or_default(),
        host: host.clone(),
        port,
        udp: args.udp,
    };
    let answer: ExplainAnswer = ask_one(&args.agent.path()?, &Request::Explain(query))?;
    println!("{}", answer.header);
    match &args.pod {
        Some(pod) if !answer.labels.is_empty() => println!(
            "pod {pod}: labels {}",
            cgroup::encode_labels(&answer.labels)
        ),
        _ => {}
    }
    println!("policy: the running agent's, live");
    let live = LiveMaps::open(&args.placement.pin_root())?;
    let l4 = if args.udp { L4::Udp } else { L4::Tcp };
    let all_allowed = print_rows(live.as_ref(), &answer.scope, &answer.rows, port, l4);
    if let Ok(status) = Status::read(&args.agent.status_file) {
        print_learned(&status, &answer.scope, &host);
    }
    Ok(if all_allowed { 0 } else { 1 })
}

/// Each address's decision, and what the pinned maps say of it; whether every one is
/// allowed (by the policy, or by an address learned from a DNS answer).
fn print_rows(
    live: Option<&LiveMaps>,
    scope: &str,
    rows: &[ExplainRow],
    port: u16,
    l4: L4,
) -> bool {
    let mut all_allowed = true;
    for row in rows {
        println!("  {}: {}", crate::net::SocketFmt(row.ip, port), row.why);
        let mut learned = false;
        if let Some(live) = live {
            let expected = (row.allowed, row.mode);
            let (view, by_learning) = kernel_view(live, scope, expected, row.ip, port, l4);
            learned = by_learning;
            println!("    kernel: {view}");
        }
        all_allowed &= row.allowed || learned;
    }
    all_allowed
}

/// The agent's inputs from its status file, or the command line's with `--policies`.
fn inputs(args: &ExplainArgs) -> anyhow::Result<(Inputs, String)> {
    if let Some(policies) = &args.policies {
        let policies = std::fs::canonicalize(policies)
            .with_context(|| format!("--policies {}", policies.display()))?;
        let inputs = Inputs {
            policies: policies.clone(),
            mesh_config: args.mesh_config.clone(),
            root_namespace: args.root_namespace.clone(),
            istio_compat: args.istio_compat,
            allow_cidrs: args.allow_cidr.clone(),
            dns_servers: args.dns_server.into_iter().collect(),
            ..Inputs::default()
        };
        return Ok((inputs, format!("compiled from {}", policies.display())));
    }
    let status = Status::read(&args.agent.status_file).context(
        "no running agent's status to explain from; pass --policies DIR (or --status-file)",
    )?;
    let source = format!(
        "the agent's inputs (generation {}, {})",
        status.generation,
        status.inputs.policies.display()
    );
    Ok((status.inputs, source))
}

/// What the pinned maps say, and whether it agrees with the compiled decision; and whether
/// an address learned from a DNS answer allows it now.
fn kernel_view(
    live: &LiveMaps,
    scope: &str,
    (expected_allowed, expected_mode): (bool, Option<OutboundMode>),
    ip: IpAddr,
    port: u16,
    l4: L4,
) -> (String, bool) {
    let Some(id) = live.scope_id(scope) else {
        return (
            "no scope of this name in the maps yet (no workload of it has run)".to_string(),
            false,
        );
    };
    let found = live.lookup(id, ip, port, l4);
    let entry = match found {
        KernelMatch::Exact => "an exact allow entry".to_string(),
        KernelMatch::Cidr => "a CIDR allow entry".to_string(),
        KernelMatch::Global => "a global allow entry".to_string(),
        KernelMatch::Learned { expires_in_s } if expires_in_s > 0 => {
            format!("an entry learned from a DNS answer (expires in {expires_in_s} s)")
        }
        KernelMatch::Learned { expires_in_s } => format!(
            "an entry learned from a DNS answer that expired {} s ago (flows it allowed go on; new ones are refused)",
            -expires_in_s
        ),
        KernelMatch::Redirect { to_gateway: true } => {
            "a redirect to the egress gateway".to_string()
        }
        KernelMatch::Redirect { to_gateway: false } => {
            "a gateway entry that refuses it".to_string()
        }
        KernelMatch::None => "no allow entry".to_string(),
    };
    let learned = matches!(found, KernelMatch::Learned { expires_in_s } if expires_in_s > 0);
    let modes = live.modes_of(id);
    let allowed = match modes.as_slice() {
        [] => {
            return (
                format!(
                    "{entry} for scope {scope} (id {id}); no cgroup of this scope is mapped now"
                ),
                learned,
            )
        }
        [mode] if matches!(found, KernelMatch::Redirect { .. }) => {
            found == KernelMatch::Redirect { to_gateway: true }
                || *mode == enforcer_common::mode::AUDIT
        }
        [mode] => {
            *mode != enforcer_common::mode::REGISTRY_ONLY
                || !matches!(found, KernelMatch::None | KernelMatch::Learned { .. })
                || learned
        }
        _ => {
            return (
                format!("{entry}; cgroups of scope {scope} disagree on the mode: {modes:?}"),
                learned,
            )
        }
    };
    let expected_mode = expected_mode.map(mode_value);
    // The files cannot know what workloads' answers taught: a learned entry is no disagreement.
    let agrees =
        (allowed == expected_allowed || learned) && expected_mode == modes.first().copied();
    let view = format!(
        "{entry} for scope {scope} (id {id}), so {}{}",
        if allowed { "allowed" } else { "refused" },
        if agrees {
            ""
        } else {
            "; this DISAGREES with the policy files (the agent may not have applied a change yet)"
        }
    );
    (view, learned)
}

/// What the scope learned from DNS answers for this name or address, as the agent last wrote.
fn print_learned(status: &Status, scope: &str, target: &str) {
    let Some(report) = &status.dns_learning else {
        if let Some(why) = &status.dns_learning_error {
            println!("learning from DNS answers: {why}");
        }
        return;
    };
    let target = crate::dns::host::normalize(target);
    let rows: Vec<_> = report
        .learned
        .iter()
        .filter(|l| l.scope == scope && (l.name == target || l.addr == target))
        .collect();
    if rows.is_empty() {
        return;
    }
    println!("learned from this scope's DNS answers:");
    for l in rows {
        let life = if l.expires_in_s >= 0 {
            format!("expires in {} s", l.expires_in_s)
        } else {
            format!("expired {} s ago", -l.expires_in_s)
        };
        println!("  {} for {} ({life})", l.addr, l.name);
    }
}

/// `host:port`, `1.2.3.4:port` or `[2001:db8::1]:port`.
fn parse_target(target: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = target
        .rsplit_once(':')
        .with_context(|| format!("{target:?} is not HOST_OR_IP:PORT"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .with_context(|| format!("{port:?} is not a port number"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        bail!("{target:?} has no host");
    }
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            parse_target("db.example.com:5432").unwrap(),
            ("db.example.com".into(), 5432)
        );
        assert_eq!(
            parse_target("[2001:db8::10]:443").unwrap(),
            ("2001:db8::10".into(), 443)
        );
        assert_eq!(
            parse_target("198.51.100.20:80").unwrap(),
            ("198.51.100.20".into(), 80)
        );
        assert!(parse_target("db.example.com").is_err());
        assert!(parse_target("db.example.com:0").is_err());
        assert!(parse_target(":80").is_err());
    }
}
