//! `enforcer status`: the running agent's scopes, their verdicts and the maps' fill, as a
//! table (or JSON), from its status file and its `/metrics`.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::Context as _;
use clap::Args;

use crate::observe::{
    control::{ask_one, Request},
    explain_live::ScopeRow,
    status::Status,
};

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    agent: super::AgentSocket,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Counts of one scope, by verdict.
#[derive(Debug, Default, serde::Serialize)]
struct Verdicts {
    allowed: u64,
    denied: u64,
    audit: u64,
    revoked: u64,
}

pub fn status(args: StatusArgs) -> anyhow::Result<i32> {
    let status = Status::read(&args.agent.status_file)?;
    // The live scopes (Sidecar, rules, workloads); the status file's names and modes without.
    let live: Vec<ScopeRow> = args
        .agent
        .path()
        .and_then(|socket| ask_one(&socket, &Request::Scopes))
        .unwrap_or_else(|err| {
            eprintln!("note: {err:#}; scopes without their Sidecar, rules and workloads");
            Vec::new()
        });
    let rows: Vec<ScopeRow> = if live.is_empty() {
        status
            .scopes
            .iter()
            .map(|(name, mode)| ScopeRow {
                scope: name.clone(),
                namespace: name.split('/').next().unwrap_or_default().to_string(),
                sidecar: None,
                mode: mode.clone(),
                rules: 0,
                workloads: 0,
            })
            .collect()
    } else {
        live
    };
    let metrics = match status.metrics_addr {
        Some(addr) => scrape(addr).with_context(|| format!("reading http://{addr}/metrics"))?,
        None => String::new(),
    };
    let verdicts = verdicts(&metrics);
    let maps = maps(&metrics);
    if args.json {
        let out = serde_json::json!({
            "generation": status.generation,
            "failing_since": status.failing_since,
            "problems": status.problems.len(),
            "scopes": rows.iter().map(|r| serde_json::json!({
                "scope": r.scope, "namespace": r.namespace, "sidecar": r.sidecar, "mode": r.mode,
                "rules": r.rules, "workloads": r.workloads,
                "verdicts": verdicts.get(r.scope.as_str()),
            })).collect::<Vec<_>>(),
            "maps": maps,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }
    let state = match status.failing_since {
        Some(since) => format!("applies failing since {since} (unix time)"),
        None => "applied".to_string(),
    };
    println!(
        "generation {}, {state}, {} problems, {} notes",
        status.generation,
        status.problems.len(),
        status.notes.len()
    );
    println!(
        "{:<32} {:<14} {:<28} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "SCOPE", "MODE", "SIDECAR", "RULES", "WORKLOADS", "ALLOWED", "DENIED", "AUDIT", "REVOKED"
    );
    let none = Verdicts::default();
    for r in &rows {
        let v = verdicts.get(r.scope.as_str()).unwrap_or(&none);
        println!(
            "{:<32} {:<14} {:<28} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9}",
            r.scope,
            r.mode,
            r.sidecar.as_deref().unwrap_or("-"),
            r.rules,
            r.workloads,
            v.allowed,
            v.denied,
            v.audit,
            v.revoked
        );
    }
    println!(
        "{:<14} {:>9} {:>9} {:>7}",
        "MAP", "ENTRIES", "CAPACITY", "FILL"
    );
    for (map, (entries, capacity)) in &maps {
        let fill = capacity
            .filter(|&c| c > 0.0)
            .map_or("-".to_string(), |c| format!("{:.1}%", entries / c * 100.0));
        let cap = capacity.map_or("-".to_string(), |c| format!("{c:.0}"));
        println!("{map:<14} {entries:>9.0} {cap:>9} {fill:>7}");
    }
    Ok(0)
}

/// The agent's metrics, in the classic text format (loopback: a plain HTTP/1.0 request).
fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: enforcer\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no HTTP response")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    Ok(body.to_string())
}

/// A sample line's labels and value: `name{k="v",...} value`.
fn sample<'a>(line: &'a str, name: &str) -> Option<(BTreeMap<&'a str, &'a str>, f64)> {
    let rest = line.strip_prefix(name)?.strip_prefix('{')?;
    let (labels, value) = rest.rsplit_once("} ")?;
    let labels = labels
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k, v.trim_matches('"')))
        .collect();
    Some((labels, value.trim().parse().ok()?))
}

fn verdicts(metrics: &str) -> BTreeMap<&str, Verdicts> {
    let mut out: BTreeMap<&str, Verdicts> = BTreeMap::new();
    for (labels, value) in metrics
        .lines()
        .filter_map(|l| sample(l, "enforcer_verdicts_total"))
    {
        let Some(scope) = labels.get("scope") else {
            continue;
        };
        let v = out.entry(scope).or_default();
        let n = value as u64;
        match labels.get("verdict").copied() {
            Some("allowed") => v.allowed += n,
            Some("denied") => v.denied += n,
            Some("audit") => v.audit += n,
            Some("revoked") => v.revoked += n,
            _ => {}
        }
    }
    out
}

/// Per map: entries, and capacity where it is set.
fn maps(metrics: &str) -> BTreeMap<String, (f64, Option<f64>)> {
    let mut out: BTreeMap<String, (f64, Option<f64>)> = BTreeMap::new();
    for line in metrics.lines() {
        for (name, capacity) in [
            ("enforcer_map_entries", false),
            ("enforcer_map_capacity", true),
        ] {
            if let Some((labels, value)) = sample(line, name) {
                let map = labels.get("map").copied().unwrap_or_default().to_string();
                let e = out.entry(map).or_insert((0.0, None));
                if capacity {
                    e.1 = Some(value);
                } else {
                    e.0 = value;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_and_maps_are_read_from_the_exposition() {
        let text = "enforcer_verdicts_total{hook=\"socket\",namespace=\"shop\",scope=\"shop\",verdict=\"allowed\"} 3\n\
                    enforcer_verdicts_total{hook=\"tc\",namespace=\"shop\",scope=\"shop\",verdict=\"allowed\"} 2\n\
                    enforcer_verdicts_total{hook=\"socket\",namespace=\"shop\",scope=\"shop\",verdict=\"denied\"} 1\n\
                    enforcer_map_entries{map=\"allow_exact\"} 10\n\
                    enforcer_map_capacity{map=\"allow_exact\"} 100\n";
        let v = verdicts(text);
        assert_eq!((v["shop"].allowed, v["shop"].denied), (5, 1));
        assert_eq!(maps(text)["allow_exact"], (10.0, Some(100.0)));
    }
}
