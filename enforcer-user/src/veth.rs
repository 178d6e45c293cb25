//! Finding the host side of a pod's veth without depending on one CNI, for Kubernetes mode.
//!
//! Two ways, in order:
//! 1. The host's route to the pod's address. Routed CNIs point it at the pod's own veth: Calico
//!    (`cali*`), Cilium in native routing (`lxc*`), kindnet and the ptp plugin (`veth*`), AWS VPC
//!    CNI (`eni*`), Antrea (`<pod>-<hash>`).
//! 2. Otherwise the route points at a bridge or a tunnel (the bridge plugin's `cni0`, flannel,
//!    Weave, Kube-OVN), or at a shared host device (Cilium's `cilium_host` without endpoint
//!    routes): the interface that holds the pod's address inside the pod's network namespace
//!    names its peer's index on the host.
//!
//! Multus secondary interfaces and SR-IOV VFs (no veth on the host) are not covered.

use std::{ffi::CString, net::IpAddr, path::Path, process::Command};

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
///
/// Either way the interface must be a veth whose peer is in another network namespace: with
/// Cilium without endpoint routes every pod's route names `cilium_host`, a veth whose peer
/// `cilium_net` is on the host, and which no pod's packets cross.
pub fn host_side(ip: IpAddr, netns: Option<&Path>) -> anyhow::Result<Found> {
    if let Some(dev) = route_dev(ip)? {
        if is_pod_veth(&dev)? {
            return Ok(Found::Route(dev));
        }
    }
    let Some(netns) = netns else {
        bail!(
            "the route to {ip} does not lead to a veth with its peer in another network \
             namespace, and the pod's network namespace is unknown"
        );
    };
    let name = peer_of(ip, netns)?;
    // The pod's interface names its peer by index in the peer's namespace; an ipvlan or macvlan
    // names its parent instead, which may be the host's uplink.
    if !is_pod_veth(&name)? {
        bail!(
            "{name}, the link of {ip}'s interface, is not a veth with its peer in another \
             network namespace"
        );
    }
    Ok(Found::Peer(name))
}

/// The host interface whose index the interface holding `ip` in `netns` names as its link.
fn peer_of(ip: IpAddr, netns: &Path) -> anyhow::Result<String> {
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
    Ok(name.to_string())
}

/// The device of the host's route to `ip`, if any.
fn route_dev(ip: IpAddr) -> anyhow::Result<Option<String>> {
    let routes = ip_json(Command::new("ip").args(["-j", "route", "get", &ip.to_string()]))?;
    Ok(routes[0]["dev"].as_str().map(str::to_string))
}

/// A veth whose peer is in another network namespace, as a pod's is: `ip -d` then gives the
/// peer's namespace id (`link_netnsid`; the kernel assigns one when it reports it).
fn is_pod_veth(dev: &str) -> anyhow::Result<bool> {
    let link = ip_json(Command::new("ip").args(["-j", "-d", "link", "show", "dev", dev]))?;
    let veth = link[0]["linkinfo"]["info_kind"].as_str() == Some("veth");
    Ok(veth && link[0]["link_netnsid"].is_i64())
}

/// The index of the interface `name` in this network namespace, `None` if there is none.
pub fn ifindex(name: &str) -> std::io::Result<Option<u32>> {
    let name = CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index != 0 {
        return Ok(Some(index));
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENODEV) => Ok(None),
        _ => Err(err),
    }
}

fn ip_json(cmd: &mut Command) -> anyhow::Result<Value> {
    let out = cmd.output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    serde_json::from_slice(&out.stdout).context("parsing ip's JSON")
}
