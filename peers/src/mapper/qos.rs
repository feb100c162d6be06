//! A volume's I/O limits (QoS): stored beside its map, enforced by every node's vlmc.
//!
//! The limits are a small map object of their own (`qs.<uuid>`), not a header field: the
//! controller changes them while a node holds the volume's lock and writes it, and a header
//! write needs that lock. Nothing else depends on them, so a plain replace is enough; vlmc
//! reads them at its first I/O to the volume and again every few seconds, so a change reaches
//! the nodes without any call to them.

use super::{Mapper, MapperError, ResultExt};
use crate::blocker::Expect;
use crate::map_format::{VolumeName, qos_object};

const MAGIC: &[u8; 4] = b"AQOS";
const FORMAT: u32 = 1;
const ENCODED: usize = 4 + 4 + 8 + 8;

/// Limits on a volume's reads and writes, summed; 0 means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QosLimits {
    pub iops: u64,
    pub bytes_per_sec: u64,
}

impl QosLimits {
    pub fn is_unlimited(&self) -> bool {
        self.iops == 0 && self.bytes_per_sec == 0
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(ENCODED);
        v.extend_from_slice(MAGIC);
        v.extend_from_slice(&FORMAT.to_le_bytes());
        v.extend_from_slice(&self.iops.to_le_bytes());
        v.extend_from_slice(&self.bytes_per_sec.to_le_bytes());
        v
    }

    fn decode(b: &[u8]) -> Option<QosLimits> {
        if b.len() != ENCODED || &b[..4] != MAGIC || b[4..8] != FORMAT.to_le_bytes() {
            return None;
        }
        let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Some(QosLimits {
            iops: u(8),
            bytes_per_sec: u(16),
        })
    }
}

impl Mapper {
    /// A volume's limits (unlimited when never set).
    pub async fn qos(&self, name: &str) -> Result<QosLimits, MapperError> {
        let name = VolumeName::new(name)?;
        let uuid = self.volume_uuid(&name).await?;
        let object = qos_object(uuid);
        match self.maps.read_map(&object).await.ctx(&name)? {
            None => Ok(QosLimits::default()),
            Some(v) => QosLimits::decode(&v.data).ok_or_else(|| {
                MapperError::Corrupt(crate::map_format::CorruptMap {
                    object: object.to_string(),
                    problem: crate::map_format::MapFormatError::Invalid("not a QoS record".into()),
                })
            }),
        }
    }

    /// Replace a volume's limits. Snapshots have none (nothing writes them, and their reads
    /// are the readers' volumes' business).
    pub async fn set_qos(&self, name: &str, limits: QosLimits) -> Result<(), MapperError> {
        let name = VolumeName::new(name)?;
        let header = self.read_header(&name).await?;
        if header.read_only() {
            return Err(MapperError::ReadOnly {
                volume: name.to_string(),
            });
        }
        let object = qos_object(header.uuid);
        self.maps
            .write_map(&object, &limits.encode(), Expect::Any, None)
            .await
            .ctx(&name)?;
        tracing::info!(volume = %name, iops = limits.iops, bytes_per_sec = limits.bytes_per_sec, "QoS limits set");
        Ok(())
    }

    async fn volume_uuid(&self, name: &VolumeName) -> Result<uuid::Uuid, MapperError> {
        if let Some(v) = self.cached(name).await? {
            return Ok(v.map().header.uuid);
        }
        Ok(self.read_header(name).await?.uuid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_round_trip_and_garbage_is_refused() {
        let l = QosLimits {
            iops: 500,
            bytes_per_sec: 100 << 20,
        };
        assert_eq!(QosLimits::decode(&l.encode()), Some(l));
        assert!(QosLimits::default().is_unlimited());
        let mut bad = l.encode();
        bad[0] ^= 1;
        assert_eq!(QosLimits::decode(&bad), None);
        assert_eq!(QosLimits::decode(&l.encode()[..10]), None);
        let mut newer = l.encode();
        newer[4] = 2;
        assert_eq!(QosLimits::decode(&newer), None);
    }
}
