//! `enforcer analyze`: cross-object problems, like `istioctl analyze`.

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf};

use clap::Args;

use super::Placement;
use crate::{
    diag::Severity,
    observe::status::{Status, DEFAULT_PATH},
    policy::{
        analyze::{analyze as run_analysis, Subject},
        dns_names,
    },
    resolver::Resolver,
    sources::Sources,
};

#[derive(Args, Debug)]
pub struct AnalyzeArgs {
    /// Directory of Istio YAML [default: the running agent's, from its status file].
    #[arg(long, value_name = "DIR")]
    policies: Option<PathBuf>,
    /// Mesh config [default: the running agent's].
    #[arg(long, value_name = "FILE")]
    mesh_config: Option<PathBuf>,
    /// A namespace that exists (besides those of the objects and the agent's). Repeatable.
    #[arg(long = "namespace", value_name = "NS")]
    namespaces: Vec<String>,
    /// DNS server for the resolution checks [default: the system's].
    #[arg(long, value_name = "IP:PORT")]
    dns_server: Option<SocketAddr>,
    /// Skip the checks that need DNS.
    #[arg(long)]
    offline: bool,
    #[arg(long, value_name = "NS", default_value = "istio-system")]
    root_namespace: String,
    #[arg(long)]
    istio_compat: bool,
    /// The running agent's status file.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_PATH)]
    status_file: PathBuf,
    #[command(flatten)]
    placement: Placement,
}

/// Exit 0 without errors (warnings are printed), 1 with any error, as `istioctl analyze`'s
/// default failure threshold.
pub fn analyze(args: AnalyzeArgs) -> anyhow::Result<i32> {
    let status = Status::read(&args.status_file).ok();
    let (policies, mesh_config) = match (&args.policies, &status) {
        (Some(dir), _) => (dir.clone(), args.mesh_config.clone()),
        (None, Some(st)) => (
            st.inputs.policies.clone(),
            args.mesh_config.clone().or(st.inputs.mesh_config.clone()),
        ),
        (None, None) => anyhow::bail!(
            "no running agent's status at {}; pass --policies DIR",
            args.status_file.display()
        ),
    };
    anyhow::ensure!(
        policies.is_dir(),
        "{} is not a directory",
        policies.display()
    );
    let sources = Sources::load(&policies, mesh_config.as_deref());

    let mut namespaces: BTreeSet<String> = args.namespaces.iter().cloned().collect();
    if let Some(st) = &status {
        namespaces.extend(st.inputs.namespaces.iter().cloned());
    }
    // Namespaces with local workloads exist too.
    if let Ok(layout) = args.placement.layout(&[]) {
        if let Ok(found) = layout.discover() {
            namespaces.extend(found.into_values().map(|a| a.namespace));
        }
    }

    let dns = if args.offline {
        None
    } else {
        let names = dns_names(&sources.entries, &sources.workloads, args.istio_compat);
        Some(Resolver::resolve_blocking(args.dns_server, &names)?)
    };
    let findings = run_analysis(&Subject {
        entries: &sources.entries,
        workloads: &sources.workloads,
        sidecars: &sources.sidecars,
        gateways: &sources.gateways,
        virtual_services: &sources.virtual_services,
        destination_rules: &sources.destination_rules,
        mesh: &sources.mesh,
        diagnostics: &sources.diagnostics,
        namespaces: &namespaces,
        dns: dns.as_ref(),
        root_namespace: &args.root_namespace,
        istio_compat: args.istio_compat,
    });
    for f in &findings {
        println!("{f}");
    }
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    if findings.is_empty() {
        println!(
            "✔ No validation issues found when analyzing {}",
            policies.display()
        );
    } else {
        println!(
            "{} errors, {} warnings in {}",
            errors,
            findings.len() - errors,
            policies.display()
        );
    }
    Ok(i32::from(errors > 0))
}
