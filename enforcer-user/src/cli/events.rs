//! `enforcer events`: the running agent's records, recent and live, filtered, as a readable
//! line each (like `hubble observe`) or as JSON.

use clap::Args;
use ipnet::IpNet;

use super::AgentSocket;
use crate::observe::{
    control::{ask, Request},
    filter::Filter,
};

#[derive(Args, Debug)]
pub struct EventsArgs {
    #[arg(long, short = 'n', value_name = "NS")]
    namespace: Option<String>,
    /// A pod's name, or a prefix ending in `*`.
    #[arg(long, value_name = "NAME")]
    pod: Option<String>,
    #[arg(long, value_parser = ["denied", "audit", "revoked"])]
    verdict: Option<String>,
    /// Destinations in this address or CIDR.
    #[arg(long = "to", value_name = "IP|CIDR", value_parser = parse_net)]
    destination: Option<IpNet>,
    #[arg(long, value_name = "PORT")]
    port: Option<u16>,
    /// Destinations of this host, or of an Istio wildcard (`*.example.com`).
    #[arg(long, value_name = "HOST")]
    host: Option<String>,
    /// How many of the recent records to show first (the agent keeps 1,024).
    #[arg(long, value_name = "N", default_value_t = 20)]
    last: usize,
    /// Keep showing records as they come, until interrupted.
    #[arg(long, short = 'f')]
    follow: bool,
    /// One JSON record per line, as the agent prints them.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    socket: AgentSocket,
}

pub fn events(args: EventsArgs) -> anyhow::Result<i32> {
    let request = Request::Events {
        filter: Filter {
            namespace: args.namespace,
            pod: args.pod,
            verdict: args.verdict,
            destination: args.destination,
            port: args.port,
            host: args.host,
        },
        last: args.last,
        follow: args.follow,
    };
    for line in ask(&args.socket.path()?, &request)? {
        let line = line?;
        if args.json {
            println!("{line}");
        } else {
            println!("{}", readable(&line));
        }
    }
    Ok(0)
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    crate::net::parse_ip_or_cidr(s).ok_or_else(|| format!("{s:?} is not an address or a CIDR"))
}

/// `06:49:49.123 shop/web-1 -> 203.0.113.10:443 (api.example.com) tcp DENIED no_rule connect4`
fn readable(v: &serde_json::Value) -> String {
    // A process names itself (comm): no terminal control from it.
    let text = |key: &str| {
        v.get(key)
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect::<String>()
    };
    if let Some(lost) = v.get("lost") {
        return format!("... {lost} records lost: this reader fell behind");
    }
    let ms = v
        .get("time_unix_ms")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_default();
    let (secs, ms) = (ms / 1000, ms % 1000);
    let who = match (text("pod").as_str(), text("comm").as_str()) {
        ("", "") => text("namespace"),
        ("", comm) => format!("{} ({comm})", text("namespace")),
        (pod, _) => format!("{}/{pod}", text("namespace")),
    };
    let port = v
        .get("port")
        .and_then(serde_json::Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(0);
    let to = match (
        text("dst").parse::<std::net::IpAddr>(),
        text("host").as_str(),
    ) {
        (Err(_), _) => "(no destination)".to_string(),
        (Ok(ip), "") => crate::net::SocketFmt(ip, port).to_string(),
        (Ok(ip), host) => format!("{} ({host})", crate::net::SocketFmt(ip, port)),
    };
    format!(
        "{:02}:{:02}:{:02}.{ms:03} {who} -> {to} {} {} {} {}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60,
        text("proto"),
        text("verdict").to_uppercase(),
        text("reason_code"),
        text("hook"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_like_a_flow() {
        let v = serde_json::json!({
            "time_unix_ms": 3_723_004_u64, "verdict": "denied", "namespace": "shop",
            "pod": "web-1", "comm": "curl", "dst": "203.0.113.10", "port": 443, "proto": "tcp",
            "host": "api.example.com", "reason_code": "no_rule", "hook": "connect4",
        });
        assert_eq!(
            readable(&v),
            "01:02:03.004 shop/web-1 -> 203.0.113.10:443 (api.example.com) tcp DENIED no_rule connect4"
        );
        let v6 = serde_json::json!({"namespace": "shop", "comm": "nc", "dst": "2001:db8::1",
            "port": 53, "proto": "udp", "verdict": "audit", "reason_code": "no_rule", "hook": "sendmsg6"});
        assert_eq!(
            readable(&v6),
            "00:00:00.000 shop (nc) -> [2001:db8::1]:53 udp AUDIT no_rule sendmsg6"
        );
        assert!(readable(&serde_json::json!({"lost": 7})).contains("7 records lost"));
        let sneaky = serde_json::json!({"namespace": "shop", "comm": "\u{1b}[2Jx"});
        assert!(
            readable(&sneaky).contains("shop (?[2Jx)"),
            "{}",
            readable(&sneaky)
        );
    }
}
