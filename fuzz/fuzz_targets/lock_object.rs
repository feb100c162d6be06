//! Lock objects as read back from a backend: the file blocker's binary lock file and the RADOS
//! blocker's text lock object (feature `rados`). The first byte picks the format; a decoded
//! lock must survive its own encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peers::fuzzing;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, bytes)) = data.split_first() else {
        return;
    };
    match sel % 3 {
        0 => {
            if let Ok(info) = fuzzing::file_lock_decode(bytes) {
                let again = fuzzing::file_lock_decode(&fuzzing::file_lock_encode(&info))
                    .expect("an encoded lock decodes");
                assert_eq!(again, info);
            }
        }
        1 => {
            // Past the checksum: recompute it so the length and holder checks get exercised.
            let mut fixed = bytes.to_vec();
            if fixed.len() >= 4 {
                let body = fixed.len() - 4;
                let crc = crc32c::crc32c(&fixed[..body]);
                fixed[body..].copy_from_slice(&crc.to_le_bytes());
            }
            if let Ok(info) = fuzzing::file_lock_decode(&fixed) {
                let again = fuzzing::file_lock_decode(&fuzzing::file_lock_encode(&info))
                    .expect("an encoded lock decodes");
                assert_eq!(again, info);
            }
        }
        _ =>
        {
            #[cfg(feature = "rados")]
            if let Ok((info, address)) = fuzzing::rados_lock_decode(bytes) {
                let again = fuzzing::rados_lock_decode(&fuzzing::rados_lock_encode(
                    info.clone(),
                    address.clone(),
                ))
                .expect("an encoded lock decodes");
                assert_eq!(again, (info, address));
            }
        }
    }
});
