//! `node::nbd::bench` as a test, ignored by default (it takes a while and measures, rather
//! than checks): `cargo test --release -p node --test nbd_bench -- --ignored --nocapture`.
//! `ARCHIP_NBD_BENCH_COUNT` and `ARCHIP_NBD_BENCH_ROUNDS` override requests per run and
//! rounds.

use node::nbd::{BenchOptions, bench};

#[test]
#[ignore = "benchmark: run explicitly"]
fn nbd_clone_vs_qemu_nbd_qcow2_overlay() {
    let mut o = BenchOptions::default();
    if let Ok(n) = std::env::var("ARCHIP_NBD_BENCH_COUNT") {
        o.count = n.parse().expect("ARCHIP_NBD_BENCH_COUNT must be a number");
    }
    if let Ok(n) = std::env::var("ARCHIP_NBD_BENCH_ROUNDS") {
        o.rounds = n.parse().expect("ARCHIP_NBD_BENCH_ROUNDS must be a number");
    }
    let report = bench(o).expect("bench");
    println!("{report}");
    let v: serde_json::Value = serde_json::from_str(&report).expect("JSON");
    assert!(v["ratio_geomean"].as_f64().unwrap() > 0.0);
}
