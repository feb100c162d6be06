//! The control protocol between the `archip` commands and a running `archip up`, in one place.
//!
//! Transport: a unix stream socket (default `DATA_DIR/control.sock`, mode 0660). One connection
//! carries one request. Every message is one line of JSON (UTF-8, `\n`-terminated, at most
//! [`MAX_LINE`] bytes); bulk data travels as raw bytes right after the line that announces them.
//!
//! ```text
//! client -> server   {"v":1,"op":"volume_create","name":"db","size":1073741824,"block_size":null}
//! server -> client   {"type":"ok","value":{"name":"db","kind":"volume",...}}
//!
//! client -> server   {"v":1,"op":"volume_info","name":"nope"}
//! server -> client   {"type":"error","kind":"not_found","message":"volume nope not found"}
//! ```
//!
//! A reply is zero or more [`Frame`] lines (progress, data) and then exactly one result line:
//! `{"type":"ok","value":...}` or `{"type":"error","kind":...,"message":...}` ([`ErrorKind`]
//! is the typed class, so scripts need not parse messages). Two requests stream:
//!
//! - `import`: the server answers `{"type":"ready","volume":{...},"created":bool}` (or an
//!   error: nothing was sent yet, so a refused import changes nothing), then the client sends
//!   `data` frames (`{"type":"data","offset":O,"len":N}` + N bytes: whole blocks at
//!   block-aligned offsets), `zero` frames for all-zero ranges (no bytes follow), and one
//!   `{"type":"end"}`; the server then sends the result (an [`ImportSummary`]).
//! - `export`: the server answers `ready`, then `data` frames (+ bytes) and `zero` frames (holes)
//!   covering the volume in order, then the result (an [`ExportSummary`]).
//!
//! Versioning: every request carries `"v"`; a server refuses any other version than
//! [`VERSION`] with kind `version`. Additions are new ops or new optional fields; a change of
//! meaning bumps the version.

use serde::{Deserialize, Serialize};

/// The protocol version this binary speaks.
pub const VERSION: u32 = 1;

/// Longest JSON line either side accepts: names are at most 128 bytes, so a request is small;
/// replies (a list of thousands of volumes, status) are bounded by this too.
pub const MAX_LINE: usize = 16 << 20;
/// Longest request line the server reads: requests are small (names, sizes), and a bound far
/// below [`MAX_LINE`] keeps a flood of huge lines from holding memory.
pub const MAX_REQUEST_LINE: usize = 64 << 10;

/// Largest data frame: a few blocks of the largest block size (64 MiB).
pub const MAX_FRAME: u64 = 64 << 20;

/// A request line: the version and the operation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Envelope {
    pub v: u32,
    #[serde(flatten)]
    pub request: Request,
}

impl Envelope {
    pub fn new(request: Request) -> Self {
        Envelope {
            v: VERSION,
            request,
        }
    }
}

/// Decodes a request line, checking the version before the shape so that a newer client gets
/// "version" rather than a confusing parse error. The server's one way in (and the fuzz
/// target's: this file is compiled into `fuzz/` as it is, so it depends on serde only).
pub fn decode_request(line: &[u8]) -> Result<Request, (ErrorKind, String)> {
    let value: serde_json::Value = serde_json::from_slice(line)
        .map_err(|e| (ErrorKind::Protocol, format!("request is not JSON: {e}")))?;
    match value.get("v").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(VERSION) => {}
        v => {
            return Err((
                ErrorKind::Version,
                format!(
                    "control protocol version {} is not supported by this archip up (it speaks {VERSION})",
                    v.map_or("<missing>".to_string(), |v| v.to_string())
                ),
            ));
        }
    }
    let env: Envelope = serde_json::from_value(value)
        .map_err(|e| (ErrorKind::Protocol, format!("bad request: {e}")))?;
    Ok(env.request)
}

/// What a client can ask for. Sizes are bytes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Peers with their PING latency, and the segment's port counters.
    Status,
    VolumeCreate {
        name: String,
        size: u64,
        block_size: Option<u64>,
    },
    /// Writable volumes only.
    VolumeList,
    /// A volume or a snapshot.
    VolumeInfo {
        name: String,
    },
    /// Grow only.
    VolumeResize {
        name: String,
        size: u64,
    },
    /// Refused for a snapshot (use `snapshot_delete`).
    VolumeDelete {
        name: String,
    },
    SnapshotCreate {
        volume: String,
        snapshot: String,
    },
    /// Snapshots, of one volume if given.
    SnapshotList {
        volume: Option<String>,
    },
    /// Refused for a writable volume (use `volume_delete`).
    SnapshotDelete {
        name: String,
    },
    Clone {
        source: String,
        name: String,
        size: Option<u64>,
    },
    /// Streaming, see the module docs. `image_size` is the raw image's length; `size` the size
    /// of the volume to create (or to grow an existing one to).
    Import {
        volume: String,
        image_size: u64,
        size: Option<u64>,
    },
    /// Streaming, see the module docs.
    Export {
        volume: String,
    },
    Dedup {
        snapshot: String,
    },
    Gc {
        dry_run: bool,
        /// Unreferenced objects younger than this are kept; `None` takes the mapper's default.
        grace_secs: Option<u64>,
        /// Collect without grace even while other peer sets use the backend.
        #[serde(default)]
        force: bool,
    },
    LockInfo {
        volume: String,
    },
    /// Explicit and logged (warn) by the server.
    LockBreak {
        volume: String,
    },
    /// Read a volume's I/O limits, or change the ones given (0 = unlimited).
    Qos {
        volume: String,
        iops: Option<u64>,
        bytes_per_sec: Option<u64>,
    },
}

/// The class of a failure.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    Locked,
    OutOfRange,
    ReadOnly,
    Fenced,
    PeerGone,
    Timeout,
    Io,
    /// The backend is out of space.
    NoSpace,
    /// A malformed or out-of-order message.
    Protocol,
    /// The client speaks another protocol version.
    Version,
    /// The caller is neither root nor the user `archip up` runs as.
    PermissionDenied,
    /// Too many connections at once: retry later.
    Busy,
}

impl ErrorKind {
    /// Bad input (the request can never succeed as it is) as opposed to a failed operation.
    pub fn is_bad_input(self) -> bool {
        matches!(
            self,
            ErrorKind::InvalidArgument | ErrorKind::OutOfRange | ErrorKind::Version
        )
    }
}

/// A server line. The last line of every reply is `Ok` or `Error`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Ok {
        value: serde_json::Value,
    },
    Error {
        kind: ErrorKind,
        message: String,
        /// For `locked`: the lock holder.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        holder: Option<String>,
    },
    /// A streaming request was accepted; frames follow.
    Ready {
        volume: Volume,
        /// The import created the volume.
        #[serde(default)]
        created: bool,
    },
    #[serde(untagged)]
    Frame(Frame),
}

/// Bulk-data messages of `import` (client to server) and `export` (server to client).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Frame {
    /// `len` raw bytes follow the line.
    Data { offset: u64, len: u64 },
    /// The range reads as zeros: no bytes follow.
    Zero { offset: u64, len: u64 },
    /// No more frames (import only).
    End,
}

/// A volume or snapshot.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Volume {
    pub name: String,
    /// "volume" or "snapshot".
    pub kind: String,
    pub uuid: String,
    pub size: u64,
    pub block_size: u64,
    pub epoch: u64,
    pub parent: Option<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

impl Volume {
    pub fn is_snapshot(&self) -> bool {
        self.kind == "snapshot"
    }
}

impl From<peers::client::VolumeInfo> for Volume {
    fn from(v: peers::client::VolumeInfo) -> Self {
        Volume {
            name: v.name,
            kind: match v.kind {
                peers::client::VolumeKind::Volume => "volume",
                peers::client::VolumeKind::Snapshot => "snapshot",
            }
            .to_string(),
            uuid: v.uuid.to_string(),
            size: v.size,
            block_size: u64::from(v.block_size),
            epoch: v.epoch,
            parent: v.parent,
            created: v.created,
        }
    }
}

/// A volume's lock.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Lock {
    pub volume: String,
    pub holder: Option<String>,
    /// Fencing generation; 0 for a lock never taken.
    pub generation: u64,
}

/// Result of `qos`: the limits in force (0 = unlimited) and how many I/Os this node's vlmc has
/// delayed for them.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QosSummary {
    pub volume: String,
    pub iops: u64,
    pub bytes_per_sec: u64,
    pub delayed_ios: u64,
}

/// Result of `import`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImportSummary {
    pub volume: String,
    pub created: bool,
    pub image_bytes: u64,
    /// Blocks of the image.
    pub blocks: u64,
    /// All-zero blocks: not sent, stored as ZERO entries.
    pub zero_blocks: u64,
    /// Blocks stored as new content objects.
    pub written_blocks: u64,
    /// Blocks whose content already existed (deduplicated: no bytes stored).
    pub deduplicated_blocks: u64,
    /// Bytes of new objects stored.
    pub bytes_written: u64,
    /// Image bytes not stored because their blocks were deduplicated.
    pub bytes_deduplicated: u64,
    /// Image bytes in all-zero blocks.
    pub bytes_zero: u64,
}

/// Result of `export`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExportSummary {
    pub volume: String,
    pub bytes: u64,
    /// Bytes sent as data.
    pub data_bytes: u64,
    /// Bytes that read as zeros (holes in the exported file).
    pub zero_bytes: u64,
}

/// Result of `dedup`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DedupSummary {
    pub snapshot: String,
    pub converted: u64,
    pub zero: u64,
    pub written: u64,
    pub reused: u64,
    pub bytes_written: u64,
}

/// Result of `gc`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GcSummary {
    pub dry_run: bool,
    pub maps: u64,
    pub examined: u64,
    pub live: u64,
    pub kept_recent: u64,
    pub deleted_objects: u64,
    pub deleted_pages: u64,
    pub deleted_bytes: u64,
}

/// Result of `status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    pub node: String,
    pub data_dir: String,
    pub segment: String,
    pub pid: u32,
    pub peers: Vec<PeerReport>,
    pub ports: Vec<PortReport>,
    pub requests_in_use: u32,
    pub buffers_in_use: u32,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PeerReport {
    pub name: String,
    pub port: u32,
    pub up: bool,
    /// PING round trip.
    pub latency_us: Option<f64>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortReport {
    pub port: u32,
    pub name: String,
    pub owner_pid: Option<u32>,
    pub requests: u64,
    pub replied: u64,
    pub errors: u64,
    pub bytes: u64,
    /// Upper bounds of the histogram buckets holding the median and the 99th percentile.
    pub p50_ns: Option<u64>,
    pub p99_ns: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_flat_json_with_version_and_op() {
        let e = Envelope::new(Request::VolumeCreate {
            name: "db".into(),
            size: 1 << 30,
            block_size: None,
        });
        let line = serde_json::to_string(&e).unwrap();
        assert_eq!(
            line,
            r#"{"v":1,"op":"volume_create","name":"db","size":1073741824,"block_size":null}"#
        );
        assert_eq!(serde_json::from_str::<Envelope>(&line).unwrap(), e);
        let status: Envelope = serde_json::from_str(r#"{"v":1,"op":"status"}"#).unwrap();
        assert_eq!(status.request, Request::Status);
        assert!(serde_json::from_str::<Envelope>(r#"{"v":1,"op":"format_disk"}"#).is_err());
    }

    #[test]
    fn replies_and_frames_share_one_line_format() {
        for r in [
            Reply::Ok {
                value: serde_json::json!({"a": 1}),
            },
            Reply::Error {
                kind: ErrorKind::Locked,
                message: "volume db is locked by node-b".into(),
                holder: Some("node-b".into()),
            },
            Reply::Frame(Frame::Data {
                offset: 4096,
                len: 10,
            }),
            Reply::Frame(Frame::Zero { offset: 0, len: 4 }),
            Reply::Frame(Frame::End),
        ] {
            let line = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Reply>(&line).unwrap(), r, "{line}");
        }
        let e: Reply =
            serde_json::from_str(r#"{"type":"error","kind":"not_found","message":"x"}"#).unwrap();
        assert!(matches!(
            e,
            Reply::Error {
                kind: ErrorKind::NotFound,
                ..
            }
        ));
    }
}
