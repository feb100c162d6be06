//! A full backend, for real: the file backend on a size-limited tmpfs. Writes fill a volume
//! until the backend answers ENOSPC (as NoSpace, never as a generic I/O error),
//! CreateVolume on the full backend is RESOURCE_EXHAUSTED and creates nothing, and once space
//! is freed (delete + GC) writing goes on and everything flushed before is intact.
//!
//! Mounting needs root (CI runs the tests as root); elsewhere the test says so and returns.

mod plugin;

use std::path::{Path, PathBuf};
use std::process::Command;

use peers::client::ClientError;
use peers::wire::GcRequest;
use tonic::Code;

use csi::pb::*;
use plugin::*;

/// Size of the tmpfs: room for the volume kept throughout, a filler, and the records.
const TMPFS_MIB: u64 = 40;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs {
    at: PathBuf,
    _outer: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u64) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: mounting a size-limited tmpfs needs root (CI runs this as root)");
            return None;
        }
        let outer = tempfile::tempdir().expect("tempdir");
        let at = outer.path().join("tmpfs");
        std::fs::create_dir(&at).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "archip-full",
            ])
            .arg(&at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Tmpfs { at, _outer: outer })
    }

    fn path(&self) -> &Path {
        &self.at
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

fn is_no_space(e: &ClientError) -> bool {
    match e {
        ClientError::NoSpace(_) => true,
        ClientError::Io(m) => csi::errors::says_out_of_space(m),
        _ => false,
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backend_says_so_and_recovers_once_space_is_freed() {
    let Some(fs) = Tmpfs::mount(TMPFS_MIB) else {
        return;
    };
    let p = Plugin::start_in("full", tempfile::tempdir_in(fs.path()).unwrap()).await;
    let mut c = p.controller();

    // A volume through CSI whose first half is written and flushed before the disk fills.
    let keep = c
        .create_volume(create("pvc-keep", 8 * MI))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let name = csi::ids::backend_name(&keep.volume_id).unwrap().to_owned();
    let before = pattern(1, 4 * MI as usize);
    p.volumes.write(&name, 0, &before).await.unwrap();
    p.volumes.flush(&name).await.unwrap();

    // A filler larger than the tmpfs, written until the backend is full: 1 MiB writes, then
    // 4 KiB ones for what is left. Each must fail as "no space", never as a generic error.
    p.volumes
        .create("filler", 2 * TMPFS_MIB * MI, Some(MI))
        .await
        .unwrap();
    let mut offset = 0u64;
    for chunk in [MI as usize, 4096] {
        let data = pattern(offset + 7, chunk);
        loop {
            assert!(
                offset < 2 * TMPFS_MIB * MI,
                "the filler never hit a full disk"
            );
            match p.volumes.write("filler", offset, &data).await {
                Ok(()) => offset += chunk as u64,
                Err(e) => {
                    assert!(is_no_space(&e), "a full disk answered {e:?}, not NoSpace");
                    // The next write starts at a fresh block, so its object is new.
                    offset = offset.next_multiple_of(MI) + MI;
                    break;
                }
            }
        }
    }
    eprintln!("filler: the disk filled up at about {} MiB", offset / MI);

    // CreateVolume on the full backend: RESOURCE_EXHAUSTED, and no volume appears.
    let listed = |v: ListVolumesResponse| -> Vec<String> {
        v.entries
            .into_iter()
            .map(|e| e.volume.unwrap().volume_id)
            .collect()
    };
    let ids_before = listed(
        c.list_volumes(ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner(),
    );
    let e = c
        .create_volume(create("pvc-more", 4 * MI))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("space"), "{e:?}");
    let ids_after = listed(
        c.list_volumes(ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(
        ids_after, ids_before,
        "a refused CreateVolume left a volume"
    );

    // The flushed data is intact on the full disk.
    let mut got = vec![0u8; before.len()];
    p.volumes.read(&name, 0, &mut got).await.unwrap();
    assert!(
        got == before,
        "flushed data changed while the disk was full"
    );

    // Free space: delete the filler and collect its objects.
    p.volumes.delete("filler").await.unwrap();
    let gc = p
        .volumes
        .gc_with(GcRequest {
            grace_secs: 0,
            dry_run: false,
        })
        .await
        .unwrap();
    assert!(gc.deleted_bytes >= 8 * MI, "gc freed too little: {gc:?}");

    // Writing goes on, and CreateVolume works again.
    let after = pattern(2, 4 * MI as usize);
    p.volumes.write(&name, 4 * MI, &after).await.unwrap();
    p.volumes.flush(&name).await.unwrap();
    let more = c
        .create_volume(create("pvc-more", 4 * MI))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(!more.volume_id.is_empty());
    let mut got = vec![0u8; 8 * MI as usize];
    p.volumes.read(&name, 0, &mut got).await.unwrap();
    assert!(
        got[..4 * MI as usize] == before[..],
        "data flushed before the disk filled is lost"
    );
    assert!(
        got[4 * MI as usize..] == after[..],
        "data written after freeing space is wrong"
    );
    drop(c);
    drop(p);
    drop(fs);
}
