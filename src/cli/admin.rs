//! `archip dedup`, `archip gc`, `archip lock info|break` and `archip status`: maintenance and
//! health.

use clap::{Args, Subcommand};

use super::{Context, check_name, print_json};
use crate::control::client::Connection;
use crate::control::protocol::{DedupSummary, GcSummary, Lock, QosSummary, Request, StatusReport};
use crate::size::human;

#[derive(Args, Debug)]
pub struct DedupArgs {
    /// Snapshot whose blocks become content-addressed (stored once across all volumes).
    pub snapshot: String,
}

#[derive(Args, Debug)]
pub struct GcArgs {
    /// Report what would be reclaimed without deleting anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Keep unreferenced objects younger than this many seconds (they may belong to an
    /// operation still in progress in another process). Default: the mapper's.
    #[arg(long, value_name = "SECS")]
    pub grace: Option<u64>,
    /// With `--grace 0`: collect even while other peer sets use the backend (their
    /// in-flight objects are then deleted as garbage).
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct QosArgs {
    /// Volume whose limits to show, or to change with the options below.
    pub volume: String,
    /// Reads plus writes per second; 0 lifts the limit.
    #[arg(long)]
    pub iops: Option<u64>,
    /// Bytes per second (K/M/G suffixes); 0 lifts the limit.
    #[arg(long, value_parser = rate_arg)]
    pub bandwidth: Option<u64>,
}

/// A size, or 0 (no limit).
fn rate_arg(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    crate::size::size_arg(s)
}

#[derive(Subcommand, Debug)]
pub enum LockCmd {
    /// Who holds VOLUME's lock, and its fencing generation.
    Info {
        /// Volume whose lock to show.
        volume: String,
    },
    /// Break VOLUME's lock whoever holds it (a dead node's). Logged; the former holder's
    /// writes are refused from now on.
    Break {
        /// Volume whose lock to break.
        volume: String,
    },
}

pub fn dedup(ctx: &Context, args: DedupArgs) -> anyhow::Result<()> {
    check_name("snapshot", &args.snapshot)?;
    let r: DedupSummary = Connection::call(
        &ctx.socket(),
        &Request::Dedup {
            snapshot: args.snapshot,
        },
    )?;
    if ctx.json {
        return print_json(&r);
    }
    println!(
        "deduplicated {}: {} blocks converted: {} new content objects ({} stored), {} already stored, {} zero",
        r.snapshot,
        r.converted,
        r.written,
        human(r.bytes_written),
        r.reused,
        r.zero
    );
    Ok(())
}

pub fn gc(ctx: &Context, args: GcArgs) -> anyhow::Result<()> {
    let r: GcSummary = Connection::call(
        &ctx.socket(),
        &Request::Gc {
            dry_run: args.dry_run,
            grace_secs: args.grace,
            force: args.force,
        },
    )?;
    if ctx.json {
        return print_json(&r);
    }
    let verb = if r.dry_run {
        "would reclaim"
    } else {
        "reclaimed"
    };
    println!(
        "gc{}: {verb} {} objects and {} map pages ({}); {} maps marked, {} objects examined, {} live, {} unreferenced but recent (kept)",
        if r.dry_run { " (dry run)" } else { "" },
        r.deleted_objects,
        r.deleted_pages,
        human(r.deleted_bytes),
        r.maps,
        r.examined,
        r.live,
        r.kept_recent
    );
    Ok(())
}

pub fn lock(ctx: &Context, cmd: LockCmd) -> anyhow::Result<()> {
    let (request, broke) = match cmd {
        LockCmd::Info { volume } => {
            check_name("volume", &volume)?;
            (Request::LockInfo { volume }, false)
        }
        LockCmd::Break { volume } => {
            check_name("volume", &volume)?;
            (Request::LockBreak { volume }, true)
        }
    };
    let l: Lock = Connection::call(&ctx.socket(), &request)?;
    if ctx.json {
        return print_json(&l);
    }
    match (broke, &l.holder) {
        (false, Some(h)) => println!(
            "volume {} is locked by {h} (generation {})",
            l.volume, l.generation
        ),
        (false, None) => println!(
            "volume {} is not locked (generation {})",
            l.volume, l.generation
        ),
        (true, Some(h)) => println!(
            "broke the lock of volume {} held by {h} (generation {}); its writes are refused from now on",
            l.volume, l.generation
        ),
        (true, None) => println!("volume {} was not locked; nothing to break", l.volume),
    }
    Ok(())
}

pub fn qos(ctx: &Context, args: QosArgs) -> anyhow::Result<()> {
    check_name("volume", &args.volume)?;
    let r: QosSummary = Connection::call(
        &ctx.socket(),
        &Request::Qos {
            volume: args.volume,
            iops: args.iops,
            bytes_per_sec: args.bandwidth,
        },
    )?;
    if ctx.json {
        return print_json(&r);
    }
    let limit = |v: u64, unit: &str| {
        if v == 0 {
            "unlimited".to_string()
        } else {
            format!("{v}{unit}")
        }
    };
    println!(
        "volume {}: iops {}, bandwidth {}; {} I/Os delayed here",
        r.volume,
        limit(r.iops, ""),
        if r.bytes_per_sec == 0 {
            "unlimited".to_string()
        } else {
            format!("{}/s", human(r.bytes_per_sec))
        },
        r.delayed_ios
    );
    Ok(())
}

fn ns(v: Option<u64>) -> String {
    match v {
        None => "-".into(),
        Some(n) if n < 10_000 => format!("{n} ns"),
        Some(n) if n < 10_000_000 => format!("{} us", n / 1000),
        Some(n) => format!("{} ms", n / 1_000_000),
    }
}

pub fn status(ctx: &Context) -> anyhow::Result<()> {
    let s: StatusReport = Connection::call(&ctx.socket(), &Request::Status)?;
    if ctx.json {
        return print_json(&s);
    }
    println!(
        "archip up: pid {}, node {}, segment {}, data {}",
        s.pid, s.node, s.segment, s.data_dir
    );
    println!(
        "segment: {} requests and {} buffers in use",
        s.requests_in_use, s.buffers_in_use
    );
    println!();
    println!("{:<8}  {:>4}  {:<5}  PING", "PEER", "PORT", "STATE");
    for p in &s.peers {
        let ping = match (&p.latency_us, &p.error) {
            (Some(us), _) => format!("{us:.0} us"),
            (None, Some(e)) => e.clone(),
            (None, None) => "-".into(),
        };
        println!(
            "{:<8}  {:>4}  {:<5}  {ping}",
            p.name,
            p.port,
            if p.up { "up" } else { "down" }
        );
    }
    println!();
    println!(
        "{:>4}  {:<16}  {:>7}  {:>9}  {:>6}  {:>10}  {:>8}  {:>8}",
        "PORT", "NAME", "PID", "REQUESTS", "ERRORS", "BYTES", "P50", "P99"
    );
    for p in &s.ports {
        println!(
            "{:>4}  {:<16}  {:>7}  {:>9}  {:>6}  {:>10}  {:>8}  {:>8}",
            p.port,
            p.name,
            p.owner_pid.map_or("-".into(), |x| x.to_string()),
            p.requests,
            p.errors,
            human(p.bytes),
            ns(p.p50_ns),
            ns(p.p99_ns)
        );
    }
    Ok(())
}
