//! Prometheus metrics of `vaultd`, served as text at `GET /metrics` by the
//! HTTP shim.
//!
//! One registry per process ([`global`]): the protocol server counts
//! redemptions and times durable writes, the shim counts HTTP requests and
//! authorization decisions. Labels never carry subject ids, partner ids,
//! keys or tokens: only routes, status codes, operations and reasons, so
//! that the number of series stays bounded and nothing personal leaks.

use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::live::LiveVault;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `granted` or `denied`.
    pub outcome: &'static str,
    /// The denial code, or `none`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `ok`, or the error code sent.
    pub outcome: &'static str,
}

/// A TLS handshake's port (`protocol` or `http`) and outcome (`full`,
/// `resumed`, `failed` or `timeout`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub port: &'static str,
    pub outcome: &'static str,
}

/// Why a connection was closed before it held a slot, and on which
/// port (`protocol` or `http`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TurnedAwayLabels {
    pub port: &'static str,
    /// `evicted`: closed in its handshake, or refused while it waited for
    /// a slot, to make room for a newer one; `busy`: authenticated, but
    /// no slot came free within the handshake's window;
    /// `credential_limit` (protocol port): the credential already held
    /// its most connections; `peer_limit` (HTTP port): the client
    /// address already held its most connections.
    pub reason: &'static str,
}

/// A port (`protocol` or `http`) and the state of its open connections.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub port: &'static str,
    /// `handshake`: before a slot (PROXY header, TLS, `Hello` or the
    /// first request's headers, or waiting for a slot once
    /// authenticated); `served`: holding one of the port's slots.
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteOnly {
    pub route: String,
}

/// Latency buckets from 50 µs to about 3.3 s.
#[derive(Clone, Copy, Debug)]
pub struct LatencyBuckets;

impl MetricConstructor<Histogram> for LatencyBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(exponential_buckets(0.000_05, 2.0, 17))
    }
}

/// Every metric of the process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<RouteLabels, Counter>,
    pub http_seconds: Family<RouteOnly, Histogram, LatencyBuckets>,
    pub authorizations: Family<DecisionLabels, Counter>,
    pub redemptions: Family<OutcomeLabels, Counter>,
    /// Durable writes of the protocol server (`append`, `append_batch`,
    /// `event`, `mint`, `redeem`):
    /// from request to receipt, i.e. including the group commit.
    pub commit_seconds: Family<OpLabels, Histogram, LatencyBuckets>,
    /// Requests of the shim to the vault, by operation.
    pub vault_seconds: Family<OpLabels, Histogram, LatencyBuckets>,
    pub log_entries: Gauge,
    /// 1 when the vault answered the last scrape's health request in
    /// time, 0 otherwise (`log_entries` is then the count read before).
    pub vault_up: Gauge,
    /// TLS handshakes by port and outcome: how many partners resume their
    /// sessions, and how many connections fail or time out in TLS.
    pub tls_handshakes: Family<HandshakeLabels, Counter>,
    /// Connections closed before they held a slot, by port and reason:
    /// the connection limits at work.
    pub turned_away: Family<TurnedAwayLabels, Counter>,
    /// Connections open, by port and state; and the most each state may
    /// hold (`max_handshakes`, `max_connections`), so that a dashboard
    /// sees a port near its limits before connections are turned away.
    pub connections: Family<ConnectionLabels, Gauge>,
    pub connections_limit: Family<ConnectionLabels, Gauge>,
    /// PROXY protocol headers on port 9999 by outcome: a misconfigured
    /// trusted proxy shows as refusals.
    pub proxy_headers: Family<OutcomeLabels, Counter>,
    /// Requests to the shim from trusted HTTP proxies by what their
    /// forwarding header said: a misconfigured proxy shows as refusals.
    pub forwarded_headers: Family<OutcomeLabels, Counter>,
    /// Reloads of the TLS certificate, key and client CA on SIGHUP, by
    /// outcome.
    pub tls_reloads: Family<OutcomeLabels, Counter>,
    /// When the served TLS chain expires (Unix seconds; 0 in plaintext).
    pub tls_certificate_expiry: Gauge,
    /// The vault whose commit pipeline is reported at each scrape.
    pipeline: PipelineSource,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("fintrust");
        let m = Metrics {
            registry: Registry::default(),
            http_requests: Family::default(),
            http_seconds: Family::new_with_constructor(LatencyBuckets),
            authorizations: Family::default(),
            redemptions: Family::default(),
            commit_seconds: Family::new_with_constructor(LatencyBuckets),
            vault_seconds: Family::new_with_constructor(LatencyBuckets),
            log_entries: Gauge::default(),
            vault_up: Gauge::default(),
            tls_handshakes: Family::default(),
            turned_away: Family::default(),
            connections: Family::default(),
            connections_limit: Family::default(),
            proxy_headers: Family::default(),
            forwarded_headers: Family::default(),
            tls_reloads: Family::default(),
            tls_certificate_expiry: Gauge::default(),
            pipeline: PipelineSource::default(),
        };
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            m.http_requests.clone(),
        );
        registry.register(
            "http_request_seconds",
            "HTTP request latency by route",
            m.http_seconds.clone(),
        );
        registry.register(
            "authorizations",
            "Authorization decisions by outcome and denial reason",
            m.authorizations.clone(),
        );
        registry.register(
            "redemptions",
            "Token redemptions by outcome",
            m.redemptions.clone(),
        );
        registry.register(
            "commit_seconds",
            "Durable writes of the protocol server, request to receipt, by operation",
            m.commit_seconds.clone(),
        );
        registry.register(
            "vault_request_seconds",
            "Requests of the HTTP shim to the vault, by operation",
            m.vault_seconds.clone(),
        );
        registry.register(
            "log_entries",
            "Durable entries in the log",
            m.log_entries.clone(),
        );
        registry.register(
            "vault_up",
            "1 when the vault answered this scrape's health request within 1 s, 0 otherwise (fintrust_log_entries is then the count read before)",
            m.vault_up.clone(),
        );
        registry.register(
            "tls_handshakes",
            "TLS handshakes by port and outcome (full, resumed, failed, timeout)",
            m.tls_handshakes.clone(),
        );
        registry.register(
            "connections_turned_away",
            "Connections closed before they held a slot, by port and reason (evicted: to make room for a newer handshake; busy: no slot free within the handshake's window; credential_limit: the credential already held its most connections; peer_limit, on the HTTP port: the client address already held its most connections)",
            m.turned_away.clone(),
        );
        registry.register(
            "connections",
            "Connections open, by port and state (handshake: before a slot, waiting for one included; served: holding a slot)",
            m.connections.clone(),
        );
        registry.register(
            "connections_limit",
            "The most connections each state may hold, by port (handshake: max_handshakes; served: max_connections)",
            m.connections_limit.clone(),
        );
        registry.register(
            "proxy_headers",
            "PROXY protocol headers from trusted TCP proxies by outcome (proxied, local, refused, timeout, closed: the connection ended before its first byte)",
            m.proxy_headers.clone(),
        );
        registry.register(
            "forwarded_headers",
            "Requests from trusted HTTP proxies by what their X-Forwarded-For or Forwarded said (forwarded: a client named, none: no client named, refused)",
            m.forwarded_headers.clone(),
        );
        registry.register(
            "tls_reloads",
            "Reloads of the TLS certificate, key and client CA on SIGHUP by outcome (reloaded, failed: what was served before stays)",
            m.tls_reloads.clone(),
        );
        registry.register(
            "tls_certificate_expiry_seconds",
            "When the served TLS certificate chain expires: the earliest notAfter of its certificates, in seconds since the Unix epoch (0 in plaintext)",
            m.tls_certificate_expiry.clone(),
        );
        registry.register_collector(Box::new(m.pipeline.clone()));
        Metrics { registry, ..m }
    }

    /// Reports the commit pipeline of `vault` (whichever vault is in
    /// service, across reopens) from now on: groups, write-ahead
    /// `fdatasync`s and their durations, index writes, overlay keys
    /// (`storage::stats`).
    pub fn watch_vault(&self, vault: LiveVault) {
        if let Ok(mut w) = self.pipeline.0.write() {
            *w = Some(vault);
        }
    }

    /// The commit pipeline of the vault of [`Metrics::watch_vault`], if
    /// one is in service.
    pub fn pipeline_stats(&self) -> Option<storage::PipelineStats> {
        self.pipeline.stats()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Records a durable write of the protocol server.
    pub fn commit(&self, op: &'static str, took: Duration) {
        self.commit_seconds
            .get_or_create(&OpLabels { op })
            .observe(took.as_secs_f64());
    }
}

/// The vault of [`Metrics::watch_vault`], read at each scrape.
#[derive(Debug, Clone, Default)]
struct PipelineSource(Arc<RwLock<Option<LiveVault>>>);

impl PipelineSource {
    /// The watched vault's counts; `None` with no vault watched, or while
    /// it is reopened.
    fn stats(&self) -> Option<storage::PipelineStats> {
        let vault = self.0.read().ok()?.as_ref()?.get()?;
        Some(vault.pipeline_stats())
    }
}

impl Collector for PipelineSource {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // None while the vault is reopened: the series pause.
        match self.stats() {
            Some(stats) => encode_pipeline(&mut encoder, &stats),
            None => Ok(()),
        }
    }
}

/// `s` as Prometheus metrics.
fn encode_pipeline(
    encoder: &mut DescriptorEncoder,
    s: &storage::PipelineStats,
) -> Result<(), std::fmt::Error> {
    let counters = [
        (
            "commit_groups",
            "Commit groups made durable and answered since the vault was opened",
            s.groups,
        ),
        (
            "wal_syncs",
            "fdatasyncs of the write-ahead file since the vault was opened (each serves every group written before it)",
            s.syncs,
        ),
        (
            "index_writes",
            "Writes of derived state to sled by the indexer since the vault was opened",
            s.index_writes,
        ),
        (
            "index_keys",
            "Keys of derived state those writes inserted into sled or removed from it",
            s.index_keys,
        ),
    ];
    for (name, help, value) in counters {
        let c = ConstCounter::new(value);
        c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
    }
    let g = ConstGauge::new(i64::try_from(s.overlay_keys).unwrap_or(i64::MAX));
    g.encode(encoder.encode_descriptor(
        "overlay_keys",
        "Keys of derived state waiting in memory for the indexer's next write",
        None,
        g.metric_type(),
    )?)?;
    // The encoder sums the buckets itself: give each its own count.
    let buckets: Vec<(f64, u64)> = s
        .sync_bucket_counts()
        .map(|(bound, own)| (bound.unwrap_or(f64::MAX), own))
        .collect();
    // The count is the last bucket's, read with the others: a sync
    // counted between two reads of the snapshot must not make the `+Inf`
    // bucket and the count disagree.
    let count = s.sync_buckets.last().copied().unwrap_or(0);
    encoder
        .encode_descriptor(
            "wal_sync_seconds",
            "Duration of each fdatasync of the write-ahead file",
            None,
            MetricType::Histogram,
        )?
        .encode_histogram::<NoLabelSet>(s.sync_seconds, count, &buckets, None)
}

/// Counts a connection closed before it held a slot
/// ([`Metrics::turned_away`]).
pub fn turned_away(port: &'static str, reason: &'static str) {
    global()
        .turned_away
        .get_or_create(&TurnedAwayLabels { port, reason })
        .inc();
}

/// How many connections [`turned_away`] has counted for `port` and `reason`.
pub fn turned_away_count(port: &'static str, reason: &'static str) -> u64 {
    global()
        .turned_away
        .get_or_create(&TurnedAwayLabels { port, reason })
        .get()
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A collector of fixed pipeline counts, to see them encoded.
    #[derive(Debug)]
    struct Fixed(storage::PipelineStats);

    impl Collector for Fixed {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            encode_pipeline(&mut encoder, &self.0)
        }
    }

    #[test]
    fn the_commit_pipeline_renders_as_counters_a_gauge_and_a_histogram() {
        // Cumulative: one sync of at most 50 µs, two of at most 100 µs,
        // three of at most 3.2 ms, four in all (one beyond the bounds).
        let mut buckets = vec![1, 2, 2, 2, 2, 2];
        buckets.extend([3; 11]);
        buckets.push(4);
        let stats = storage::PipelineStats {
            groups: 6,
            syncs: 4,
            sync_seconds: 10.5,
            sync_buckets: buckets,
            index_writes: 1,
            index_keys: 300,
            overlay_keys: 7,
        };
        let mut registry = Registry::with_prefix("fintrust");
        registry.register_collector(Box::new(Fixed(stats)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for line in [
            "fintrust_commit_groups_total 6",
            "fintrust_wal_syncs_total 4",
            "fintrust_index_writes_total 1",
            "fintrust_index_keys_total 300",
            "fintrust_overlay_keys 7",
            "fintrust_wal_sync_seconds_sum 10.5",
            "fintrust_wal_sync_seconds_count 4",
            r#"fintrust_wal_sync_seconds_bucket{le="0.00005"} 1"#,
            r#"fintrust_wal_sync_seconds_bucket{le="0.0001"} 2"#,
            r#"fintrust_wal_sync_seconds_bucket{le="0.0032"} 3"#,
            r#"fintrust_wal_sync_seconds_bucket{le="+Inf"} 4"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} in:\n{text}");
        }
    }

    #[test]
    fn renders_prometheus_text() {
        let m = global();
        m.http_requests
            .get_or_create(&RouteLabels {
                route: "/v1/authorize".into(),
                status: 200,
            })
            .inc();
        m.commit("append", Duration::from_micros(300));
        let text = m.render();
        assert!(
            text.contains("fintrust_http_requests_total{route=\"/v1/authorize\",status=\"200\"} 1")
        );
        assert!(text.contains("fintrust_commit_seconds_bucket{le="));
        assert!(text.ends_with("# EOF\n"));
    }
}
