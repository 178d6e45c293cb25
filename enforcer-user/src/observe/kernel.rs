//! The kernel's counters, read from the pinned maps at each scrape: verdicts per scope (every
//! connection, datagram and new flow an enforced workload makes, allowed ones too) and the
//! records lost. Per-CPU values are summed.

use std::{collections::BTreeMap, path::PathBuf};

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use enforcer_common::{counter, map_names, verdict_count, verdict_slot, ScopeName};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

use crate::datapath::open_pinned;

/// This collector's metrics: (name, whether it is a counter, whose samples end in `_total`).
#[cfg(test)]
pub const METRICS: [(&str, bool); 3] = [
    (READABLE, false),
    (VERDICTS_TOTAL, true),
    (RECORDS_LOST, true),
];
const READABLE: &str = "kernel_maps_readable";
const VERDICTS_TOTAL: &str = "verdicts";
const RECORDS_LOST: &str = "records_lost";

#[derive(Debug)]
pub struct KernelCollector {
    pin_root: PathBuf,
}

/// What one scrape read.
#[derive(Default)]
struct Read {
    /// (scope name, verdict, hook class) to count.
    verdicts: BTreeMap<(String, &'static str, &'static str), u64>,
    ring_full: u64,
    rate_limited: u64,
}

const VERDICTS: [(u32, &str); 4] = [
    (verdict_count::ALLOWED, "allowed"),
    (verdict_count::DENIED, "denied"),
    (verdict_count::AUDIT, "audit"),
    (verdict_count::REVOKED, "revoked"),
];

impl KernelCollector {
    pub fn new(pin_root: PathBuf) -> Self {
        Self { pin_root }
    }

    fn read(&self) -> anyhow::Result<Read> {
        let open = |name| -> anyhow::Result<Map> {
            let data: MapData = open_pinned(&self.pin_root, name)?;
            Ok(match name {
                map_names::SCOPE_NAMES => Map::HashMap(data),
                _ => Map::PerCpuArray(data),
            })
        };
        let names: HashMap<MapData, ScopeName, u32> =
            HashMap::try_from(open(map_names::SCOPE_NAMES)?)?;
        let verdicts: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(open(map_names::VERDICTS)?)?;
        let counters: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(open(map_names::COUNTERS)?)?;
        let sum = |map: &PerCpuArray<MapData, u64>, index: u32| -> u64 {
            map.get(&index, 0)
                .map(|values| values.iter().sum())
                .unwrap_or(0)
        };
        let mut read = Read {
            ring_full: sum(&counters, counter::RING_FULL),
            rate_limited: sum(&counters, counter::RATE_LIMITED),
            ..Read::default()
        };
        for (key, id) in names.iter().filter_map(Result::ok) {
            let end = key
                .name
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(key.name.len());
            let scope = String::from_utf8_lossy(&key.name[..end]).into_owned();
            for (class, base) in [("socket", 0), ("tc", verdict_count::TC)] {
                for (offset, verdict) in VERDICTS {
                    let n = sum(&verdicts, verdict_slot(id, base + offset));
                    if n > 0 {
                        *read
                            .verdicts
                            .entry((scope.clone(), verdict, class))
                            .or_default() += n;
                    }
                }
            }
        }
        Ok(read)
    }
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let read = self.read();
        let readable = ConstGauge::new(i64::from(read.is_ok()));
        readable.encode(encoder.encode_descriptor(
            READABLE,
            "1 when the pinned maps the kernel counts in could be read",
            None,
            readable.metric_type(),
        )?)?;
        let Ok(read) = read else {
            return Ok(());
        };
        let family = ConstCounter::new(0u64).metric_type();
        let mut verdicts = encoder.encode_descriptor(
            VERDICTS_TOTAL,
            "Connections, datagrams (socket hooks) and new flows (TC) of enforced workloads, by scope and verdict",
            None,
            family,
        )?;
        for ((scope, verdict, hook), n) in &read.verdicts {
            let namespace = scope.split('/').next().unwrap_or_default().to_string();
            let labels = [
                ("namespace", namespace),
                ("scope", scope.clone()),
                ("verdict", (*verdict).to_string()),
                ("hook", (*hook).to_string()),
            ];
            ConstCounter::new(*n).encode(verdicts.encode_family(&labels)?)?;
        }
        let mut lost = encoder.encode_descriptor(
            RECORDS_LOST,
            "Refusal records the kernel did not make: over a scope's budget, or the ring buffer full",
            None,
            family,
        )?;
        for (why, n) in [
            ("rate_limited", read.rate_limited),
            ("ring_full", read.ring_full),
        ] {
            ConstCounter::new(n).encode(lost.encode_family(&[("reason", why)])?)?;
        }
        Ok(())
    }
}
