//! `enforcer audit-report`: what REGISTRY_ONLY would have refused in AUDIT namespaces, grouped
//! by destination, with a ServiceEntry that would allow each: from the running agent, or from
//! records saved before (`kubectl logs ds/enforcer | enforcer audit-report --from -`).

use std::{
    io::BufRead as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use clap::Args;

use super::AgentSocket;
use crate::observe::{
    audit::{AuditBook, AuditReport},
    control::{ask_one, Request},
    records::DenyRecord,
};

#[derive(Args, Debug)]
pub struct AuditReportArgs {
    /// Only this namespace.
    #[arg(long, short = 'n', value_name = "NS")]
    namespace: Option<String>,
    /// The ServiceEntries only, as YAML documents (to review, then apply).
    #[arg(long, conflicts_with = "json")]
    yaml: bool,
    /// The groups and their ServiceEntries as JSON.
    #[arg(long)]
    json: bool,
    /// Read records (the agent's JSON lines) from this file, `-` for stdin, instead of asking
    /// the running agent.
    #[arg(long, value_name = "FILE")]
    from: Option<PathBuf>,
    #[command(flatten)]
    socket: AgentSocket,
}

pub fn audit_report(args: AuditReportArgs) -> anyhow::Result<i32> {
    let book = match &args.from {
        Some(file) => read_records(file)?,
        None => ask_one::<AuditReport>(&args.socket.path()?, &Request::AuditReport)?.book(),
    };
    let rows = book.rows(args.namespace.as_deref());
    if args.yaml {
        let docs = rows
            .iter()
            .map(|(d, seen)| d.service_entry(seen))
            .collect::<anyhow::Result<Vec<_>>>()?;
        print!("{}", docs.join("---\n"));
        return Ok(0);
    }
    if args.json {
        let out = rows
            .iter()
            .map(|(d, seen)| {
                Ok(serde_json::json!({
                    "destination": d, "seen": seen, "service_entry": d.service_entry(seen)?,
                }))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"groups": out, "overflow": book.overflow})
            )?
        );
        return Ok(0);
    }
    println!(
        "{:<16} {:<40} {:>11} {:>8}  PODS",
        "NAMESPACE", "DESTINATION", "PORT", "SEEN"
    );
    for (d, seen) in &rows {
        let dest = match &d.host {
            Some(host) => format!("{host} ({})", join(&seen.addresses)),
            None => d.address.clone().unwrap_or_default(),
        };
        println!(
            "{:<16} {dest:<40} {:>11} {:>8}  {}",
            d.namespace,
            format!("{}/{}", d.port, d.proto),
            seen.count,
            join(&seen.pods)
        );
    }
    if book.overflow > 0 {
        println!(
            "({} records found the report full and are not in it)",
            book.overflow
        );
    }
    if !rows.is_empty() {
        println!("\n`enforcer audit-report --yaml` writes a ServiceEntry that allows each.");
    }
    Ok(0)
}

fn join(set: &std::collections::BTreeSet<String>) -> String {
    set.iter().cloned().collect::<Vec<_>>().join(", ")
}

/// Records as the agent prints them; lines that are not records (logs) are skipped.
fn read_records(file: &Path) -> anyhow::Result<AuditBook> {
    let reader: Box<dyn std::io::BufRead> = if file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        Box::new(std::io::BufReader::new(f))
    };
    let mut book = AuditBook::default();
    for line in reader.lines() {
        let line = line.with_context(|| format!("reading {}", file.display()))?;
        if let Some(record) = DenyRecord::from_line(&line) {
            book.add(&record);
        }
    }
    Ok(book)
}
