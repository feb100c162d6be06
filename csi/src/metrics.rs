//! Prometheus metrics of this process's peer set, served over HTTP: `/metrics` in the Prometheus
//! text format and `/healthz` (200 while blocker, mapper and vlmc answer PING, else 503).
//!
//! Nothing is counted here. The peers count in plain atomics where the work happens
//! (`peers::metrics`: volume I/O in vlmc, copy-on-write and locks in the mapper), and the
//! per-port counters live in the segment (`xseg::stats`); a scrape reads both through one
//! `prometheus-client` [`Collector`], so the peers need no metrics library and a scrape costs
//! nothing between scrapes.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use peers::metrics::{HistogramSnapshot, OpStats};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use xseg::Segment;

use crate::health::PeerSetHealth;
use crate::identity::Health;

/// Why the metrics server could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("binding the metrics address {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Reads the counters at each scrape.
struct PeerSetCollector {
    segment: Arc<Segment>,
}

impl std::fmt::Debug for PeerSetCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSetCollector")
            .field("segment", &self.segment.path())
            .finish()
    }
}

/// Prometheus wants per-bucket counts from an encoder (it sums them); ours are cumulative.
fn per_bucket(h: &HistogramSnapshot) -> Vec<(f64, u64)> {
    let mut before = 0;
    h.buckets
        .iter()
        .map(|&(bound, cumulative)| {
            let n = cumulative - before;
            before = cumulative;
            (bound, n)
        })
        .collect()
}

fn histogram(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Vec<(&str, String)>, HistogramSnapshot)],
) -> Result<(), std::fmt::Error> {
    let mut m =
        encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    for (labels, h) in series {
        let buckets = per_bucket(h);
        if labels.is_empty() {
            m.encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &buckets, None)?;
        } else {
            m.encode_family(labels)?.encode_histogram::<NoLabelSet>(
                h.sum_seconds,
                h.count,
                &buckets,
                None,
            )?;
        }
    }
    Ok(())
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: &[(Vec<(&str, String)>, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, unit, MetricType::Counter)?;
    if let [(labels, v)] = series
        && labels.is_empty()
    {
        return ConstCounter::new(*v).encode(m);
    }
    for (labels, v) in series {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn single(v: u64) -> [(Vec<(&'static str, String)>, u64); 1] {
    [(Vec::new(), v)]
}

impl Collector for PeerSetCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = peers::metrics::global();
        let volumes = stats.volumes();
        let ops = |pick: &dyn Fn(&OpStats) -> u64, with_flush: bool| {
            let mut out = Vec::new();
            for (name, v) in &volumes {
                let kinds: &[(&str, &OpStats)] = if with_flush {
                    &[("read", &v.read), ("write", &v.write), ("flush", &v.flush)]
                } else {
                    &[("read", &v.read), ("write", &v.write)]
                };
                for (op, s) in kinds {
                    out.push((
                        vec![("volume", name.clone()), ("op", (*op).to_string())],
                        pick(s),
                    ));
                }
            }
            out
        };
        counter(
            &mut encoder,
            "archip_volume_io",
            "Volume I/Os vlmc served (reads, writes, flushes), failed ones included.",
            None,
            &ops(&|s| s.ops.load(Relaxed), true),
        )?;
        counter(
            &mut encoder,
            "archip_volume_io_errors",
            "Volume I/Os that failed.",
            None,
            &ops(&|s| s.errors.load(Relaxed), true),
        )?;
        counter(
            &mut encoder,
            "archip_volume_io",
            "Bytes of volume I/O that succeeded.",
            Some(&Unit::Bytes),
            &ops(&|s| s.bytes.load(Relaxed), false),
        )?;
        let mut latency = Vec::new();
        for (name, v) in &volumes {
            for (op, s) in [("read", &v.read), ("write", &v.write), ("flush", &v.flush)] {
                latency.push((
                    vec![("volume", name.clone()), ("op", op.to_string())],
                    s.latency.snapshot(),
                ));
            }
        }
        histogram(
            &mut encoder,
            "archip_volume_io_latency",
            "Volume I/O latency in vlmc, from request to reply (QoS delays included).",
            &latency,
        )?;
        counter(
            &mut encoder,
            "archip_cow_copies",
            "Partial writes to a shared block that copied the old object first.",
            None,
            &single(stats.cow_copies.load(Relaxed)),
        )?;
        for (what, s) in [("snapshot", &stats.snapshots), ("clone", &stats.clones)] {
            counter(
                &mut encoder,
                &format!("archip_{what}s"),
                &format!("{what} operations, failed ones included."),
                None,
                &single(s.ops.load(Relaxed)),
            )?;
            counter(
                &mut encoder,
                &format!("archip_{what}_errors"),
                &format!("{what} operations that failed."),
                None,
                &single(s.errors.load(Relaxed)),
            )?;
            histogram(
                &mut encoder,
                &format!("archip_{what}_latency"),
                &format!("{what} latency, including the drain of the volume's in-flight I/O."),
                &[(Vec::new(), s.latency.snapshot())],
            )?;
        }
        counter(
            &mut encoder,
            "archip_qos_delayed_io",
            "I/Os the volume QoS limits delayed.",
            None,
            &single(stats.qos_delayed.load(Relaxed)),
        )?;
        let m = encoder.encode_descriptor(
            "archip_qos_delay",
            "Total time I/Os waited under the volume QoS limits.",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?;
        ConstCounter::new(stats.qos_delay_ns.load(Relaxed) as f64 / 1e9).encode(m)?;
        counter(
            &mut encoder,
            "archip_gc_reclaimed",
            "Bytes of objects garbage collection deleted.",
            Some(&Unit::Bytes),
            &single(stats.gc_bytes_reclaimed.load(Relaxed)),
        )?;
        counter(
            &mut encoder,
            "archip_lock_takeovers",
            "Volume locks this node took over from another holder (live-migration handover).",
            None,
            &single(stats.lock_takeovers.load(Relaxed)),
        )?;
        counter(
            &mut encoder,
            "archip_lock_fencings",
            "Volume locks broken (lock break, node-loss fencing); the old holder is fenced.",
            None,
            &single(stats.locks_broken.load(Relaxed)),
        )?;
        self.encode_ports(&mut encoder)
    }
}

impl PeerSetCollector {
    /// The segment's per-port counters, of bound ports and the peers' fixed ones.
    fn encode_ports(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut ports = Vec::new();
        for p in 0..self.segment.config().nr_ports {
            let Ok(s) = self.segment.port_stats(p) else {
                continue;
            };
            let fixed = peers::peerset::PEERS
                .iter()
                .any(|n| peers::peerset::peer_port(n) == Some(p));
            if s.owner.is_some() || fixed {
                ports.push(s);
            }
        }
        let labels = |s: &xseg::stats::PortStats| {
            vec![("port", s.port.to_string()), ("name", s.name.clone())]
        };
        type Pick = fn(&xseg::stats::PortStats) -> u64;
        let series: [(&str, &str, Option<Unit>, Pick); 4] = [
            (
                "archip_port_requests",
                "Requests a port accepted.",
                None,
                |s| s.accepted,
            ),
            (
                "archip_port_replies",
                "Requests a port replied to.",
                None,
                |s| s.replied,
            ),
            ("archip_port_errors", "Requests a port failed.", None, |s| {
                s.errors
            }),
            (
                "archip_port",
                "Bytes a port served.",
                Some(Unit::Bytes),
                |s| s.bytes,
            ),
        ];
        for (name, help, unit, pick) in series {
            let values: Vec<_> = ports.iter().map(|s| (labels(s), pick(s))).collect();
            counter(encoder, name, help, unit.as_ref(), &values)?;
        }
        let mut m = encoder.encode_descriptor(
            "archip_port_queue_depth",
            "Requests a port accepted and has not replied to yet.",
            None,
            MetricType::Gauge,
        )?;
        for s in &ports {
            let depth = s.accepted.saturating_sub(s.replied);
            ConstGauge::new(i64::try_from(depth).unwrap_or(i64::MAX))
                .encode(m.encode_family(&labels(s))?)?;
        }
        let service: Vec<_> = ports
            .iter()
            .map(|s| {
                // Bucket i of the segment's histogram holds times below 2 << i ns.
                let mut cumulative = 0;
                let buckets = s
                    .service_ns
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        cumulative += n;
                        ((2u64 << i) as f64 / 1e9, cumulative)
                    })
                    .collect();
                let h = HistogramSnapshot {
                    buckets,
                    count: cumulative,
                    // The segment keeps no sum; Prometheus needs one, and 0 marks it unknown.
                    sum_seconds: 0.0,
                };
                (labels(s), h)
            })
            .collect();
        histogram(
            encoder,
            "archip_port_service",
            "Service time of a port's requests (the segment keeps no sum: _sum is 0).",
            &service,
        )
    }
}

/// The exposition of this process's counters and `segment`'s ports, in the Prometheus text
/// format.
pub fn render(segment: &Arc<Segment>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(PeerSetCollector {
        segment: segment.clone(),
    }));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

/// Binds `addr` (port 0 picks a free one; the caller logs [`tokio::net::TcpListener::local_addr`]).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, MetricsError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

async fn respond(
    req: Request<hyper::body::Incoming>,
    segment: Arc<Segment>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let text = |status: StatusCode, content_type: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(content_type),
        );
        r
    };
    const PLAIN: &str = "text/plain; charset=utf-8";
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render(&segment),
        ),
        (&Method::GET, "/healthz") => match PeerSetHealth::new(segment).probe().await {
            Ok(()) => text(StatusCode::OK, PLAIN, "ok\n".into()),
            Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, format!("{e}\n")),
        },
        (&Method::GET, _) => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "try /metrics or /healthz\n".into(),
        ),
        _ => text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "GET only\n".into()),
    })
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` completes.
pub async fn serve<F>(listener: tokio::net::TcpListener, segment: Arc<Segment>, shutdown: F)
where
    F: Future<Output = ()> + Send,
{
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept");
                    continue;
                }
            },
        };
        let segment = segment.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| respond(req, segment.clone()));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "metrics: connection");
            }
        });
    }
}
