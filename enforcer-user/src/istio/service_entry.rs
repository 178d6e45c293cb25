use serde::Deserialize;

/// `spec` of a `networking.istio.io` ServiceEntry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub ports: Vec<Port>,
    #[serde(default)]
    pub location: Option<String>,
    #[serde(default)]
    pub resolution: Resolution,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub export_to: Option<Vec<String>>,
    #[serde(default)]
    pub workload_selector: Option<super::WorkloadSelector>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    pub number: u32,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub target_port: Option<u32>,
}

/// An endpoint in `spec.endpoints`: Istio defines it as an inline WorkloadEntry.
pub type Endpoint = super::WorkloadEntrySpec;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    /// Istio's default when the field is absent.
    #[default]
    None,
    Static,
    Dns,
    DnsRoundRobin,
}
