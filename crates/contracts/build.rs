//! Compiles `proto/` with protox (pure Rust), so no system `protoc` is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files: Vec<PathBuf> = std::fs::read_dir(root.join("syntropism/v1"))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    println!(
        "cargo:rerun-if-changed={}",
        root.join("syntropism/v1").display()
    );
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let mut files = files;
    files.sort();
    let descriptors = protox::compile(&files, [&root])?;
    // The same descriptors, for SDKs in other languages (see `FILE_DESCRIPTOR_SET`).
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("file_descriptor_set.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    prost_build::Config::new()
        .enable_type_names()
        .compile_fds(descriptors)?;
    Ok(())
}
