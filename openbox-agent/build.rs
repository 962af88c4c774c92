//! Embeds the kernel object built by `cargo xtask build-ebpf` (an xtask-driven include
//! rather than aya-build: building the agent never needs the nightly toolchain).
use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("..");
    let object = std::env::var("OPENBOX_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target/bpf/openbox-ebpf.o"));
    println!("cargo:rerun-if-env-changed=OPENBOX_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.exists() {
        panic!(
            "the kernel object {} is missing: run `cargo xtask build-ebpf` first (it installs the nightly's rust-src and bpf-linker when needed)",
            object.display()
        );
    }
    println!(
        "cargo:rustc-env=OPENBOX_EBPF_OBJECT={}",
        object.canonicalize().unwrap().display()
    );
}
