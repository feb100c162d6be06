//! The cephx credentials a RADOS StorageClass passes in its CSI secrets, and the check the
//! controller makes of them before acting for a request.
//!
//! The secrets have the form ceph-csi users know: `userID` (the cephx id without `client.`) and
//! `userKey` (the base64 key `ceph auth get-key` prints). They are the provisioner,
//! controller-expand and node-stage secrets a StorageClass names
//! (`csi.storage.k8s.io/provisioner-secret-name` ...), so a storage admin grants a class the use
//! of a pool by giving it a key whose caps allow it.
//!
//! # How a credential reaches the peer set (and why it does not)
//!
//! The peer set that serves a node's volumes is long-lived and shared by every volume on the
//! node: a mapped volume keeps writing through it while no CSI call is in flight, after the
//! node plugin restarted, and while the Secret is rotated or deleted. A key that only lives in
//! a request would be gone when the data path needs it, and a key handed to a peer set per
//! request would have to be kept anyway. So the peer sets (node and controller) are started
//! with the cluster description and a standing credential of the driver: `--backend
//! rados:pool=P,namespace=N,conf=PATH,id=ID,keyring=PATH` where the keyring is a Secret volume
//! mounted 0400 (`open` refuses a world-readable keyring), or `key-env=VAR` set from a Secret
//! in the container's own environment. The key never appears in an argument list, and the
//! driver never writes one to a file.
//!
//! A request's secrets are then the authorization for that request: the controller logs in to
//! the cluster with them and reads the volume's namespace ([`peers::blocker::rados`]'s
//! `check_credentials`), so a class whose key the cluster refuses, or whose caps do not cover
//! the pool and namespace, gets nothing done (UNAUTHENTICATED / PERMISSION_DENIED, before any
//! change). A successful check is remembered for [`TRUST_FOR`] under a digest of the
//! credentials, never the key itself, so a burst of CreateVolumes costs one login and a revoked
//! key stops working within that time.
//!
//! The secrets are never logged (the request `Debug`s redact them, [`crate::redact`]), never
//! stored in the controller's records or the volume context, and [`CephKey`] prints as
//! `<redacted>` and is wiped when dropped.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Instant;

use peers::backend::{BackendConfig, RadosConfig};

use base64::Engine as _;
use zeroize::Zeroizing;

use crate::errors::{CsiError, CsiResult};

/// Secret: the cephx id, without `client.` (ceph-csi's name).
pub const USER_ID: &str = "userID";
/// Secret: the cephx key, base64 as `ceph auth get-key` prints it (ceph-csi's name).
pub const USER_KEY: &str = "userKey";

/// How long a checked credential is trusted without asking the cluster again.
pub const TRUST_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// Longest cephx id accepted: an entity name is short, and this bounds what a request makes us
/// send to the monitors.
const MAX_USER_ID: usize = 128;

/// A cephx key. Only its length shows in `Debug`; its memory is wiped when dropped.
pub struct CephKey(Zeroizing<String>);

impl CephKey {
    /// The key as librados takes it (base64).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for CephKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `userID` and `userKey` from a request's secrets, checked for form.
#[derive(Debug)]
pub struct CephCredentials {
    /// The cephx id, without `client.`.
    pub user: String,
    /// The key.
    pub key: CephKey,
}

impl CephCredentials {
    /// Reads the credentials from `secrets` (the request field named `field`). Missing or
    /// malformed ones are INVALID_ARGUMENT; messages name keys, never values.
    pub fn from_secrets(field: &str, secrets: &HashMap<String, String>) -> CsiResult<Self> {
        let get = |key: &str| {
            secrets.get(key).ok_or_else(|| {
                CsiError::InvalidArgument(format!(
                    "{field} lacks {key:?}: a RADOS volume needs the cephx credentials {USER_ID:?} and {USER_KEY:?} in the StorageClass secrets"
                ))
            })
        };
        let user = get(USER_ID)?;
        let key = get(USER_KEY)?;
        check_user_id(user).map_err(|why| {
            CsiError::InvalidArgument(format!("{field}: {USER_ID:?} is not a cephx id: {why}"))
        })?;
        check_key(key).map_err(|why| {
            CsiError::InvalidArgument(format!("{field}: {USER_KEY:?} is not a cephx key: {why}"))
        })?;
        Ok(CephCredentials {
            user: user.clone(),
            key: CephKey(Zeroizing::new(key.clone())),
        })
    }

    /// A digest naming these credentials on `target` in the cache of checked ones: equal only
    /// for the same id, key and target, and useless to recover the key from.
    pub fn digest(&self, target: &str) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for part in [self.user.as_str(), self.key.expose(), target] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.finalize().into()
    }
}

fn check_user_id(user: &str) -> Result<(), String> {
    if user.is_empty() || user.len() > MAX_USER_ID {
        return Err(format!("it must have 1 to {MAX_USER_ID} characters"));
    }
    if user.starts_with("client.") {
        return Err("give the id without the \"client.\" prefix".into());
    }
    if !user
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err("only alphanumerics, '-', '_' and '.' are allowed".into());
    }
    Ok(())
}

/// A cephx key is base64 of 28 bytes: the crypto type (u16, 1 = AES), the creation time (two
/// u32), the secret's length (u16, 16) and the 16-byte secret.
fn check_key(key: &str) -> Result<(), String> {
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .map_err(|_| "it is not base64 (copy it from `ceph auth get-key client.ID`)")?,
    );
    if bytes.len() != 28 {
        return Err(format!("it decodes to {} bytes, not 28", bytes.len()));
    }
    if bytes[0..2] != [1, 0] || bytes[10..12] != [16, 0] {
        return Err("it is not an AES cephx key".into());
    }
    Ok(())
}

/// Checks the secrets of requests against the backend a driver serves: nothing for the file
/// backend; for RADOS, cephx credentials the cluster accepts for the pool and namespace. The
/// controller and the node service (NodeStage) each hold one. Runs before a request changes
/// anything.
#[derive(Debug)]
pub struct Authorizer {
    backend: BackendConfig,
    /// Credentials the cluster accepted lately, by [`CephCredentials::digest`], with when.
    trusted: Mutex<HashMap<[u8; 32], Instant>>,
}

impl Authorizer {
    pub fn new(backend: BackendConfig) -> Self {
        Self {
            backend,
            trusted: Mutex::default(),
        }
    }

    /// Accepts `secrets` for a request on this backend, or says why not: INVALID_ARGUMENT for
    /// missing or malformed credentials, UNAUTHENTICATED for a key the cluster refuses,
    /// PERMISSION_DENIED for caps that do not cover the pool and namespace, UNAVAILABLE when
    /// the cluster cannot be asked.
    pub async fn authorize(&self, secrets: &HashMap<String, String>) -> CsiResult<()> {
        let BackendConfig::Rados(ours) = &self.backend else {
            return Ok(());
        };
        let creds = CephCredentials::from_secrets("secrets", secrets)?;
        let digest = creds.digest(&self.backend.to_string());
        {
            let mut trusted = self.trusted.lock().expect("never poisoned");
            trusted.retain(|_, at| at.elapsed() < TRUST_FOR);
            if trusted.contains_key(&digest) {
                return Ok(());
            }
        }
        check_with_cluster(ours, &creds).await?;
        self.trusted
            .lock()
            .expect("never poisoned")
            .insert(digest, Instant::now());
        Ok(())
    }
}

#[cfg(feature = "rados")]
async fn check_with_cluster(ours: &RadosConfig, creds: &CephCredentials) -> CsiResult<()> {
    use peers::blocker::rados::{CredentialError, check_credentials};
    let connect = ours.connect();
    let (pool, namespace) = (ours.pool.clone(), ours.namespace.clone());
    let user = creds.user.clone();
    let key = Zeroizing::new(creds.key.expose().to_owned());
    let checked = tokio::task::spawn_blocking(move || {
        check_credentials(&connect, &user, &key, &pool, &namespace)
    })
    .await
    .map_err(|e| CsiError::Internal(format!("checking the credentials: {e}")))?;
    checked.map_err(|e| match e {
        CredentialError::Refused { .. } => CsiError::Unauthenticated(e.to_string()),
        CredentialError::Denied { .. } => CsiError::PermissionDenied(e.to_string()),
        CredentialError::NoPool { .. } => CsiError::FailedPrecondition(e.to_string()),
        CredentialError::Cluster { .. } => CsiError::Unavailable(e.to_string()),
    })
}

#[cfg(not(feature = "rados"))]
async fn check_with_cluster(_: &RadosConfig, _: &CephCredentials) -> CsiResult<()> {
    Err(CsiError::FailedPrecondition(
        "this build has no RADOS support (cargo feature \"rados\")".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AQBVbH5f8AAAABAA9cYzS4cpB4j7nUfHc2oTuw==";

    fn secrets(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn the_file_backend_takes_no_credentials() {
        let a = Authorizer::new(BackendConfig::file("/nonexistent"));
        a.authorize(&HashMap::new()).await.unwrap();
    }

    #[test]
    fn well_formed_credentials() {
        let c = CephCredentials::from_secrets(
            "secrets",
            &secrets(&[("userID", "csi"), ("userKey", KEY)]),
        )
        .unwrap();
        assert_eq!(c.user, "csi");
        let shown = format!("{c:?}");
        assert!(
            !shown.contains(KEY) && shown.contains("redacted"),
            "{shown}"
        );
        assert_ne!(c.digest("a"), c.digest("b"));
    }

    #[test]
    fn bad_credentials_are_invalid_and_never_quoted() {
        for (pairs, says) in [
            (vec![], "lacks \"userID\""),
            (vec![("userID", "csi")], "lacks \"userKey\""),
            (vec![("userKey", KEY)], "lacks \"userID\""),
            (vec![("userID", "client.csi"), ("userKey", KEY)], "prefix"),
            (vec![("userID", "a b"), ("userKey", KEY)], "alphanumerics"),
            (vec![("userID", ""), ("userKey", KEY)], "characters"),
            (vec![("userID", "csi"), ("userKey", "not-a-key!")], "base64"),
            (vec![("userID", "csi"), ("userKey", "AAAA")], "not 28"),
            (
                vec![
                    ("userID", "csi"),
                    ("userKey", "AgBVbH5f8AAAABAA9cYzS4cpB4j7nUfHc2oTuw=="),
                ],
                "AES",
            ),
        ] {
            let e = CephCredentials::from_secrets("secrets", &secrets(&pairs)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{pairs:?}");
            let text = e.to_string();
            assert!(text.contains(says), "{pairs:?}: {text}");
            for (_, v) in &pairs {
                if v.len() > 4 {
                    assert!(*v == "csi" || !text.contains(v), "quotes a value: {text}");
                }
            }
        }
    }
}
