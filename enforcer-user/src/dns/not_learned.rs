//! What is not learned, and why: the addresses no answer may open, and the reason a refusal
//! in a learning scope gives.

use ipnet::IpNet;

/// Why an address a learning scope was refused is not allowed by what it learned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotLearned {
    /// In no answer to this scope's workloads since the agent started.
    NeverAnswered,
    /// Answered for a name no ServiceEntry visible to the scope declares.
    Undeclared {
        name: String,
    },
    Expired {
        name: String,
        ago_s: u64,
    },
    /// Learned for this name, on other ports only.
    OtherPort {
        name: String,
    },
    /// Another scope learned it; this one did not.
    OtherScope {
        name: String,
        scope: String,
    },
}

impl NotLearned {
    /// A stable code for records.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NeverAnswered => "never_answered",
            Self::Undeclared { .. } => "undeclared_name",
            Self::Expired { .. } => "expired",
            Self::OtherPort { .. } => "other_port",
            Self::OtherScope { .. } => "other_scope",
        }
    }
}

impl std::fmt::Display for NotLearned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NeverAnswered => write!(f, "the address was in no DNS answer this workload's scope received through the agent's DNS proxy (a hard-coded address, an application's cache older than the grace, DNS over HTTPS or TLS, or a resolver the agent does not proxy?)"),
            Self::Undeclared { name } => write!(f, "the address was answered for {name}, which no ServiceEntry visible to this scope declares"),
            Self::Expired { name, ago_s } => write!(f, "the address was learned for {name} and expired {ago_s} s ago"),
            Self::OtherPort { name } => write!(f, "the address was learned for {name}, whose ServiceEntries declare other ports"),
            Self::OtherScope { name, scope } => write!(f, "the address was learned for {name} by scope {scope} only"),
        }
    }
}

/// Addresses no answer may open: a name's owner could otherwise point it at the node itself,
/// the cloud's metadata service, or link-local neighbours.
pub fn default_deny() -> Vec<IpNet> {
    [
        "0.0.0.0/8",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "224.0.0.0/3",
        "::/127",
        "::ffff:0:0/96",
        "fe80::/10",
        "ff00::/8",
    ]
    .iter()
    .filter_map(|s| s.parse().ok())
    .collect()
}
