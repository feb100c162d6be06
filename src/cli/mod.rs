//! What every command shares: finding the instance (data directory, segment, node, control
//! socket), checking names before they are sent, printing results, and exit codes.
//!
//! One file per command group: [`up`] (`up`, `peer`), [`volume`] (`volume`, `snapshot`,
//! `clone`), [`image`] (`import`, `export`), [`admin`] (`dedup`, `gc`, `lock`, `status`).

pub mod admin;
pub mod csi;
pub mod image;
pub mod nbd;
pub mod node;
pub mod ublk;
pub mod up;
pub mod volume;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use crate::control::client::{NotRunning, Refused};

/// The instance a command talks to (or `up` starts). Every flag has an environment variable,
/// so that one `export ARCHIP_DATA_DIR=...` points every later command at the same instance.
#[derive(Args, Clone, Debug, Default)]
pub struct Instance {
    /// Data directory (objects under DIR/objects). Default: $XDG_DATA_HOME/archipelago, else
    /// ~/.local/share/archipelago, else ./archip-data.
    #[arg(long, global = true, env = "ARCHIP_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Shared-memory segment: a name under /dev/shm, or a path. Default: archipelago for `up`
    /// and the commands that talk to it, archipelago-controller for `controller`,
    /// archipelago-node for `node` (so both roles can run on one host).
    #[arg(long, global = true, env = "ARCHIP_SEGMENT", value_name = "NAME")]
    pub segment: Option<String>,
    /// Permission bits (octal) of the segment if this command creates it. Default: 600, since
    /// whoever can open it reads every I/O buffer; 660 for peers running as users of one group.
    #[arg(long, global = true, env = "ARCHIP_SEGMENT_MODE", value_name = "MODE", value_parser = parse_mode)]
    pub segment_mode: Option<u32>,
    /// This node's identity, recorded in the volume locks it takes. Default: the host name.
    #[arg(long, global = true, env = "ARCHIP_NODE", value_name = "ID")]
    pub node: Option<String>,
    /// Control socket of `archip up`. Default: DATA_DIR/control.sock.
    #[arg(long, global = true, env = "ARCHIP_CONTROL", value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Host-local directory where peer sets record themselves, so a controller can forward to
    /// the one holding a volume's lock. Default: /run/archip/peersets.
    #[arg(long, global = true, env = "ARCHIP_PEERSET_DIR", value_name = "DIR")]
    pub peerset_dir: Option<PathBuf>,
    /// Where volumes live: `file:/DIR`, or (built with the `rados` feature)
    /// `rados:pool=P,namespace=N,conf=/etc/ceph/ceph.conf|mon=HOST[;HOST],id=ID,keyring=PATH|key-env=VAR`.
    /// Never the key itself: a keyring readable only by us, or a variable of our own environment.
    /// Default: the file backend in the data directory.
    #[arg(long, global = true, env = "ARCHIP_BACKEND", value_name = "BACKEND")]
    pub backend: Option<peers::backend::BackendConfig>,
    /// How long a port spins before it yields (nanoseconds). Default: 2000.
    #[arg(long, global = true, env = "ARCHIP_XSEG_BUSY_NS", value_name = "NS")]
    pub xseg_busy_ns: Option<u64>,
    /// How long a port spins with sched_yield before it sleeps (nanoseconds). Default: 50000.
    #[arg(long, global = true, env = "ARCHIP_XSEG_SPIN_NS", value_name = "NS")]
    pub xseg_spin_ns: Option<u64>,
}

pub const DEFAULT_SEGMENT: &str = "archipelago";
/// `archip controller`'s default segment: its own, so a node plugin on the same host can start.
pub const CONTROLLER_SEGMENT: &str = "archipelago-controller";
/// `archip node`'s default segment.
pub const NODE_SEGMENT: &str = "archipelago-node";

impl Instance {
    pub fn data_dir(&self) -> PathBuf {
        if let Some(d) = &self.data_dir {
            return d.clone();
        }
        let env = |k| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        if let Some(x) = env("XDG_DATA_HOME") {
            return x.join("archipelago");
        }
        if let Some(h) = env("HOME") {
            return h.join(".local/share/archipelago");
        }
        PathBuf::from("archip-data")
    }

    pub fn segment(&self) -> String {
        self.segment
            .clone()
            .unwrap_or_else(|| DEFAULT_SEGMENT.to_string())
    }

    /// This instance with `default` as its segment unless one was given: each long-running
    /// role has its own default, since two peer sets cannot bind the same fixed ports.
    pub fn with_default_segment(&self, default: &str) -> Instance {
        Instance {
            segment: Some(self.segment.clone().unwrap_or_else(|| default.to_string())),
            ..self.clone()
        }
    }

    pub fn node(&self) -> String {
        self.node.clone().unwrap_or_else(default_node)
    }

    /// The peer-set registry directory; an empty `ARCHIP_PEERSET_DIR` means the default.
    pub fn peerset_dir(&self) -> PathBuf {
        self.peerset_dir
            .clone()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from(peers::registry::DEFAULT_DIR))
    }

    /// The wait policy of every port this process binds (see [`xseg::WaitPolicy`]).
    pub fn wait_policy(&self) -> xseg::WaitPolicy {
        let d = xseg::WaitPolicy::DEFAULT;
        xseg::WaitPolicy {
            busy: self.xseg_busy_ns.map_or(d.busy, Duration::from_nanos),
            spin: self.xseg_spin_ns.map_or(d.spin, Duration::from_nanos),
        }
    }

    pub fn control(&self) -> PathBuf {
        self.control
            .clone()
            .unwrap_or_else(|| self.data_dir().join("control.sock"))
    }
}

/// An octal permission mode such as `600` or `0660`.
pub fn parse_mode(text: &str) -> Result<u32, String> {
    match u32::from_str_radix(text, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!("{text:?} is not an octal mode like 600")),
    }
}

/// The host name, cut to the characters a lock owner may hold.
fn default_node() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for `buf.len()` bytes; gethostname writes at most that many.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(128)
        .collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

/// Starts the peer set of `config`; a peer port already bound (another peer set on the same
/// segment) is reported with the way out, since the bare xseg error does not say what to do.
pub fn start_peer_set(
    config: &peers::peerset::PeerConfig,
) -> anyhow::Result<peers::peerset::PeerSet> {
    peers::peerset::PeerSet::start(config).map_err(|e| {
        let busy = matches!(
            &e,
            peers::peerset::PeerSetError::Segment(xseg::Error::PortBusy { .. })
        );
        let e = anyhow::Error::new(e);
        if busy {
            e.context(format!(
                "another peer set is running on segment {:?}; give this one its own with \
                 --segment NAME (or ARCHIP_SEGMENT=NAME)",
                config.segment
            ))
        } else {
            e.context(format!(
                "starting the peer set on segment {:?}",
                config.segment
            ))
        }
    })
}

/// Starts `/metrics` and `/healthz` on `addr` if one was given; they serve until the process
/// ends. Must run inside the runtime that is to serve them.
pub async fn start_metrics(
    addr: Option<std::net::SocketAddr>,
    segment: &std::sync::Arc<xseg::Segment>,
) -> anyhow::Result<()> {
    let Some(addr) = addr else {
        return Ok(());
    };
    let listener = ::csi::metrics::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "metrics serving on /metrics and /healthz");
    tokio::spawn(::csi::metrics::serve(
        listener,
        segment.clone(),
        std::future::pending(),
    ));
    Ok(())
}

/// What a command needs besides its own arguments.
pub struct Context {
    pub instance: Instance,
    /// Print results as JSON instead of text.
    pub json: bool,
}

impl Context {
    pub fn socket(&self) -> PathBuf {
        self.instance.control()
    }
}

/// Checks a volume or snapshot name with the peers' rules, so a bad name never reaches them.
pub fn check_name(what: &str, name: &str) -> Result<(), Refused> {
    match peers::map_format::volume_name_problem(name) {
        None => Ok(()),
        Some(reason) => Err(Refused::invalid(format!(
            "invalid {what} name {name:?}: {reason}"
        ))),
    }
}

/// Prints `value` as pretty JSON.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Exit codes: 0 success; 1 the operation failed; 2 bad input (refused before anything was
/// changed: a bad name, size or argument); 3 no `archip up` answers at the control socket.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if cause.is::<NotRunning>() {
            return 3;
        }
        if let Some(r) = cause.downcast_ref::<Refused>() {
            return if r.kind.is_bad_input() { 2 } else { 1 };
        }
        if cause.is::<peers::size::SizeError>() {
            return 2;
        }
    }
    1
}

/// UTC `YYYY-MM-DD HH:MM:SS` for a Unix time, without a date library.
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A path made absolute against the current directory, for messages and for `up`'s socket.
pub fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

#[cfg(test)]
mod tests {
    use super::{CONTROLLER_SEGMENT, DEFAULT_SEGMENT, Instance, NODE_SEGMENT};

    #[test]
    fn each_role_has_its_own_default_segment_and_a_given_one_wins() {
        let none = Instance::default();
        assert_eq!(none.segment(), DEFAULT_SEGMENT);
        let c = none.with_default_segment(CONTROLLER_SEGMENT).segment();
        let n = none.with_default_segment(NODE_SEGMENT).segment();
        assert_ne!(
            c, n,
            "controller and node on one host must not share a segment"
        );
        assert_ne!(c, DEFAULT_SEGMENT);
        let given = Instance {
            segment: Some("mine".into()),
            ..Instance::default()
        };
        assert_eq!(given.with_default_segment(NODE_SEGMENT).segment(), "mine");
    }

    use super::*;

    #[test]
    fn names_are_checked_like_the_peers_do() {
        for bad in [
            "", "a/b", "..", "a..b", "x\0y", "-x", ".x", "vol.tmp", "vol.lock", "sp ace",
        ] {
            assert!(check_name("volume", bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_name("volume", &"a".repeat(129)).is_err());
        assert!(check_name("volume", &"a".repeat(128)).is_ok());
        for good in ["db", "db-1", "pvc_0.snap", "0abc"] {
            assert!(check_name("volume", good).is_ok(), "{good:?} refused");
        }
        let e = check_name("snapshot", "a/b").unwrap_err();
        assert!(e.message.contains("invalid snapshot name \"a/b\""), "{e}");
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
    }

    #[test]
    fn exit_codes_follow_the_error_class() {
        let bad: anyhow::Error = Refused::invalid("x").into();
        assert_eq!(exit_code(&bad), 2);
        let gone: anyhow::Error = NotRunning {
            socket: "/s".into(),
            source: std::io::ErrorKind::NotFound.into(),
        }
        .into();
        assert_eq!(exit_code(&gone.context("while listing")), 3);
        assert_eq!(exit_code(&anyhow::anyhow!("other")), 1);
    }
}
