//! Which `networking.istio.io` version serves each kind this agent reads, checked at start.

use anyhow::{bail, Context as _};
use kube::{
    core::ApiResource,
    discovery::{self, ApiGroup},
    Client,
};

pub const GROUP: &str = "networking.istio.io";
pub const KINDS: [&str; 3] = ["ServiceEntry", "WorkloadEntry", "Sidecar"];
/// Watched when served: without their CRDs there are none of them, so nothing is routed
/// through an egress gateway, which is what the cluster says.
pub const ROUTING_KINDS: [&str; 3] = ["Gateway", "VirtualService", "DestinationRule"];
/// Newest first: the first one the API server serves a kind under is used.
const VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];

/// The resource of every kind in [`KINDS`], or an error that names what is missing and how to
/// install it.
pub async fn resources(client: &Client) -> anyhow::Result<Vec<ApiResource>> {
    let group = match discovery::group(client, GROUP).await {
        Ok(group) => group,
        Err(kube::Error::Discovery(err)) => bail!(
            "the API server does not serve {GROUP} ({err}): install Istio, or the CRDs in \
             deploy/crds (kubectl apply -k deploy/ includes them)"
        ),
        Err(err) => return Err(err).context(format!("discovering the API group {GROUP}")),
    };
    choose(&group)
}

fn choose(group: &ApiGroup) -> anyhow::Result<Vec<ApiResource>> {
    let served: Vec<&str> = group.versions().collect();
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for kind in KINDS.into_iter().chain(ROUTING_KINDS) {
        let resource = VERSIONS
            .iter()
            .filter(|v| served.contains(v))
            .find_map(|v| {
                group
                    .versioned_resources(v)
                    .into_iter()
                    .find(|(ar, _)| ar.kind == kind)
            });
        match resource {
            Some((ar, _)) => {
                log::info!("watching {kind} as {}", ar.api_version);
                found.push(ar);
            }
            None if ROUTING_KINDS.contains(&kind) => {
                log::warn!("{GROUP} has no {kind}: nothing is routed through an egress gateway");
            }
            None => missing.push(kind),
        }
    }
    if !missing.is_empty() {
        bail!(
            "{GROUP} (versions served: {}) has no {} under {}: install the CRDs in deploy/crds",
            served.join(", "),
            missing.join(", "),
            VERSIONS.join(", ")
        );
    }
    Ok(found)
}
