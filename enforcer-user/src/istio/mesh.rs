use serde::Deserialize;

/// The parts of Istio's MeshConfig that decide egress.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfig {
    #[serde(default)]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    #[serde(default)]
    pub default_service_export_to: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboundTrafficPolicy {
    #[serde(default)]
    pub mode: Option<OutboundMode>,
    /// A Sidecar's proxy for traffic to unknown destinations (Istio: only with ALLOW_ANY).
    /// Validated, not enforced: ALLOW_ANY lets that traffic through here anyway.
    #[serde(default)]
    pub egress_proxy: Option<EgressProxy>,
}

/// `outboundTrafficPolicy.egressProxy`: a Destination.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct EgressProxy {
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub subset: Option<String>,
    #[serde(default)]
    pub port: Option<PortSelector>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PortSelector {
    #[serde(default)]
    pub number: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundMode {
    /// Istio's default.
    #[default]
    AllowAny,
    RegistryOnly,
    /// `enforcer`'s addition: allow, but report what REGISTRY_ONLY would refuse.
    Audit,
}

impl MeshConfig {
    pub fn mode(&self) -> OutboundMode {
        self.outbound_traffic_policy
            .as_ref()
            .and_then(|p| p.mode)
            .unwrap_or_default()
    }
}

impl std::fmt::Display for OutboundMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::AllowAny => "ALLOW_ANY",
            Self::RegistryOnly => "REGISTRY_ONLY",
            Self::Audit => "AUDIT",
        })
    }
}
