//! `archip import FILE VOLUME` and `archip export VOLUME FILE`: raw images, streamed over the
//! control socket, so that the file is read and written with the caller's own permissions and
//! paths (the `up` process may run elsewhere, as another user, in another mount namespace).
//!
//! Import sends whole blocks; an all-zero block is sent as a `zero` frame (no bytes), and the
//! peers store every other block as a content-addressed object, so identical blocks anywhere
//! are stored once. Export writes a sparse file: zero ranges become holes.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{Context, check_name, print_json};
use crate::control::client::{Connection, Refused};
use crate::control::protocol::{
    ExportSummary, Frame, ImportSummary, MAX_FRAME, Reply, Request, Volume,
};
use crate::size::{human, size_arg};

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// Raw image file (or block device).
    pub file: PathBuf,
    /// Volume to write; created if missing, sized to the image rounded up to 512 bytes.
    pub volume: String,
    /// Size of the volume to create, or to grow an existing one to.
    #[arg(long, value_parser = size_arg)]
    pub size: Option<u64>,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Volume or snapshot to read.
    pub volume: String,
    /// Raw image to write (replaced if it exists; sparse).
    pub file: PathBuf,
}

/// Data frames carry up to this much, so that small blocks still travel in large requests.
const BATCH: u64 = 4 << 20;

/// A byte progress bar on stderr when it is a terminal (hidden otherwise, and for --json).
fn progress(ctx: &Context, total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(total),
        if ctx.json {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        },
    );
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Frames waiting to be sent: one run of data blocks, or one run of zero blocks.
enum Run {
    None,
    Data { offset: u64, bytes: Vec<u8> },
    Zero { offset: u64, len: u64 },
}

fn flush_run(conn: &mut Connection, run: &mut Run) -> std::io::Result<()> {
    match std::mem::replace(run, Run::None) {
        Run::None => Ok(()),
        Run::Data { offset, bytes } => {
            conn.send(&Frame::Data {
                offset,
                len: bytes.len() as u64,
            })?;
            conn.send_bytes(&bytes)
        }
        Run::Zero { offset, len } => conn.send(&Frame::Zero { offset, len }),
    }
}

pub fn import(ctx: &Context, args: ImportArgs) -> anyhow::Result<()> {
    check_name("volume", &args.volume)?;
    let mut file =
        File::open(&args.file).with_context(|| format!("opening {}", args.file.display()))?;
    // Seek rather than metadata: a block device reports its size only this way.
    let image_size = file
        .seek(SeekFrom::End(0))
        .and_then(|n| file.seek(SeekFrom::Start(0)).map(|_| n))
        .with_context(|| format!("sizing {}", args.file.display()))?;
    if image_size == 0 {
        return Err(Refused::invalid(format!("{} is empty", args.file.display())).into());
    }
    let mut conn = Connection::open(
        &ctx.socket(),
        &Request::Import {
            volume: args.volume.clone(),
            image_size,
            size: args.size,
        },
    )?;
    let (vol, _created) = match conn.next()? {
        Reply::Ready { volume, created } => (volume, created),
        other => anyhow::bail!("unexpected reply to import: {other:?}"),
    };
    let bs = vol.block_size;
    anyhow::ensure!(
        bs > 0 && bs <= MAX_FRAME && image_size <= vol.size,
        "archip up answered with an unusable volume: {vol:?}"
    );
    let bar = progress(ctx, image_size, "import");
    let mut block = vec![0u8; bs as usize];
    let mut run = Run::None;
    let mut offset = 0u64;
    let sent = (|| -> anyhow::Result<()> {
        while offset < image_size {
            let got = read_full(&mut file, &mut block)
                .with_context(|| format!("reading {}", args.file.display()))?;
            anyhow::ensure!(
                got > 0,
                "{} ended at {offset} bytes, before its size of {image_size}",
                args.file.display()
            );
            // The image's last block is padded with zeros to a whole block (or to the end of
            // the volume), as the peers take whole blocks only.
            let len = bs.min(vol.size - offset);
            block[got..].fill(0);
            let data = &block[..len as usize];
            let zero = data.iter().all(|&b| b == 0);
            match (&mut run, zero) {
                (Run::Zero { len: l, .. }, true) if *l + len <= MAX_FRAME => *l += len,
                (Run::Data { bytes, .. }, false) if (bytes.len() as u64) + len <= BATCH => {
                    bytes.extend_from_slice(data)
                }
                _ => {
                    flush_run(&mut conn, &mut run)?;
                    run = if zero {
                        Run::Zero { offset, len }
                    } else {
                        Run::Data {
                            offset,
                            bytes: data.to_vec(),
                        }
                    };
                }
            }
            offset += len;
            bar.set_position(offset.min(image_size));
        }
        flush_run(&mut conn, &mut run)?;
        conn.send(&Frame::End)?;
        conn.flush()?;
        Ok(())
    })();
    if let Err(e) = sent {
        bar.abandon();
        return Err(match e.downcast::<std::io::Error>() {
            Ok(io) => conn.error_after_write_failure(io),
            Err(e) => e,
        });
    }
    let summary: ImportSummary = conn.result()?;
    bar.finish_and_clear();
    if ctx.json {
        return print_json(&summary);
    }
    println!(
        "imported {} ({}) into {}{}: {} blocks: {} written ({} stored), {} deduplicated ({} not stored), {} zero ({} skipped)",
        args.file.display(),
        human(summary.image_bytes),
        summary.volume,
        if summary.created { " (created)" } else { "" },
        summary.blocks,
        summary.written_blocks,
        human(summary.bytes_written),
        summary.deduplicated_blocks,
        human(summary.bytes_deduplicated),
        summary.zero_blocks,
        human(summary.bytes_zero),
    );
    Ok(())
}

pub fn export(ctx: &Context, args: ExportArgs) -> anyhow::Result<()> {
    check_name("volume", &args.volume)?;
    let mut conn = Connection::open(
        &ctx.socket(),
        &Request::Export {
            volume: args.volume.clone(),
        },
    )?;
    // The file is only created once the volume is known to be readable: a refused export
    // changes nothing.
    let vol: Volume = match conn.next()? {
        Reply::Ready { volume, .. } => volume,
        other => anyhow::bail!("unexpected reply to export: {other:?}"),
    };
    let out =
        File::create(&args.file).with_context(|| format!("creating {}", args.file.display()))?;
    let bar = progress(ctx, vol.size, "export");
    let written = (|| -> anyhow::Result<ExportSummary> {
        let mut buf = Vec::new();
        loop {
            match conn.next()? {
                Reply::Frame(Frame::Data { offset, len }) => {
                    anyhow::ensure!(
                        len <= MAX_FRAME && offset.checked_add(len).is_some_and(|e| e <= vol.size),
                        "archip up sent a frame {offset}+{len} outside the volume"
                    );
                    buf.resize(len as usize, 0);
                    conn.read_bytes(&mut buf)?;
                    out.write_all_at(&buf, offset)
                        .with_context(|| format!("writing {}", args.file.display()))?;
                    bar.set_position(offset + len);
                }
                // A hole: nothing to write; set_len below gives the file its full size.
                Reply::Frame(Frame::Zero { offset, len }) => bar.set_position(offset + len),
                Reply::Ok { value } => return Ok(serde_json::from_value(value)?),
                other => anyhow::bail!("unexpected message during export: {other:?}"),
            }
        }
    })()
    .and_then(|s| {
        out.set_len(vol.size)?;
        out.sync_all()
            .with_context(|| format!("syncing {}", args.file.display()))?;
        Ok(s)
    });
    let summary = match written {
        Ok(s) => s,
        Err(e) => {
            bar.abandon();
            // Do not leave a partial image that looks complete.
            let _ = std::fs::remove_file(&args.file);
            return Err(e);
        }
    };
    bar.finish_and_clear();
    if ctx.json {
        return print_json(&summary);
    }
    println!(
        "exported {} {} ({}) to {}: {} data, {} zero (holes)",
        vol.kind,
        summary.volume,
        human(summary.bytes),
        args.file.display(),
        human(summary.data_bytes),
        human(summary.zero_bytes),
    );
    Ok(())
}
