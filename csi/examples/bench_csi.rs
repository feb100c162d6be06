//! Runs the CSI benchmark until `archip bench csi` is wired:
//! `cargo run --release -p csi --example bench_csi -- [DIR]`.

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| ".".into());
    let report = csi::bench::run(&csi::bench::BenchOptions::new(dir)).await?;
    println!("{report}");
    Ok(())
}
