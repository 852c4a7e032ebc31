//! Generates the Rust types of berth's two wire formats: its own description of the CRI
//! (proto/cri.proto, runtime.v1 services and clients) and the monitor's protocol
//! (proto/monitor.proto).

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto/monitor.proto");
    println!("cargo:rerun-if-changed=proto/cri.proto");
    prost_build::Config::new().compile_protos(&["proto/monitor.proto"], &["proto/"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/cri.proto"], &["proto/"])
}
