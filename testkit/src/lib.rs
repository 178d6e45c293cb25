//! Real parts for tests, the demo and the benchmark: test hosts in a network namespace behind a
//! veth (on documentation addresses), dnsmasq on loopback, Envoy as Istio's egress gateway or a
//! sidecar, and a tiny HTTP server. All clean up on drop, also when a test panics.

pub mod apiserver;
pub mod cgroups;
pub mod envoy;
pub mod http;

pub use machine_lock::machine_lock;
mod machine_lock;

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};

/// `host.py` or `probe.py`, shipped beside this crate: where it was built, or, for a binary run
/// elsewhere (the Vagrant VM runs an xtask built on its host), under `testkit/` of the current
/// directory, the workspace there.
pub fn script(name: &str) -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR"));
    match std::env::current_dir() {
        Ok(cwd)
            if !built.join("Cargo.toml").is_file() && cwd.join("testkit/Cargo.toml").is_file() =>
        {
            cwd.join("testkit").join(name)
        }
        _ => built.join(name),
    }
}

/// Debian's python3 when present (`cargo xtask setup` installs it), else the one on PATH.
pub fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn run(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    ensure!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn quiet(args: &[&str]) {
    let _ = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Test hosts: a network namespace joined to this one by a veth. The namespace holds the given
/// addresses; this side gets `.1` of each IPv4 /24 and `::1` of each IPv6 /64, so the routes to
/// the hosts go through the veth and nowhere else.
pub struct TestNet {
    netns: String,
    veth: String,
    server: Option<Child>,
    addrs: Vec<IpAddr>,
    /// What the hosts received, a line each (see `host.py --log`).
    log: PathBuf,
}

impl TestNet {
    pub fn new(netns: &str, veth: &str, addrs: &[&str]) -> anyhow::Result<Self> {
        let addrs: Vec<IpAddr> = addrs
            .iter()
            .map(|a| a.parse())
            .collect::<Result<_, _>>()
            .context("test host addresses")?;
        let peer = format!("{veth}p");
        quiet(&["ip", "link", "del", veth]);
        quiet(&["ip", "netns", "del", netns]);
        let gateways = gateways(&addrs);
        assert_unused(&gateways)?;
        run(&["ip", "netns", "add", netns])?;
        // From here on, drop cleans up whatever was made.
        let net = Self {
            netns: netns.to_string(),
            veth: veth.to_string(),
            server: None,
            addrs: addrs.clone(),
            log: std::env::temp_dir().join(format!("{netns}-received.log")),
        };
        let _ = fs::remove_file(&net.log);
        run(&[
            "ip", "link", "add", veth, "type", "veth", "peer", "name", &peer,
        ])?;
        run(&["ip", "link", "set", &peer, "netns", netns])?;
        // No duplicate address detection on the link-local addresses either: while it runs,
        // the first packets to and from the hosts wait for neighbour discovery.
        let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{veth}/accept_dad"), "0");
        run(&[
            "ip",
            "netns",
            "exec",
            netns,
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{peer}.accept_dad=0"),
        ])?;
        for (gw, len) in &gateways {
            let cidr = format!("{gw}/{len}");
            if gw.is_ipv6() {
                run(&["ip", "-6", "addr", "add", &cidr, "dev", veth, "nodad"])?;
            } else {
                run(&["ip", "addr", "add", &cidr, "dev", veth])?;
            }
        }
        run(&["ip", "link", "set", veth, "up"])?;
        for addr in &addrs {
            let cidr = format!("{addr}/{}", if addr.is_ipv6() { 64 } else { 24 });
            let family = if addr.is_ipv6() { "-6" } else { "-4" };
            let mut args = vec![
                "ip", "netns", "exec", netns, "ip", family, "addr", "add", &cidr, "dev", &peer,
            ];
            if addr.is_ipv6() {
                args.push("nodad");
            }
            run(&args)?;
        }
        run(&[
            "ip", "netns", "exec", netns, "ip", "link", "set", &peer, "up",
        ])?;
        run(&[
            "ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up",
        ])?;
        Ok(net)
    }

    /// Routes `cidr` (for example local pods behind the host) from the test hosts back through
    /// the host side of the veth.
    pub fn route_back(&self, cidr: &str) -> anyhow::Result<()> {
        let v6 = cidr.contains(':');
        let gw = gateways(&self.addrs)
            .into_iter()
            .find(|(gw, _)| gw.is_ipv6() == v6)
            .context("no test address of that family")?
            .0
            .to_string();
        let family = if v6 { "-6" } else { "-4" };
        run(&[
            "ip",
            "netns",
            "exec",
            &self.netns,
            "ip",
            family,
            "route",
            "add",
            cidr,
            "via",
            &gw,
        ])
    }

    /// What the hosts' listeners received so far: `tcp|udp LOCAL:PORT from PEER` lines.
    pub fn received(&self) -> Vec<String> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The network namespace's name.
    pub fn name(&self) -> &str {
        &self.netns
    }

    /// Runs a command inside the test hosts' namespace.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .args(args)
            .output()
            .context("running ip netns exec")
    }

    /// Starts `host.py` in the namespace: TCP listeners that greet (HTTP 200 for HTTP), and UDP
    /// echo on every address.
    pub fn serve(&mut self, tcp: &[u16], udp: &[u16]) -> anyhow::Result<()> {
        let join = |ports: &[u16]| {
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let addrs = self
            .addrs
            .iter()
            .map(IpAddr::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut server = Command::new("ip")
            .args(["netns", "exec", &self.netns, python()])
            .arg(script("host.py"))
            .args(["--tcp", &join(tcp), "--udp", &join(udp), "--addrs", &addrs])
            .arg("--log")
            .arg(&self.log)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the test host server")?;
        let mut line = String::new();
        if let Some(out) = server.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        self.server = Some(server);
        ensure!(line.trim() == "ready", "the test host server did not start");
        Ok(())
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        quiet(&["ip", "link", "del", &self.veth]);
        quiet(&["ip", "netns", "del", &self.netns]);
        let _ = fs::remove_file(&self.log);
    }
}

/// `.1` of each IPv4 /24 and `::1` of each IPv6 /64 among `addrs`.
fn gateways(addrs: &[IpAddr]) -> BTreeSet<(IpAddr, u8)> {
    addrs
        .iter()
        .map(|addr| match addr {
            IpAddr::V4(v4) => {
                let [a, b, c, _] = v4.octets();
                (IpAddr::from([a, b, c, 1]), 24)
            }
            IpAddr::V6(v6) => {
                let mut s = v6.segments();
                s[4..].copy_from_slice(&[0, 0, 0, 1]);
                (IpAddr::from(s), 64)
            }
        })
        .collect()
}

/// Test traffic must reach only the test's own hosts: refuse to go on where this machine already
/// has an address in one of the subnets (some machines use 192.0.2.0/24 for their uplink).
fn assert_unused(subnets: &BTreeSet<(IpAddr, u8)>) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(["-o", "addr", "show"])
        .output()
        .context("ip addr")?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(addr) = line
            .split_whitespace()
            .nth(3)
            .and_then(|a| a.split('/').next())
        else {
            continue;
        };
        let Ok(addr) = addr.parse::<IpAddr>() else {
            continue;
        };
        if gateways(&[addr]).iter().any(|g| subnets.contains(g)) {
            bail!("this machine already uses {addr} ({}); the test hosts' subnet would collide with it", line.trim());
        }
    }
    Ok(())
}

/// dnsmasq answering from a hosts file, with no upstream: names it does not hold get no answer
/// from anywhere else.
pub struct Dnsmasq {
    child: Child,
    hosts_file: PathBuf,
    pub addr: SocketAddr,
}

impl Dnsmasq {
    /// Listens on `addr`; port 0 picks a free one. `dir` holds its hosts file.
    pub fn start(
        addr: SocketAddr,
        dir: &Path,
        ttl: u32,
        records: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::start_with_cnames(addr, dir, ttl, records, &[])
    }

    /// As `start`, with CNAME records `(alias, target)`; targets must be among `records`.
    pub fn start_with_cnames(
        addr: SocketAddr,
        dir: &Path,
        ttl: u32,
        records: &[(&str, &str)],
        cnames: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::start_forwarding(addr, dir, ttl, records, cnames, &[])
    }

    /// As `start_with_cnames`, forwarding names under each `(domain, server)` to that server:
    /// an address where nothing answers makes a name whose lookups hang until they time out.
    pub fn start_forwarding(
        addr: SocketAddr,
        dir: &Path,
        ttl: u32,
        records: &[(&str, &str)],
        cnames: &[(&str, &str)],
        forwards: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let addr = if addr.port() == 0 {
            UdpSocket::bind(addr)?.local_addr()?
        } else {
            addr
        };
        let hosts_file = dir.join("dnsmasq-hosts");
        write_records(&hosts_file, records)?;
        let child = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
            ])
            .args(["--user=root", "--pid-file=", "--no-negcache"])
            .arg(format!("--listen-address={}", addr.ip()))
            .arg(format!("--port={}", addr.port()))
            .arg(format!("--local-ttl={ttl}"))
            .arg(format!("--addn-hosts={}", hosts_file.display()))
            .args(
                cnames
                    .iter()
                    .map(|(alias, target)| format!("--cname={alias},{target}")),
            )
            .args(
                forwards
                    .iter()
                    .map(|(domain, server)| format!("--server=/{domain}/{server}")),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting dnsmasq (cargo xtask setup installs it)")?;
        let dns = Self {
            child,
            hosts_file,
            addr,
        };
        let start = Instant::now();
        while !listening(addr) {
            ensure!(
                start.elapsed() < Duration::from_secs(5),
                "dnsmasq is not listening on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(dns)
    }

    /// Replaces every record; dnsmasq rereads its hosts file on SIGHUP.
    pub fn set_records(&self, records: &[(&str, &str)]) -> anyhow::Result<()> {
        write_records(&self.hosts_file, records)?;
        run(&["kill", "-HUP", &self.child.id().to_string()])
    }
}

fn listening(addr: SocketAddr) -> bool {
    Command::new("ss")
        .args(["-Hlun", &format!("sport = :{}", addr.port())])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&addr.ip().to_string()))
}

fn write_records(path: &Path, records: &[(&str, &str)]) -> anyhow::Result<()> {
    let text: String = records
        .iter()
        .map(|(name, ip)| format!("{ip} {name}\n"))
        .collect();
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateways_per_subnet() {
        let addrs: Vec<IpAddr> = [
            "198.51.100.10",
            "198.51.100.20",
            "2001:db8::10",
            "203.0.113.5",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let got: Vec<String> = gateways(&addrs)
            .iter()
            .map(|(ip, len)| format!("{ip}/{len}"))
            .collect();
        assert_eq!(got, ["198.51.100.1/24", "203.0.113.1/24", "2001:db8::1/64"]);
    }
}
