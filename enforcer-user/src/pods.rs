//! Local pods for `enforcer exec --netns`: a network namespace joined to the host by a veth that
//! the agent creates, addresses (a /30 from `--pod-cidr`: host .1, pod .2; with `--pod-cidr6`
//! also a /126: host ::1, pod ::2) and routes, with the
//! TC program on the host side. `exec` asks by writing `<dir>/<netns>.json`; the agent answers
//! with `<dir>/<netns>.ready` ("<address> <pid of the request>") once the pod is enforced, so that
//! a request never takes the answer to an earlier one of the same name, and removes the pod
//! when the request goes or its process dies.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};
use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::datapath::{plan::PodAssignment, Datapath};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRequest {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// The requesting process; the pod goes when it does.
    pub pid: u32,
}

struct Pod {
    request: PodRequest,
    index: u32,
    host_if: String,
    ip: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
    ready: bool,
}

/// Where pod requests arrive and which addresses pods get.
#[derive(Clone, Debug)]
pub struct PodNetwork {
    pub dir: PathBuf,
    pub v4: Ipv4Net,
    pub v6: Option<Ipv6Net>,
}

pub struct Pods {
    dir: PathBuf,
    cidr: Ipv4Net,
    cidr6: Option<Ipv6Net>,
    pin_root: PathBuf,
    live: BTreeMap<String, Pod>,
}

/// Whether `<name>.ready` answers the request of `pid`.
pub fn answers(ready: &Path, pid: u32) -> bool {
    std::fs::read_to_string(ready)
        .is_ok_and(|text| text.split_whitespace().nth(1) == Some(pid.to_string().as_str()))
}

/// A network namespace name a request may use.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl Pods {
    pub fn new(net: PodNetwork, pin_root: PathBuf) -> anyhow::Result<Self> {
        let dir = net.dir;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            dir,
            cidr: net.v4.trunc(),
            cidr6: net.v6.map(|n| n.trunc()),
            pin_root,
            live: BTreeMap::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates pods for new requests and removes those whose request or process is gone.
    /// Returns whether anything changed.
    pub fn reconcile(&mut self, dp: &mut Datapath) -> bool {
        let wanted = self.requests();
        let mut changed = false;
        let gone: Vec<String> = self
            .live
            .iter()
            .filter(|(name, pod)| {
                wanted.get(*name) != Some(&pod.request) || !alive(pod.request.pid)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(pod) = self.live.remove(&name) {
                self.remove(&name, &pod, dp);
                changed = true;
            }
        }
        for (name, request) in wanted {
            if self.live.contains_key(&name) || !alive(request.pid) {
                continue;
            }
            match self.create(&name, request, dp) {
                Ok(pod) => {
                    log::info!(
                        "pod {name}: {}{} in namespace {} via {}",
                        pod.ip,
                        pod.ip6.map(|ip| format!(" {ip}")).unwrap_or_default(),
                        pod.request.namespace,
                        pod.host_if
                    );
                    self.live.insert(name, pod);
                    changed = true;
                }
                Err(err) => log::error!("pod {name}: {err:#}"),
            }
        }
        changed
    }

    /// Tells waiting `exec`s that their pods are enforced (call after the maps are applied).
    pub fn mark_ready(&mut self) {
        for (name, pod) in self.live.iter_mut().filter(|(_, p)| !p.ready) {
            let path = self.dir.join(format!("{name}.ready"));
            match std::fs::write(&path, format!("{} {}", pod.ip, pod.request.pid)) {
                Ok(()) => pod.ready = true,
                Err(err) => log::warn!("writing {}: {err}", path.display()),
            }
        }
    }

    pub fn assignments(&self) -> Vec<PodAssignment> {
        self.live
            .iter()
            .flat_map(|(name, p)| {
                let v6 = p.ip6.map(IpAddr::V6);
                [Some(IpAddr::V4(p.ip)), v6]
                    .into_iter()
                    .flatten()
                    .map(|ip| PodAssignment {
                        ip,
                        namespace: p.request.namespace.clone(),
                        labels: p.request.labels.clone(),
                        pod: Some(name.clone()),
                    })
            })
            .collect()
    }

    fn requests(&self) -> BTreeMap<String, PodRequest> {
        let mut out = BTreeMap::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            let parsed = std::fs::read(&path)
                .map_err(anyhow::Error::from)
                .and_then(|b| Ok(serde_json::from_slice::<PodRequest>(&b)?));
            match parsed {
                Ok(req) if valid_name(name) => {
                    out.insert(name.to_string(), req);
                }
                Ok(_) => log::warn!("{}: not a valid netns name", path.display()),
                Err(err) => log::debug!("{}: {err}", path.display()),
            }
        }
        out
    }

    fn create(&self, name: &str, request: PodRequest, dp: &mut Datapath) -> anyhow::Result<Pod> {
        let used: Vec<u32> = self.live.values().map(|p| p.index).collect();
        let blocks = 1u32 << (32 - u32::from(self.cidr.prefix_len())).saturating_sub(2);
        let index = (0..blocks)
            .find(|i| !used.contains(i))
            .context("--pod-cidr is full")?;
        let base = u32::from(self.cidr.network()) + index * 4;
        let (host_ip, pod_ip) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
        let v6 = match self.cidr6 {
            Some(net) => {
                let base = u128::from(net.network()) + u128::from(index) * 4;
                anyhow::ensure!(
                    net.contains(&Ipv6Addr::from(base + 3)),
                    "--pod-cidr6 is full"
                );
                Some((Ipv6Addr::from(base + 1), Ipv6Addr::from(base + 2)))
            }
            None => None,
        };
        // Unique per agent (pods directory), within the 15 bytes of an interface name.
        let tag = crate::stable_hash::fnv1a(self.dir.as_os_str().as_encoded_bytes()) & 0x00ff_ffff;
        let host_if = format!("e{tag:06x}p{index}");
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        let pod = Pod {
            request,
            index,
            host_if: host_if.clone(),
            ip: pod_ip,
            ip6: v6.map(|(_, pod)| pod),
            ready: false,
        };
        let made = (|| {
            ip(&["netns", "add", name])?;
            ip(&[
                "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", name,
            ])?;
            ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if])?;
            if v6.is_some() {
                // Without duplicate address detection both ends are usable at once (CNIs do
                // the same): nothing else can be on a point-to-point veth.
                let dad = format!("/proc/sys/net/ipv6/conf/{host_if}/accept_dad");
                std::fs::write(&dad, "0").with_context(|| format!("writing {dad}"))?;
                run(Command::new("ip")
                    .args(["netns", "exec", name, "sysctl", "-qw"])
                    .arg("net.ipv6.conf.eth0.accept_dad=0"))?;
            }
            ip(&["link", "set", &host_if, "up"])?;
            ip(&[
                "-n",
                name,
                "addr",
                "add",
                &format!("{pod_ip}/30"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", name, "link", "set", "eth0", "up"])?;
            ip(&["-n", name, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                name,
                "route",
                "add",
                "default",
                "via",
                &host_ip.to_string(),
            ])?;
            // The node routes for its pods, as every CNI has it do.
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                .context("enabling IPv4 forwarding")?;
            if let Some((host6, pod6)) = v6 {
                let (host6, pod6) = (format!("{host6}/126"), format!("{pod6}/126"));
                ip(&["-6", "addr", "add", &host6, "dev", &host_if, "nodad"])?;
                ip(&[
                    "-n", name, "-6", "addr", "add", &pod6, "dev", "eth0", "nodad",
                ])?;
                let via = host6.trim_end_matches("/126");
                ip(&["-n", name, "-6", "route", "add", "default", "via", via])?;
                std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
                    .context("enabling IPv6 forwarding")?;
            }
            let addrs: Vec<IpAddr> = std::iter::once(IpAddr::V4(pod_ip))
                .chain(v6.map(|(_, pod)| IpAddr::V6(pod)))
                .collect();
            dp.attach_tc(&host_if, &addrs, &self.pin_root)
        })();
        if let Err(err) = made {
            self.remove(name, &pod, dp);
            return Err(err);
        }
        Ok(pod)
    }

    /// Deleting the namespace deletes the veth pair, which detaches the TC program.
    fn remove(&self, name: &str, pod: &Pod, dp: &mut Datapath) {
        let ifindex = crate::veth::ifindex(&pod.host_if)
            .ok()
            .flatten()
            .unwrap_or(0);
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &pod.host_if])
            .output();
        dp.forget_tc_of(&pod.host_if, ifindex, &self.pin_root);
        let _ = std::fs::remove_file(self.dir.join(format!("{name}.ready")));
        log::info!("pod {name} removed ({} detached)", pod.host_if);
    }
}

/// Removes every pod an agent made with this directory (for `enforcer teardown`).
pub fn remove_all(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let name = path
            .file_stem()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if valid_name(name) {
            // Deleting the pair from inside: the namespace lives on while a process is in it.
            let _ = Command::new("ip")
                .args(["-n", name, "link", "del", "eth0"])
                .output();
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
        let _ = std::fs::remove_file(&path);
    }
    let _ = std::fs::remove_dir(dir);
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
        bail!(
            "{} {}: {}",
            cmd.get_program().to_string_lossy(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
