//! Generates the Rust types of berth's own wire format (proto/monitor.proto).

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto/monitor.proto");
    prost_build::Config::new().compile_protos(&["proto/monitor.proto"], &["proto/"])
}
