//! EndpointSlices as the agent stores them: only what the registry reads. Every node holds
//! every slice of the cluster, and k8s-openapi's `Endpoint` carries some 350 bytes of fields
//! besides its addresses (conditions, hints, topology, target reference), which at 10,000
//! Services of 10 endpoints was most of the agent's memory. Unknown fields are skipped while
//! deserialising, so they are never held at all.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// `discovery.k8s.io/v1` EndpointSlice, the parts the registry reads.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct EndpointSlice {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    #[serde(default)]
    pub ports: Option<Vec<EndpointPort>>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct Endpoint {
    #[serde(default)]
    pub addresses: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct EndpointPort {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub port: Option<i32>,
    #[serde(default)]
    pub protocol: Option<String>,
}

impl kube::Resource for EndpointSlice {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "EndpointSlice".into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        "discovery.k8s.io".into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        "endpointslices".into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_registry_reads_and_nothing_else() {
        let slice: EndpointSlice = serde_yaml::from_str(
            "metadata: {name: s, namespace: a, labels: {kubernetes.io/service-name: s}}\n\
             addressType: IPv4\n\
             endpoints: [{addresses: [10.0.0.4], conditions: {ready: true}, nodeName: n1, targetRef: {kind: Pod, name: p}}]\n\
             ports: [{name: http, port: 8080, protocol: TCP}]",
        )
        .expect("a slice");
        assert_eq!(slice.endpoints[0].addresses, ["10.0.0.4"]);
        let port = &slice.ports.as_deref().unwrap_or_default()[0];
        assert_eq!(
            (port.name.as_deref(), port.port),
            (Some("http"), Some(8080))
        );
        assert_eq!(
            <EndpointSlice as kube::Resource>::api_version(&()),
            "discovery.k8s.io/v1"
        );
    }
}
