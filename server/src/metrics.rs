//! Prometheus metrics of `vaultd`, served as text at `GET /metrics` by the
//! HTTP shim.
//!
//! One registry per process ([`global`]): the protocol server counts
//! redemptions and times durable writes, the shim counts HTTP requests and
//! authorization decisions. Labels never carry subject ids, partner ids,
//! keys or tokens: only routes, status codes, operations and reasons, so
//! that the number of series stays bounded and nothing personal leaks.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

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
    /// Durable writes of the protocol server (append, event, mint, redeem):
    /// from request to receipt, i.e. including the group commit.
    pub commit_seconds: Family<OpLabels, Histogram, LatencyBuckets>,
    /// Requests of the shim to the vault, by operation.
    pub vault_seconds: Family<OpLabels, Histogram, LatencyBuckets>,
    pub log_entries: Gauge,
    /// TLS handshakes by port and outcome: how many partners resume their
    /// sessions, and how many connections fail or time out in TLS.
    pub tls_handshakes: Family<HandshakeLabels, Counter>,
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
            tls_handshakes: Family::default(),
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
            "tls_handshakes",
            "TLS handshakes by port and outcome (full, resumed, failed, timeout)",
            m.tls_handshakes.clone(),
        );
        Metrics { registry, ..m }
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

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

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
