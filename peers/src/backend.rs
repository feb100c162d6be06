//! Which storage backend a peer set and the CSI controller use, as configuration: a
//! [`BackendConfig`] parsed from the command line or a StorageClass, and the one place
//! ([`BackendConfig::open`]) that turns it into a running [`Blocker`].
//!
//! Why one module: everything that used to name the file blocker directly (the peer set, the
//! CSI record store, the StorageClass `backend` parameter, the registry's notion of "the same
//! backend") now goes through here, so a new backend is this module plus its blocker's file.
//!
//! The text form is `KIND:ARGUMENTS`:
//! - `file:/var/lib/archip`: the file backend rooted at a directory. Its layout is fixed and
//!   shared with earlier versions: data and map objects in `<dir>/objects`, the CSI
//!   controller's records in `<dir>/csi` (see [`Store`]).
//!
//! How RADOS slots in (behind the `rados` cargo feature, in `blocker/rados.rs`): a variant
//! `Rados { conf: Option<PathBuf>, monitors: Vec<String>, client: String, key: KeySource, pool:
//! String, namespace: String }` written `rados:pool=P,namespace=N,client=admin,conf=PATH` (or
//! `mon=HOST[;HOST]` instead of `conf`, and `keyring=PATH` or `key-env=VAR` for the secret,
//! never the key itself, so a rendered config never leaks it). Its arm in [`BackendConfig::open`]
//! connects and opens an I/O context; each [`Store`] becomes a namespace (`N` for objects,
//! `N.csi` for records), so records and volumes never share names; its [`BackendId`] is the
//! cluster fsid with the pool and the namespace. [`BackendKind::parse`] then accepts `rados`
//! instead of answering [`BackendError::NeedsFeature`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use crate::blocker::{BackendId, Blocker, BlockerError, FileBlocker, file};

/// The kinds of backend, by the names the CLI and StorageClasses use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// One file per object in a directory (node-local, or a filesystem every node mounts).
    File,
    /// One RADOS object per object in a Ceph pool and namespace (the `rados` feature).
    Rados,
}

/// Backends this build knows of but was built without, with the cargo feature each needs: a
/// user who asks for one learns how to get it, not that it does not exist.
#[cfg(not(feature = "rados"))]
const NEEDS_FEATURE: &[(&str, &str)] = &[("rados", "rados")];
#[cfg(feature = "rados")]
const NEEDS_FEATURE: &[(&str, &str)] = &[];

impl BackendKind {
    /// Every kind this build serves.
    #[cfg(not(feature = "rados"))]
    pub const ALL: &'static [BackendKind] = &[BackendKind::File];
    #[cfg(feature = "rados")]
    pub const ALL: &'static [BackendKind] = &[BackendKind::File, BackendKind::Rados];

    pub fn name(self) -> &'static str {
        match self {
            BackendKind::File => "file",
            BackendKind::Rados => "rados",
        }
    }

    /// The kind named `name` (exactly, in lower case).
    pub fn parse(name: &str) -> Result<BackendKind, BackendError> {
        if let Some(kind) = Self::ALL.iter().find(|k| k.name() == name) {
            return Ok(*kind);
        }
        if let Some((kind, feature)) = NEEDS_FEATURE.iter().find(|(k, _)| *k == name) {
            return Err(BackendError::NeedsFeature { kind, feature });
        }
        Err(BackendError::UnknownKind {
            kind: name.to_owned(),
            known: Self::known(),
        })
    }

    /// The names this build accepts, for messages: `"file"`.
    pub fn known() -> String {
        Self::ALL
            .iter()
            .map(|k| format!("{:?}", k.name()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = BackendError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The separate object namespaces one backend holds. They never share names, so the CSI
/// controller's records can never be mistaken for (or collected as) a volume's objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Store {
    /// Volumes: data, map and lock objects, written by the peers.
    Objects,
    /// The CSI controller's records (volume and snapshot requests it answered).
    Records,
}

impl Store {
    /// The file backend's subdirectory for this store.
    pub fn subdir(self) -> &'static str {
        match self {
            Store::Objects => OBJECTS_SUBDIR,
            Store::Records => RECORDS_SUBDIR,
        }
    }
}

/// Where the file backend keeps volume objects, under its directory.
pub const OBJECTS_SUBDIR: &str = "objects";
/// Where the file backend keeps the CSI controller's records, under its directory.
pub const RECORDS_SUBDIR: &str = "csi";

/// A storage backend, as configured.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum BackendConfig {
    /// The file backend rooted at `dir` (the data directory): see [`Store::subdir`].
    File { dir: PathBuf },
    /// A RADOS pool and namespace: see [`RadosConfig`].
    Rados(RadosConfig),
}

/// Where a RADOS backend lives and how to log in. It never holds a secret: the key comes from
/// a keyring file or an environment variable named here, so logging or rendering this value
/// (the derived `Debug`, the text form) cannot leak it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RadosConfig {
    pub pool: String,
    /// The namespace of [`Store::Objects`]; [`Store::Records`] uses `<namespace>.csi`.
    pub namespace: String,
    /// A ceph.conf to read (`conf=`), or none when `monitors` say where the cluster is.
    pub conf: Option<PathBuf>,
    /// Monitor addresses (`mon=HOST;HOST`).
    pub monitors: Vec<String>,
    /// The cephx client id, without `client.` (`id=`, default `admin`).
    pub client: String,
    /// A keyring file (`keyring=`).
    pub keyring: Option<PathBuf>,
    /// The environment variable holding the cephx key (`key-env=`).
    pub key_env: Option<String>,
}

impl RadosConfig {
    /// The namespace a store lives in: stores never share object names.
    pub fn namespace_of(&self, store: Store) -> String {
        match store {
            Store::Objects => self.namespace.clone(),
            Store::Records => format!("{}.csi", self.namespace),
        }
    }

    fn parse(args: &str) -> Result<Self, String> {
        let mut c = RadosConfig {
            pool: String::new(),
            namespace: "archip".into(),
            conf: None,
            monitors: Vec::new(),
            client: "admin".into(),
            keyring: None,
            key_env: None,
        };
        for pair in args.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("expected KEY=VALUE, got {pair:?}"))?;
            if value.is_empty() || value.contains('\0') {
                return Err(format!("{key} needs a value without NUL"));
            }
            match key {
                "pool" => c.pool = value.into(),
                "namespace" => c.namespace = value.into(),
                "conf" | "keyring" if !Path::new(value).is_absolute() => {
                    return Err(format!("{key} must be an absolute path"));
                }
                "conf" => c.conf = Some(value.into()),
                "keyring" => c.keyring = Some(value.into()),
                "mon" => c.monitors = value.split(';').map(str::to_owned).collect(),
                "id" | "client" => c.client = value.into(),
                "key-env" => c.key_env = Some(value.into()),
                "key" => return Err("never put the key itself in a backend description: use key-env=VAR or keyring=PATH".into()),
                other => return Err(format!("unknown setting {other:?}")),
            }
        }
        if c.pool.is_empty() {
            return Err("the rados backend needs a pool: rados:pool=NAME,...".into());
        }
        if c.conf.is_none() && c.monitors.is_empty() {
            return Err("the rados backend needs conf=PATH or mon=HOST[;HOST]".into());
        }
        if c.keyring.is_some() && c.key_env.is_some() {
            return Err("keyring and key-env are alternatives: give one".into());
        }
        Ok(c)
    }

    /// Where the cluster is and how this process logs in, as the RADOS blocker takes it.
    #[cfg(feature = "rados")]
    pub fn connect(&self) -> crate::blocker::rados::Connect {
        crate::blocker::rados::Connect {
            conf: self.conf.clone(),
            monitors: self.monitors.clone(),
            client: self.client.clone(),
            keyring: self.keyring.clone(),
            key_env: self.key_env.clone(),
            timeout: crate::blocker::rados::DEFAULT_TIMEOUT,
        }
    }
}

impl fmt::Display for RadosConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rados:pool={},namespace={}", self.pool, self.namespace)?;
        if let Some(conf) = &self.conf {
            write!(f, ",conf={}", conf.display())?;
        }
        if !self.monitors.is_empty() {
            write!(f, ",mon={}", self.monitors.join(";"))?;
        }
        write!(f, ",id={}", self.client)?;
        if let Some(k) = &self.keyring {
            write!(f, ",keyring={}", k.display())?;
        }
        if let Some(v) = &self.key_env {
            write!(f, ",key-env={v}")?;
        }
        Ok(())
    }
}

/// What can go wrong describing or opening a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("invalid backend {input:?}: {reason}")]
    Invalid { input: String, reason: String },
    #[error("unknown backend {kind:?} (this build serves {known})")]
    UnknownKind { kind: String, known: String },
    #[error("the {kind:?} backend needs a build with the cargo feature {feature:?}")]
    NeedsFeature {
        kind: &'static str,
        feature: &'static str,
    },
    #[error("opening the {backend} backend: {source}")]
    Open {
        backend: String,
        #[source]
        source: BlockerError,
    },
    #[error("identifying the {backend} backend: {source}")]
    Identify {
        backend: String,
        #[source]
        source: std::io::Error,
    },
}

/// Refuses a keyring that users other than its owner's group can read: a cephx key in a
/// world-readable file is a key every local user has. (A Kubernetes Secret volume is mode 0644
/// unless its `defaultMode` says otherwise; the chart sets 0400.)
#[cfg(feature = "rados")]
fn check_keyring_private(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("the keyring {} cannot be read: {e}", path.display()))?;
    let mode = meta.permissions().mode();
    if mode & 0o004 != 0 {
        return Err(format!(
            "the keyring {} is readable by every user (mode {:o}): make it 0600 or 0400",
            path.display(),
            mode & 0o777
        ));
    }
    Ok(())
}

impl BackendConfig {
    /// The file backend rooted at `dir`.
    pub fn file(dir: impl Into<PathBuf>) -> Self {
        BackendConfig::File { dir: dir.into() }
    }

    pub fn kind(&self) -> BackendKind {
        match self {
            BackendConfig::File { .. } => BackendKind::File,
            BackendConfig::Rados(_) => BackendKind::Rados,
        }
    }

    /// Parses the text form (see the [module](self)), e.g. `file:/var/lib/archip`.
    pub fn parse(input: &str) -> Result<Self, BackendError> {
        let invalid = |reason: &str| BackendError::Invalid {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        let (kind, args) = match input.split_once(':') {
            Some((kind, args)) => (kind, Some(args)),
            None => (input, None),
        };
        if kind.is_empty() {
            return Err(invalid("empty backend kind (expected KIND:ARGUMENTS)"));
        }
        match BackendKind::parse(kind)? {
            BackendKind::File => {
                let dir = args
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| invalid("the file backend needs a directory: file:/PATH"))?;
                if dir.contains('\0') {
                    return Err(invalid("the directory contains a NUL byte"));
                }
                let dir = Path::new(dir);
                if !dir.is_absolute() {
                    // Peers run as separate processes, maybe from other working directories:
                    // a relative path would name a different directory in each.
                    return Err(invalid("the file backend's directory must be absolute"));
                }
                Ok(BackendConfig::file(dir))
            }
            BackendKind::Rados => RadosConfig::parse(args.unwrap_or(""))
                .map(BackendConfig::Rados)
                .map_err(|reason| invalid(&reason)),
        }
    }

    /// Opens one store of this backend: the only place a blocker is made from configuration.
    pub fn open(&self, store: Store) -> Result<Arc<dyn Blocker>, BackendError> {
        match self {
            BackendConfig::File { dir } => {
                let blocker = FileBlocker::open(dir.join(store.subdir())).map_err(|source| {
                    BackendError::Open {
                        backend: self.to_string(),
                        source,
                    }
                })?;
                Ok(Arc::new(blocker))
            }
            #[cfg(feature = "rados")]
            BackendConfig::Rados(_) => Ok(self.open_rados(store)?),
            #[cfg(not(feature = "rados"))]
            BackendConfig::Rados(_) => Err(BackendError::NeedsFeature {
                kind: "rados",
                feature: "rados",
            }),
        }
    }

    /// Opens one store of a RADOS backend as the concrete blocker, for what needs librados
    /// beyond the blocker interface (watch/notify, [`crate::blocker::rados::watch`]).
    #[cfg(feature = "rados")]
    pub fn open_rados(
        &self,
        store: Store,
    ) -> Result<Arc<crate::blocker::RadosBlocker>, BackendError> {
        let BackendConfig::Rados(c) = self else {
            return Err(BackendError::Open {
                backend: self.to_string(),
                source: crate::blocker::BlockerError::io(
                    self.to_string(),
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a rados backend"),
                ),
            });
        };
        if let Some(keyring) = &c.keyring {
            check_keyring_private(keyring).map_err(|reason| BackendError::Invalid {
                input: self.to_string(),
                reason,
            })?;
        }
        let blocker =
            crate::blocker::RadosBlocker::connect(&c.connect(), &c.pool, &c.namespace_of(store))
                .map_err(|source| BackendError::Open {
                    backend: self.to_string(),
                    source,
                })?;
        Ok(Arc::new(blocker))
    }

    /// The [`BackendId`] that a blocker opened on this backend's [`Store::Objects`] reports,
    /// found without opening (or creating) anything: what a process that only compares
    /// backends (the CSI controller, deciding whether to forward to a peer set) needs.
    pub fn identity(&self) -> Result<BackendId, BackendError> {
        match self {
            BackendConfig::File { dir } => {
                file::dir_identity(&dir.join(OBJECTS_SUBDIR)).map_err(|source| {
                    BackendError::Identify {
                        backend: self.to_string(),
                        source,
                    }
                })
            }
            // The identity is the cluster's fsid, which only the cluster knows: connect (which
            // creates nothing) and ask.
            BackendConfig::Rados(_) => self.open(Store::Objects).map(|b| b.identity()),
        }
    }

    /// Where a store lives, for humans (logs, registry entries).
    pub fn location(&self, store: Store) -> String {
        match self {
            BackendConfig::File { dir } => {
                format!("file:{}", dir.join(store.subdir()).display())
            }
            BackendConfig::Rados(c) => {
                format!("rados:pool={},namespace={}", c.pool, c.namespace_of(store))
            }
        }
    }
}

impl fmt::Display for BackendConfig {
    /// The text form [`BackendConfig::parse`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendConfig::File { dir } => write!(f, "file:{}", dir.display()),
            BackendConfig::Rados(c) => c.fmt(f),
        }
    }
}

impl FromStr for BackendConfig {
    type Err = BackendError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(BackendKind::parse("file").unwrap(), BackendKind::File);
        #[cfg(not(feature = "rados"))]
        {
            let e = BackendKind::parse("rados").unwrap_err();
            assert!(matches!(e, BackendError::NeedsFeature { .. }), "{e}");
            assert!(e.to_string().contains("feature \"rados\""), "{e}");
        }
        #[cfg(feature = "rados")]
        assert_eq!(BackendKind::parse("rados").unwrap(), BackendKind::Rados);
        for bad in ["", "File", "nfs", "file "] {
            let e = BackendKind::parse(bad).unwrap_err();
            assert!(
                matches!(e, BackendError::UnknownKind { .. }),
                "{bad:?}: {e}"
            );
            assert!(e.to_string().contains("\"file\""), "names what exists: {e}");
        }
    }

    #[test]
    fn parse_and_render_round_trip() {
        for text in [
            "file:/var/lib/archip",
            "file:/",
            "file:/with space/and,comma",
        ] {
            let b = BackendConfig::parse(text).unwrap();
            assert_eq!(b.kind(), BackendKind::File);
            assert_eq!(b.to_string(), text);
            assert_eq!(text.parse::<BackendConfig>().unwrap(), b);
        }
        assert_eq!(
            BackendConfig::parse("file:/data").unwrap(),
            BackendConfig::file("/data")
        );
        assert_eq!(
            BackendConfig::file("/data").location(Store::Records),
            "file:/data/csi"
        );
    }

    #[test]
    fn bad_descriptions_say_what_is_wrong() {
        for (text, says) in [
            ("", "empty backend kind"),
            (":/x", "empty backend kind"),
            ("file", "needs a directory"),
            ("file:", "needs a directory"),
            ("file:data", "must be absolute"),
            ("file:/a\0b", "NUL"),
            ("nfs:/x", "unknown backend \"nfs\""),
            #[cfg(not(feature = "rados"))]
            ("rados:pool=rbd", "cargo feature \"rados\""),
            #[cfg(feature = "rados")]
            ("rados:pool=rbd", "needs conf=PATH or mon="),
            #[cfg(feature = "rados")]
            ("rados:conf=/c", "needs a pool"),
            #[cfg(feature = "rados")]
            ("rados:pool=p,conf=/c,key=AQBsecret", "never put the key"),
            #[cfg(feature = "rados")]
            ("rados:pool=p,conf=c", "absolute"),
            #[cfg(feature = "rados")]
            ("rados:pool=p,conf=/c,colour=red", "unknown setting"),
        ] {
            let e = BackendConfig::parse(text).unwrap_err().to_string();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn stores_keep_the_file_layout() {
        let dir = tempfile::tempdir().unwrap();
        let b = BackendConfig::file(dir.path());
        assert!(b.identity().is_err(), "nothing opened yet, nothing created");
        let objects = b.open(Store::Objects).unwrap();
        let records = b.open(Store::Records).unwrap();
        assert!(dir.path().join("objects").is_dir());
        assert!(dir.path().join("csi").is_dir());
        assert_eq!(b.identity().unwrap(), objects.identity());
        assert_ne!(objects.identity(), records.identity());
        assert_eq!(
            b.open(Store::Objects).unwrap().identity(),
            objects.identity()
        );
    }

    #[cfg(feature = "rados")]
    #[test]
    fn rados_parse_and_render_round_trip() {
        for text in [
            "rados:pool=archip,namespace=ns,conf=/etc/ceph/ceph.conf,id=admin,keyring=/k",
            "rados:pool=p,namespace=archip,mon=10.0.0.1:6789;10.0.0.2,id=csi,key-env=CEPH_KEY",
        ] {
            let b = BackendConfig::parse(text).unwrap();
            assert_eq!(b.kind(), BackendKind::Rados);
            assert_eq!(b.to_string(), text);
        }
        let b = BackendConfig::parse("rados:pool=p,conf=/c").unwrap();
        assert_eq!(
            b.to_string(),
            "rados:pool=p,namespace=archip,conf=/c,id=admin"
        );
        assert_eq!(
            b.location(Store::Records),
            "rados:pool=p,namespace=archip.csi"
        );
    }
}
