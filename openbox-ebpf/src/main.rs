//! Kernel programs of openbox-agent: syscall tracepoints for sockets and files, libssl
//! uprobes for TLS plaintext, and process lifecycle tracepoints.
//!
//! Every program first asks `WATCHED` whether the current process is watched; an
//! unwatched process costs one hash lookup and one per-CPU counter increment, and
//! nothing is copied. The kernel has no kprobes, so everything is built on tracepoints
//! and uprobes.
//!
//! Layout: `maps` (every map and load-time setting), `task` (is this process watched,
//! which activity it works for, the record header), `emit` (ring-buffer output and the
//! payload copy), `error` (`Loss`: every failure names the counter it increments), and
//! one file per probe family under `probes/`.
#![no_std]
#![no_main]

mod emit;
mod error;
mod maps;
mod probes;
mod task;

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
