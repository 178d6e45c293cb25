//! Finding the host side of a pod's veth without depending on one CNI, for Kubernetes mode.
//!
//! Two ways, in order:
//! 1. The host's route to the pod's address. Routed CNIs point it at the pod's own veth: Calico
//!    (`cali*`), Cilium in native routing (`lxc*`), kindnet and the ptp plugin (`veth*`), AWS VPC
//!    CNI (`eni*`), Antrea (`<pod>-<hash>`).
//! 2. Otherwise the route points at a bridge or a tunnel (the bridge plugin's `cni0`, flannel,
//!    Weave, Kube-OVN): the interface that holds the pod's address inside the pod's network
//!    namespace names its peer's index on the host.
//!
//! Multus secondary interfaces and SR-IOV VFs (no veth on the host) are not covered.

use std::{net::IpAddr, path::Path, process::Command};

use anyhow::{bail, Context as _};
use serde_json::Value;

/// How the interface was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// The host's route to the pod goes straight to this veth.
    Route(String),
    /// This veth is the peer of the pod's interface, seen from inside the pod's namespace.
    Peer(String),
}

impl Found {
    pub fn ifname(&self) -> &str {
        match self {
            Found::Route(name) | Found::Peer(name) => name,
        }
    }
}

/// The host-side veth of the pod at `ip`. `netns` is the pod's network namespace (for example
/// `/proc/<pid>/ns/net` of one of its processes), needed when the route does not tell.
pub fn host_side(ip: IpAddr, netns: Option<&Path>) -> anyhow::Result<Found> {
    if let Some(dev) = route_dev(ip)? {
        if is_veth(&dev)? {
            return Ok(Found::Route(dev));
        }
    }
    let Some(netns) = netns else {
        bail!(
            "the route to {ip} does not lead to a veth, and the pod's network namespace is unknown"
        );
    };
    let addrs = ip_json(
        Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(["ip", "-j", "addr", "show"]),
    )
    .with_context(|| format!("reading interfaces in {}", netns.display()))?;
    let want = ip.to_string();
    let peer = addrs
        .as_array()
        .into_iter()
        .flatten()
        .find(|link| {
            link["addr_info"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["local"].as_str() == Some(want.as_str())))
        })
        .and_then(|link| link["link_index"].as_u64())
        .with_context(|| format!("no veth in {} holds {ip}", netns.display()))?;
    let links = ip_json(Command::new("ip").args(["-j", "link", "show"]))?;
    let name = links
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["ifindex"].as_u64() == Some(peer))
        .and_then(|l| l["ifname"].as_str())
        .with_context(|| {
            format!("the peer of {ip}'s interface (index {peer}) is not on this host")
        })?;
    Ok(Found::Peer(name.to_string()))
}

/// The device of the host's route to `ip`, if any.
fn route_dev(ip: IpAddr) -> anyhow::Result<Option<String>> {
    let routes = ip_json(Command::new("ip").args(["-j", "route", "get", &ip.to_string()]))?;
    Ok(routes[0]["dev"].as_str().map(str::to_string))
}

fn is_veth(dev: &str) -> anyhow::Result<bool> {
    let link = ip_json(Command::new("ip").args(["-j", "-d", "link", "show", "dev", dev]))?;
    Ok(link[0]["linkinfo"]["info_kind"].as_str() == Some("veth"))
}

fn ip_json(cmd: &mut Command) -> anyhow::Result<Value> {
    let out = cmd.output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    serde_json::from_slice(&out.stdout).context("parsing ip's JSON")
}
