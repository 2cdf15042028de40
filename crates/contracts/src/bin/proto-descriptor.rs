//! Writes the compiled `proto/` (an encoded FileDescriptorSet) to the given file, for the
//! Python SDK: `cargo run -p syntropism-contracts --bin proto-descriptor -- FILE`.

fn main() -> std::io::Result<()> {
    let path = std::env::args_os().nth(1).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "usage: proto-descriptor FILE",
        )
    })?;
    std::fs::write(path, syntropism_contracts::FILE_DESCRIPTOR_SET)
}
