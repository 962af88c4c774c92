//! Embeds the kernel object built by `cargo xtask build-ebpf` (an xtask-driven include
//! rather than aya-build: building the agent never needs the nightly toolchain).
//!
//! Without the object (a fresh clone, `cargo check`, clippy, an editor's rust-analyzer)
//! an empty stub is embedded instead, with a warning, so the agent's Rust code can be
//! checked without the nightly toolchain and bpf-linker. An agent built that way refuses
//! to load (`capture::Capture::load`); `cargo xtask build` always builds the real object
//! first.
use std::{
    fs,
    path::{Path, PathBuf},
};

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("..");
    let object = std::env::var("OPENBOX_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target/bpf/openbox-ebpf.o"));
    println!("cargo:rerun-if-env-changed=OPENBOX_EBPF_OBJECT");
    // Also while the object is missing: cargo then reruns this script on every build, so
    // the real object is picked up as soon as it exists.
    println!("cargo:rerun-if-changed={}", object.display());
    let embedded = if object.exists() {
        object.canonicalize().unwrap()
    } else {
        println!(
            "cargo:warning=the kernel object {} is missing: this agent is built WITHOUT its kernel programs and will refuse to trace. Run `cargo xtask build` (or `cargo xtask build-ebpf`, which installs the nightly's rust-src and bpf-linker when needed) for a working agent.",
            object.display()
        );
        stub(Path::new(&std::env::var("OUT_DIR").unwrap()))
    };
    println!("cargo:rustc-env=OPENBOX_EBPF_OBJECT={}", embedded.display());
}

/// An empty file: `Capture::load` recognises it by its length and says how to build the
/// real object.
fn stub(out_dir: &Path) -> PathBuf {
    let path = out_dir.join("openbox-ebpf-stub.o");
    fs::write(&path, b"").unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}
