//! Compiles `proto/csi.proto` into Rust without `protoc`: protox (pure Rust)
//! parses the file into a descriptor set, tonic-prost-build turns that into
//! prost messages plus tonic clients and servers.
//!
//! It also keeps CSI secrets out of logs. Every field the spec marks
//! `csi_secret` is a map named `secrets`; the messages holding one get no
//! derived `Debug` and instead a generated one that prints only the secret
//! keys' count, so `{:?}` on a request (as tracing does) can never leak a
//! Ceph key.

use std::fmt::Write as _;
use std::path::PathBuf;

use prost_types::{DescriptorProto, FileDescriptorSet, field_descriptor_proto::Label};

const PROTO: &str = "proto/csi.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO}");
    println!("cargo:rerun-if-changed=build.rs");

    let fds = protox::compile([PROTO], ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let secret_holders = secret_holders(&fds);
    // Fail loudly if the proto was edited so that no message carries secrets
    // any more: the redaction below would silently become a no-op.
    assert!(
        secret_holders.len() >= 17,
        "expected the CSI messages with secrets, found {}",
        secret_holders.len()
    );
    std::fs::write(
        out_dir.join("csi.v1.redact.rs"),
        redacted_debug_impls(&secret_holders),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .skip_debug(secret_holders.iter().map(|m| format!(".csi.v1.{}", m.name)))
        .compile_fds(fds)?;
    Ok(())
}

/// A top-level message with a `secrets` map, and its other field names.
struct Holder {
    name: String,
    fields: Vec<String>,
}

fn secret_holders(fds: &FileDescriptorSet) -> Vec<Holder> {
    let csi = fds
        .file
        .iter()
        .find(|f| f.package() == "csi.v1")
        .expect("csi.v1 package in the descriptor set");
    csi.message_type
        .iter()
        .filter(|m| has_secrets(m))
        .map(|m| Holder {
            name: m.name().to_owned(),
            fields: m.field.iter().map(|f| f.name().to_owned()).collect(),
        })
        .collect()
}

fn has_secrets(m: &DescriptorProto) -> bool {
    m.field
        .iter()
        .any(|f| f.name() == "secrets" && f.label() == Label::Repeated)
}

fn redacted_debug_impls(holders: &[Holder]) -> String {
    let mut out = String::new();
    for h in holders {
        let _ = writeln!(out, "impl ::core::fmt::Debug for {} {{", h.name);
        let _ = writeln!(
            out,
            "    fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {{"
        );
        let _ = writeln!(out, "        f.debug_struct({:?})", h.name);
        for field in &h.fields {
            if field == "secrets" {
                let _ = writeln!(
                    out,
                    "            .field(\"secrets\", &crate::redact::Redacted(self.secrets.len()))"
                );
            } else {
                let _ = writeln!(out, "            .field({field:?}, &self.{field})");
            }
        }
        let _ = writeln!(out, "            .finish()\n    }}\n}}");
    }
    out
}
