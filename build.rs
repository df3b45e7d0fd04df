//! Generates the replication protocol's Rust code from `proto/` at build time.
//!
//! `protox` parses the schema in Rust, so no system `protoc` is needed, and
//! `tonic-prost-build` turns the parsed descriptors into prost messages and the
//! tonic client and server. The output lands in `OUT_DIR`, where
//! `src/replication/wire.rs` includes it.

const PROTO_ROOT: &str = "proto";
const REPLICATION_PROTO: &str = "proto/ltxfs/replication/v1/replication.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let descriptors = protox::compile([REPLICATION_PROTO], [PROTO_ROOT])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
