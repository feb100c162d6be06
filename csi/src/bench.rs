//! `archip bench csi`: how fast the controller makes clones, measured the
//! way a CO sees it (gRPC over the unix socket), with the same operation
//! done directly on the peer set in the same run as the baseline.
//!
//! For each source size (1 GiB and 1 TiB by default) a volume is created
//! through CreateVolume, some blocks spread over its whole range are written
//! (so its map has entries in many pages, which is what a clone copies),
//! and CreateSnapshot cuts a snapshot. Then:
//! - `iterations` sequential CreateVolume-from-snapshot calls: p50/p99;
//! - the same number of direct `VolumeClient::clone_volume` calls of the
//!   same snapshot: p50/p99, and the gRPC/direct ratio;
//! - `concurrent` CreateVolume-from-snapshot calls issued at once: the wall
//!   time for all of them (the target is under a second on the file
//!   backend; ceph-csi's published figure is about 35 s for 50).
//!
//! Everything runs in a fresh directory under `dir`, with its own peer set
//! and segment, removed afterwards.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use peers::client::{ClientError, VolumeClient};
use peers::peerset::{PeerConfig, PeerSet, PeerSetError};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::health::PeerSetHealth;
use crate::pb::controller_client::ControllerClient;
use crate::pb::volume_capability::access_mode::Mode;
use crate::pb::volume_capability::{AccessMode, AccessType, BlockVolume};
use crate::pb::volume_content_source as vcs;
use crate::pb::{
    CapacityRange, CreateSnapshotRequest, CreateVolumeRequest, VolumeCapability,
    VolumeContentSource,
};
use crate::{ControllerPlugin, RunError};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Parent of the scratch directory (a file backend lives there for the
    /// run). Put it on the filesystem you want measured, not tmpfs.
    pub dir: PathBuf,
    /// Source volume sizes.
    pub sizes: Vec<u64>,
    /// Blocks written into each source before the snapshot.
    pub written_blocks: u64,
    /// Sequential calls per size for the latency figures.
    pub iterations: usize,
    /// Calls issued at once for the burst figure.
    pub concurrent: usize,
}

impl BenchOptions {
    /// The figures: 1 GiB and 1 TiB sources with 64 written blocks,
    /// 50 sequential calls each, bursts of 100.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            sizes: vec![1 << 30, 1 << 40],
            written_blocks: 64,
            iterations: 50,
            concurrent: 100,
        }
    }
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Scratch directory trouble.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The peer set did not start.
    #[error("starting the peer set: {0}")]
    Peers(#[from] PeerSetError),
    /// The controller did not start.
    #[error(transparent)]
    Controller(#[from] RunError),
    /// Dialling the socket failed.
    #[error("dialling the controller: {0}")]
    Dial(#[from] tonic::transport::Error),
    /// An RPC failed.
    #[error("{rpc}: {status}")]
    Rpc {
        /// Which call.
        rpc: &'static str,
        /// Its status.
        status: tonic::Status,
    },
    /// A direct peer-set call failed.
    #[error("{0}")]
    Client(#[from] ClientError),
    /// A clone read back something else than its source holds.
    #[error("clone {0} does not hold its source's data")]
    WrongData(String),
}

fn rpc(rpc: &'static str) -> impl FnOnce(tonic::Status) -> BenchError {
    move |status| BenchError::Rpc { rpc, status }
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> BenchError {
    move |source| BenchError::Io { context, source }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// p50, p99 (nearest rank), mean, min and max in milliseconds.
fn summary(samples: &mut [Duration]) -> Value {
    samples.sort();
    let n = samples.len();
    if n == 0 {
        return json!(null);
    }
    let rank = |p: f64| samples[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
    let mean = samples.iter().sum::<Duration>() / n as u32;
    json!({
        "n": n,
        "p50_ms": ms(rank(0.50)),
        "p99_ms": ms(rank(0.99)),
        "mean_ms": ms(mean),
        "min_ms": ms(samples[0]),
        "max_ms": ms(samples[n - 1]),
    })
}

fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

fn clone_request(name: String, snapshot_id: &str) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name,
        volume_capabilities: vec![block_cap()],
        volume_content_source: Some(VolumeContentSource {
            r#type: Some(vcs::Type::Snapshot(vcs::SnapshotSource {
                snapshot_id: snapshot_id.to_owned(),
            })),
        }),
        ..Default::default()
    }
}

/// The scratch directory and segment; removed on drop, also on errors.
struct Scratch {
    dir: PathBuf,
    segment: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.segment);
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "removing the bench directory");
        }
    }
}

/// Runs the benchmark and returns its report as JSON.
pub async fn run(opts: &BenchOptions) -> Result<String, BenchError> {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tag = format!("archip-bench-csi-{}-{nonce}", std::process::id());
    let scratch = Scratch {
        dir: opts.dir.join(&tag),
        segment: PathBuf::from(format!("/dev/shm/{tag}")),
    };
    std::fs::create_dir_all(&scratch.dir)
        .map_err(io(format!("creating {}", scratch.dir.display())))?;
    let config = PeerConfig::new(
        &scratch.dir,
        scratch.segment.to_string_lossy(),
        "bench-node",
    );
    let set = PeerSet::start(&config)?;
    let plugin = ControllerPlugin::open(set.segment(), "bench-node", scratch.dir.clone())?;
    let socket = scratch.dir.join("csi.sock");
    let bound = crate::server::UnixEndpoint::parse(&format!("unix://{}", socket.display()))
        .map_err(RunError::from)?
        .bind()
        .map_err(RunError::from)?;
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(bound.serve(
        plugin.routes(PeerSetHealth::new(set.segment().clone())),
        async {
            let _ = stopped.await;
        },
    ));
    let direct = Arc::new(VolumeClient::connect(set.segment())?);
    let channel = crate::dial::connect(&socket).await?;
    let result = measure(opts, ControllerClient::new(channel), &direct).await;
    let _ = stop.send(());
    let _ = server.await;
    drop(direct);
    set.stop();
    drop(scratch);
    let sources = result?;
    let report = json!({
        "bench": "csi",
        "backend": "file",
        "dir": opts.dir.display().to_string(),
        "written_blocks": opts.written_blocks,
        "iterations": opts.iterations,
        "concurrent": opts.concurrent,
        "sources": sources,
    });
    Ok(serde_json::to_string_pretty(&report).expect("a JSON value serialises"))
}

async fn measure(
    opts: &BenchOptions,
    mut c: ControllerClient<tonic::transport::Channel>,
    direct: &Arc<VolumeClient>,
) -> Result<Vec<Value>, BenchError> {
    let mut out = Vec::new();
    for &size in &opts.sizes {
        let label = format!("{}g", size >> 30);
        let src = c
            .create_volume(CreateVolumeRequest {
                name: format!("bench-src-{label}"),
                capacity_range: Some(CapacityRange {
                    required_bytes: size as i64,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![block_cap()],
                ..Default::default()
            })
            .await
            .map_err(rpc("CreateVolume"))?
            .into_inner()
            .volume
            .expect("CreateVolume returns a volume");
        let info = direct.info(&src.volume_id).await?;
        let block = u64::from(info.block_size);
        let blocks = info.size / block;
        let written = opts.written_blocks.min(blocks).max(1);
        let stride = blocks / written;
        let marker = |i: u64| format!("archipelago bench block {i}").into_bytes();
        for i in 0..written {
            direct
                .write(&src.volume_id, i * stride * block, &marker(i))
                .await?;
        }
        direct.flush(&src.volume_id).await?;
        let snap = c
            .create_snapshot(CreateSnapshotRequest {
                source_volume_id: src.volume_id.clone(),
                name: format!("bench-snap-{label}"),
                ..Default::default()
            })
            .await
            .map_err(rpc("CreateSnapshot"))?
            .into_inner()
            .snapshot
            .expect("CreateSnapshot returns a snapshot");
        let sid = snap.snapshot_id;

        let mut grpc = Vec::with_capacity(opts.iterations);
        let mut first_clone = None;
        for i in 0..opts.iterations {
            let req = clone_request(format!("bench-clone-{label}-{i}"), &sid);
            let t = Instant::now();
            let v = c
                .create_volume(req)
                .await
                .map_err(rpc("CreateVolume from snapshot"))?;
            grpc.push(t.elapsed());
            first_clone.get_or_insert(v.into_inner().volume.expect("a volume").volume_id);
        }
        // The clones must hold the source's data, or the figures mean
        // nothing.
        if let Some(id) = &first_clone {
            let last = written - 1;
            let want = marker(last);
            let mut got = vec![0u8; want.len()];
            direct.read(id, last * stride * block, &mut got).await?;
            if got != want {
                return Err(BenchError::WrongData(id.clone()));
            }
        }
        let mut baseline = Vec::with_capacity(opts.iterations);
        for i in 0..opts.iterations {
            let t = Instant::now();
            VolumeClient::clone(direct, &sid, &format!("bench-direct-{label}-{i}"), None).await?;
            baseline.push(t.elapsed());
        }

        let start = Instant::now();
        let mut burst = tokio::task::JoinSet::new();
        for i in 0..opts.concurrent {
            let mut c = c.clone();
            let req = clone_request(format!("bench-burst-{label}-{i}"), &sid);
            burst.spawn(async move {
                let t = Instant::now();
                c.create_volume(req).await.map(|_| t.elapsed())
            });
        }
        let mut burst_latencies = Vec::with_capacity(opts.concurrent);
        while let Some(done) = burst.join_next().await {
            let elapsed = done
                .expect("a clone task panicked")
                .map_err(rpc("concurrent CreateVolume from snapshot"))?;
            burst_latencies.push(elapsed);
        }
        let total = start.elapsed();

        let grpc_summary = summary(&mut grpc);
        let direct_summary = summary(&mut baseline);
        let ratio = match (
            grpc_summary["p50_ms"].as_f64(),
            direct_summary["p50_ms"].as_f64(),
        ) {
            (Some(g), Some(d)) if d > 0.0 => json!((g / d * 100.0).round() / 100.0),
            _ => json!(null),
        };
        out.push(json!({
            "source_bytes": info.size,
            "block_bytes": block,
            "blocks_written": written,
            "create_volume_from_snapshot_grpc": grpc_summary,
            "clone_direct_baseline": direct_summary,
            "grpc_over_direct_p50": ratio,
            "burst": {
                "calls": opts.concurrent,
                "total_ms": ms(total),
                "per_call": summary(&mut burst_latencies),
                "target_ms": 1000,
                "met": total < Duration::from_secs(1),
            },
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let mut v: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let s = summary(&mut v);
        assert_eq!(s["p50_ms"], 50.0);
        assert_eq!(s["p99_ms"], 99.0);
        assert_eq!(s["min_ms"], 1.0);
        assert_eq!(s["max_ms"], 100.0);
        let mut one = vec![Duration::from_micros(1500)];
        assert_eq!(summary(&mut one)["p99_ms"], 1.5);
        assert!(summary(&mut []).is_null());
    }
}
