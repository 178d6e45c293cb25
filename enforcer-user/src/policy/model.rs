//! What the compiler produces: per scope (a namespace, or the workloads a Sidecar selects), a
//! mode and the (protocol, port, address) rules.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;
use serde::Serialize;

use super::sidecar::Imports;
use crate::istio::OutboundMode;

/// Transport protocol of a rule. Istio's application protocols all ride on TCP except UDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum L4 {
    Tcp,
    Udp,
}

impl L4 {
    pub fn ip_proto(self) -> u8 {
        match self {
            Self::Tcp => enforcer_common::proto::TCP,
            Self::Udp => enforcer_common::proto::UDP,
        }
    }

    pub fn from_ip_proto(proto: u8) -> Option<Self> {
        match proto {
            enforcer_common::proto::TCP => Some(Self::Tcp),
            enforcer_common::proto::UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for L4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// Allow `l4` traffic to `net` on `port`. A full-length prefix is an exact address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    pub l4: L4,
    pub port: u16,
    pub net: IpNet,
}

impl Rule {
    pub fn new(l4: L4, port: u16, net: IpNet) -> Self {
        Self {
            l4,
            port,
            net: canonical_net(net),
        }
    }

    pub fn host(l4: L4, port: u16, ip: IpAddr) -> Self {
        Self::new(l4, port, IpNet::from(ip))
    }

    pub fn is_exact(&self) -> bool {
        self.net.prefix_len() == self.net.max_prefix_len()
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_exact() {
            write!(f, "{}", crate::net::SocketFmt(self.net.addr(), self.port))?;
        } else {
            write!(f, "{}:{}", self.net, self.port)?;
        }
        write!(f, "/{}", self.l4)
    }
}

/// IPv4-mapped IPv6 is the IPv4 address, so that it cannot be used to slip past a rule.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// A prefix as the kernel sees it. One within `::ffff:0:0/96` (`::ffff:10.0.0.0/104`, or
/// `::ffff:0:0/96` itself) is the IPv4 prefix it maps. Istio reads it as IPv6 and so matches
/// nothing with it, since no IPv6 destination is IPv4-mapped on the wire; but here the only
/// traffic it can describe is IPv4 (a `connect()` of an IPv6 socket to `::ffff:a.b.c.d` is IPv4
/// to `a.b.c.d`, and the hooks see it so), mapped addresses are IPv4 everywhere else too
/// ([`canonical_ip`], endpoints), and the writer named those IPv4 addresses on purpose. A
/// shorter IPv6 prefix that merely covers `::ffff:0:0/96` stays IPv6 and never matches IPv4:
/// see `net::key_nets`.
pub fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).map_or(net, |n| n.trunc()),
            None => net.trunc(),
        },
        _ => net.trunc(),
    }
}

/// Why a rule exists: the ServiceEntry (`namespace/name`) and, for resolved names, the host.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Origin {
    pub service_entry: String,
    pub host: Option<String>,
}

impl Origin {
    pub fn builtin(what: &str) -> Self {
        Self {
            service_entry: format!("(built-in: {what})"),
            host: None,
        }
    }
}

/// What one scope (a namespace, or the workloads one Sidecar selects in it) may reach.
/// Origins are shared: one entry can produce 100,000 rules, and they all name the same object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScopePolicy {
    pub namespace: String,
    /// The Sidecar in force (`namespace/name`), if any.
    pub sidecar: Option<String>,
    pub mode: OutboundMode,
    /// Each rule with the (usually one or two) origins that ask for it.
    pub rules: BTreeMap<Rule, Vec<Arc<Origin>>>,
    /// The Sidecar's `egress` imports; `None` imports everything visible.
    pub imports: Option<Arc<Imports>>,
    /// The hosts whose addresses, as workloads' own DNS answers give them, this scope may reach
    /// (issue 14; nothing feeds them yet), and on which ports.
    pub learn: Vec<crate::dns::learn::LearnRule>,
    /// For the workloads of egress gateways: `Gateway namespace/name`, the Gateways whose
    /// selector chose them. Such a scope reaches only what routes bound to them name.
    pub gateway: Option<String>,
    /// Destinations a VirtualService routes through an egress gateway (TCP).
    pub redirects: BTreeMap<RedirectKey, Arc<GatewayRoute>>,
}

/// A destination routed through an egress gateway: a port of an address, or (port 0, under
/// `--egress-gateway-only`) every other port and protocol of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RedirectKey {
    pub port: u16,
    pub ip: IpAddr,
}

/// Why and where a destination goes through a gateway.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GatewayRoute {
    /// `namespace/name` of the VirtualService.
    pub virtual_service: String,
    /// `namespace/name` of the Gateway its other routes bind to.
    pub gateway: String,
    /// The host whose address this is.
    pub host: String,
    pub via: Via,
}

impl GatewayRoute {
    /// Why a connection to `ip`:`port` that this route covers was refused.
    pub fn refusal(&self, ip: IpAddr, port: u16) -> String {
        let dst = crate::net::SocketFmt(ip, port);
        let (vs, gw, host) = (&self.virtual_service, &self.gateway, &self.host);
        match &self.via {
            Via::Refused(why) => format!(
                "{dst} ({host}) is routed through egress gateway {gw} by VirtualService {vs}, but not taken there: {why}"
            ),
            Via::Gateway(_) => format!(
                "{dst} ({host}) is routed through egress gateway {gw} by VirtualService {vs}; only the gateway's workloads connect to it directly, and this packet went around the gateway"
            ),
            Via::GatewayOnly => format!(
                "{host} ({dst}) is routed through egress gateway {gw} by VirtualService {vs}, and --egress-gateway-only refuses its other ports and protocols to all but the gateway's workloads"
            ),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Via {
    /// The gateway's endpoints (or its Service address), on the port they listen on.
    Gateway(Vec<std::net::SocketAddr>),
    /// Refused: the kernel cannot take the connection where the route says, for this reason.
    Refused(String),
    /// Every port and protocol but the routed ones (`--egress-gateway-only`).
    GatewayOnly,
}

/// The scope of workloads in `namespace` that the Sidecar `sidecar` selects is
/// `namespace/sidecar`; the namespace's own scope is its name. Names are kept under 64 bytes
/// (the pinned name map's key), with a stable hash when a Sidecar name is long.
/// Two long names can still share one (see `compile`, which refuses both).
pub fn scope_name(namespace: &str, sidecar: Option<&str>) -> String {
    scope_name_with(namespace, sidecar, crate::stable_hash::fnv1a)
}

/// [`scope_name`] with the hash given, so that tests can make names collide.
pub(super) fn scope_name_with(
    namespace: &str,
    sidecar: Option<&str>,
    hash: fn(&[u8]) -> u64,
) -> String {
    let Some(name) = sidecar else {
        return namespace.to_string();
    };
    let full = format!("{namespace}/{name}");
    if full.len() < 64 {
        return full;
    }
    let hash = hash(full.as_bytes());
    format!("{}/~{hash:016x}", prefix(namespace, 44))
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary: valid
/// namespaces are ASCII, but this must not panic on one that is not.
fn prefix(s: &str, max: usize) -> &str {
    let end = (0..=max.min(s.len()))
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    s.get(..end).unwrap_or_default()
}

/// A host name some ServiceEntry declares, and where it is visible: used to explain refusals.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HostRef {
    pub host: String,
    pub service_entry: String,
    /// `None` means every namespace.
    pub visible_to: Option<BTreeSet<String>>,
}

/// Kubernetes labels, or a selector's.
pub type Labels = BTreeMap<String, String>;

/// The whole desired state, before scope ids and cgroups are attached.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// By scope name (see [`scope_name`]). Every namespace the agent knows about has one.
    pub scopes: BTreeMap<String, ScopePolicy>,
    /// Per namespace, the selecting Sidecars' scopes in precedence order (oldest first).
    pub selectors: BTreeMap<String, Vec<(Labels, String)>>,
    /// Allowed for every scope, on every port and protocol (loopback, `--allow-cidr`).
    pub global: BTreeSet<IpNet>,
    /// Resolved address to the declared hosts it came from.
    pub hosts_by_ip: BTreeMap<IpAddr, Vec<Arc<HostRef>>>,
    /// Things that are valid but cannot be fully enforced, such as an unresolved host.
    pub notes: Vec<String>,
}

impl Desired {
    /// The scope of a workload: the first Sidecar that selects its labels, else its namespace.
    pub fn scope_for(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Option<&str> {
        self.selectors
            .get(namespace)
            .and_then(|list| {
                list.iter()
                    .find(|(selector, _)| super::sidecar::selects(selector, labels))
            })
            .map(|(_, scope)| scope.as_str())
            .or_else(|| {
                self.scopes
                    .get_key_value(namespace)
                    .map(|(k, _)| k.as_str())
            })
    }
}
