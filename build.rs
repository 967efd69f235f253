//! Generates the protobuf and gRPC code for `proto/contact.proto` (the
//! agents' service) and `proto/admin.proto` (the operators') into `OUT_DIR`, with a vendored `protoc` so that no system protoc is needed.

use std::env;
use std::fs;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=proto/contact.proto");
    println!("cargo:rerun-if-changed=proto/admin.proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));

    // protoc-grpcio runs whatever `protoc` is first on PATH: put ours first.
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc for this platform");
    let protoc_dir = protoc.parent().expect("protoc has a parent directory");
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![protoc_dir.to_path_buf()];
    dirs.extend(env::split_paths(&path));
    env::set_var(
        "PATH",
        env::join_paths(dirs).expect("PATH entries are joinable"),
    );

    protoc_grpcio::compile_grpc_protos(
        &["contact.proto", "admin.proto"],
        &["proto"],
        &out_dir,
        None,
    )
    .expect("generating Rust code from proto/contact.proto and proto/admin.proto");

    // The generated files open with inner attributes, so they cannot be
    // `include!`d directly; declare them as modules of a generated mod.rs.
    let modules: String = ["contact", "contact_grpc", "admin", "admin_grpc"]
        .iter()
        .map(|m| {
            format!(
                "#[path = {:?}]\npub mod {m};\n",
                out_dir.join(format!("{m}.rs"))
            )
        })
        .collect();
    fs::write(out_dir.join("mod.rs"), modules).expect("writing generated mod.rs");
}
