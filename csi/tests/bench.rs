//! The benchmark as a library call: a small run must produce a complete
//! report whose figures are consistent.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_small_run_reports_every_figure() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = csi::bench::BenchOptions::new(dir.path());
    opts.sizes = vec![64 << 20, 1 << 40];
    opts.written_blocks = 8;
    opts.iterations = 5;
    opts.concurrent = 10;
    let report = csi::bench::run(&opts).await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(v["bench"], "csi");
    let sources = v["sources"].as_array().unwrap();
    assert_eq!(sources.len(), 2);
    assert_eq!(sources[1]["source_bytes"], 1u64 << 40);
    for s in sources {
        assert_eq!(s["blocks_written"], 8);
        let grpc = &s["create_volume_from_snapshot_grpc"];
        let direct = &s["clone_direct_baseline"];
        assert_eq!(grpc["n"], 5);
        assert_eq!(direct["n"], 5);
        assert!(grpc["p50_ms"].as_f64().unwrap() > 0.0);
        assert!(grpc["p99_ms"].as_f64().unwrap() >= grpc["p50_ms"].as_f64().unwrap());
        assert!(s["grpc_over_direct_p50"].as_f64().unwrap() > 0.0);
        assert_eq!(s["burst"]["calls"], 10);
        assert_eq!(s["burst"]["per_call"]["n"], 10);
        assert!(s["burst"]["total_ms"].as_f64().unwrap() > 0.0);
    }
    // The scratch directory is gone.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
