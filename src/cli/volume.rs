//! `archip volume ...`, `archip snapshot ...` and `archip clone`: the catalogue.

use clap::{Args, Subcommand};

use super::{Context, check_name, print_json, utc};
use crate::control::client::Connection;
use crate::control::protocol::{Request, Volume};
use crate::size::{human, size_arg};

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Create an empty (thin, all-zero) volume.
    Create {
        /// Name of the new volume.
        name: String,
        /// Size, e.g. 10G, 512M, 4K (binary units).
        #[arg(long, value_parser = size_arg)]
        size: u64,
        /// Bytes per block (data object): a power of two from 4K to 64M. Default: 4M.
        #[arg(long, value_parser = size_arg)]
        block_size: Option<u64>,
    },
    /// List volumes (snapshots: `archip snapshot list`).
    List,
    /// Show a volume or snapshot.
    Info {
        /// Volume or snapshot to show.
        name: String,
    },
    /// Grow a volume (shrinking is refused).
    Resize {
        /// Volume to grow.
        name: String,
        #[arg(long, value_parser = size_arg)]
        size: u64,
    },
    /// Delete a volume; its objects are reclaimed by `archip gc`.
    Delete {
        /// Volume to delete.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Take an instant, read-only snapshot of VOLUME named SNAP.
    Create {
        /// Volume to snapshot.
        volume: String,
        /// Name of the new snapshot.
        snapshot: String,
    },
    /// List snapshots, of VOLUME only if given.
    List {
        /// Only the snapshots of this volume.
        volume: Option<String>,
    },
    /// Delete a snapshot; its objects are reclaimed by `archip gc`.
    Delete {
        /// Snapshot to delete.
        snapshot: String,
    },
}

#[derive(Args, Debug)]
pub struct CloneArgs {
    /// A snapshot, or a volume (which then gets an implicit snapshot).
    pub source: String,
    /// Name of the new writable volume.
    pub name: String,
    /// Size of the clone (at least the source's). Default: the source's size.
    #[arg(long, value_parser = size_arg)]
    pub size: Option<u64>,
}

fn show(ctx: &Context, verb: &str, v: &Volume) -> anyhow::Result<()> {
    if ctx.json {
        return print_json(v);
    }
    println!(
        "{verb} {} {}: {} ({} bytes), block size {}{}",
        v.kind,
        v.name,
        human(v.size),
        v.size,
        human(v.block_size),
        v.parent
            .as_deref()
            .map(|p| format!(", from {p}"))
            .unwrap_or_default()
    );
    Ok(())
}

fn details(v: &Volume) {
    println!("name:        {}", v.name);
    println!("kind:        {}", v.kind);
    println!("uuid:        {}", v.uuid);
    println!("size:        {} ({} bytes)", human(v.size), v.size);
    println!("block size:  {}", human(v.block_size));
    println!("epoch:       {}", v.epoch);
    println!("parent:      {}", v.parent.as_deref().unwrap_or("-"));
    println!("created:     {} UTC", utc(v.created));
}

/// A table of volumes or snapshots.
pub fn table(vs: &[Volume]) {
    if vs.is_empty() {
        println!("(none)");
        return;
    }
    let w = vs.iter().map(|v| v.name.len()).max().unwrap_or(4).max(4);
    println!(
        "{:<w$}  {:>10}  {:>8}  {:>5}  {:<20}  CREATED (UTC)",
        "NAME", "SIZE", "BLOCK", "EPOCH", "PARENT"
    );
    for v in vs {
        println!(
            "{:<w$}  {:>10}  {:>8}  {:>5}  {:<20}  {}",
            v.name,
            human(v.size),
            human(v.block_size),
            v.epoch,
            v.parent.as_deref().unwrap_or("-"),
            utc(v.created)
        );
    }
}

fn list(ctx: &Context, request: Request) -> anyhow::Result<()> {
    let vs: Vec<Volume> = Connection::call(&ctx.socket(), &request)?;
    if ctx.json {
        return print_json(&vs);
    }
    table(&vs);
    Ok(())
}

pub fn volume(ctx: &Context, cmd: VolumeCmd) -> anyhow::Result<()> {
    let socket = ctx.socket();
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            block_size,
        } => {
            check_name("volume", &name)?;
            let v: Volume = Connection::call(
                &socket,
                &Request::VolumeCreate {
                    name,
                    size,
                    block_size,
                },
            )?;
            show(ctx, "created", &v)
        }
        VolumeCmd::List => list(ctx, Request::VolumeList),
        VolumeCmd::Info { name } => {
            check_name("volume", &name)?;
            let v: Volume = Connection::call(&socket, &Request::VolumeInfo { name })?;
            if ctx.json {
                return print_json(&v);
            }
            details(&v);
            Ok(())
        }
        VolumeCmd::Resize { name, size } => {
            check_name("volume", &name)?;
            let v: Volume = Connection::call(&socket, &Request::VolumeResize { name, size })?;
            show(ctx, "resized", &v)
        }
        VolumeCmd::Delete { name } => {
            check_name("volume", &name)?;
            let v: Volume = Connection::call(&socket, &Request::VolumeDelete { name })?;
            show(ctx, "deleted", &v)
        }
    }
}

pub fn snapshot(ctx: &Context, cmd: SnapshotCmd) -> anyhow::Result<()> {
    let socket = ctx.socket();
    match cmd {
        SnapshotCmd::Create { volume, snapshot } => {
            check_name("volume", &volume)?;
            check_name("snapshot", &snapshot)?;
            let v: Volume =
                Connection::call(&socket, &Request::SnapshotCreate { volume, snapshot })?;
            show(ctx, "created", &v)
        }
        SnapshotCmd::List { volume } => {
            if let Some(v) = &volume {
                check_name("volume", v)?;
            }
            list(ctx, Request::SnapshotList { volume })
        }
        SnapshotCmd::Delete { snapshot } => {
            check_name("snapshot", &snapshot)?;
            let v: Volume = Connection::call(&socket, &Request::SnapshotDelete { name: snapshot })?;
            show(ctx, "deleted", &v)
        }
    }
}

pub fn clone(ctx: &Context, args: CloneArgs) -> anyhow::Result<()> {
    check_name("source", &args.source)?;
    check_name("volume", &args.name)?;
    let v: Volume = Connection::call(
        &ctx.socket(),
        &Request::Clone {
            source: args.source,
            name: args.name,
            size: args.size,
        },
    )?;
    show(ctx, "created", &v)
}
