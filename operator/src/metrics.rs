//! Prometheus metrics of the operator (`/metrics` on `--metrics-listen`): reconciles, errors by
//! kind (the `Error::metric_label` of each failure), reconcile duration, and per-volume health.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabels {
    pub namespace: String,
    pub volume: String,
}

/// All operator metrics, registered once in `Metrics::new`.
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Counter,
    pub errors: Family<ErrorLabels, Counter>,
    pub reconcile_seconds: Histogram,
    /// 1 when the volume is Healthy, 0 otherwise.
    pub volume_healthy: Family<VolumeLabels, Gauge>,
    pub volume_plexes_in_sync: Family<VolumeLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sva_operator");
        let reconciles = Counter::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let reconcile_seconds = Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
        let volume_healthy = Family::<VolumeLabels, Gauge>::default();
        let volume_plexes_in_sync = Family::<VolumeLabels, Gauge>::default();
        registry.register("reconciles", "Reconciliations run", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Failed reconciliations by error kind",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            reconcile_seconds.clone(),
        );
        registry.register(
            "volume_healthy",
            "1 when the volume is Healthy",
            volume_healthy.clone(),
        );
        registry.register(
            "volume_plexes_in_sync",
            "Plexes in sync per volume",
            volume_plexes_in_sync.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            reconcile_seconds,
            volume_healthy,
            volume_plexes_in_sync,
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_errors_by_kind_and_volume_health() {
        let m = Metrics::new();
        m.reconciles.inc();
        m.errors
            .get_or_create(&ErrorLabels {
                error: "kube".into(),
            })
            .inc();
        let v = VolumeLabels {
            namespace: "ns".into(),
            volume: "vol".into(),
        };
        m.volume_healthy.get_or_create(&v).set(1);
        let text = m.render();
        assert!(text.contains("sva_operator_reconciles_total 1"), "{text}");
        assert!(
            text.contains(r#"sva_operator_reconcile_errors_total{error="kube"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"sva_operator_volume_healthy{namespace="ns",volume="vol"} 1"#),
            "{text}"
        );
    }
}
