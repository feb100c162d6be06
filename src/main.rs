//! `archip`: command-line parsing and dispatch only; the work lives in the crates.

fn main() {
    println!("archip {}", env!("CARGO_PKG_VERSION"));
}
