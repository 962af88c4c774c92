//! Syscall micro-benchmark driven by `cargo xtask bench`.
//!
//! `syscall_loop [--iterations N] [--batches B] [--settle-ms MS] [--hold-ms MS] [--out FILE] [LOOP...]`
//!
//! Loops (all three when none is named):
//! - `sock1`: write 1 byte to one end of an AF_UNIX SOCK_STREAM socketpair, then read it
//!   back from the other end (one iteration = write + read, 2 syscalls);
//! - `sock4k`: the same with 4096 bytes (2 syscalls per iteration);
//! - `file`: open, read (100 bytes) and close a small regular file in /tmp (3 syscalls).
//!
//! Each loop runs a short warm-up, then `iterations` iterations split into `batches`
//! timed batches (CLOCK_MONOTONIC through `Instant`), and prints one JSON line:
//! `{"loop":"sock1","iterations":N,"total_iterations":<N + warm-up>,"batches":B,
//! "syscalls_per_iter":2,"ns_per_iter":<median of the batches>,"min_ns":..,"max_ns":..}`. The results go to FILE when given (so they stay
//! apart from the output of a tracer whose stdout this process shares), else stdout;
//! they are written only after every loop is done. `--settle-ms` sleeps before the
//! first loop, so a tracer that started this process has processed its exec first
//! (descriptors created within ~2 ms of exec may otherwise be mis-tracked). FILE appears
//! whole (written beside it, then renamed); `--hold-ms` sleeps after that, before exiting,
//! so a bench can read its tracer's program counters while the loops' process is alive.

use std::{ffi::CString, io::Write, time::Instant};

fn die(msg: &str) -> ! {
    eprintln!("syscall_loop: {msg}");
    std::process::exit(2);
}

fn check(r: isize, what: &str) -> isize {
    if r < 0 {
        die(&format!("{what}: {}", std::io::Error::last_os_error()));
    }
    r
}

struct Pair {
    a: i32,
    b: i32,
}

impl Pair {
    fn new() -> Pair {
        let mut sv = [0i32; 2];
        // SAFETY: socketpair with a valid two-element out array.
        let r = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr()) };
        check(r as isize, "socketpair");
        Pair { a: sv[0], b: sv[1] }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // SAFETY: closing descriptors this struct owns.
        unsafe {
            libc::close(self.a);
            libc::close(self.b);
        }
    }
}

/// One iteration: write `out` to a, read it all back from b.
#[inline(always)]
fn sock_iter(p: &Pair, out: &[u8], inb: &mut [u8]) {
    // SAFETY: plain write/read on our own descriptors and buffers.
    let w = unsafe { libc::write(p.a, out.as_ptr() as *const libc::c_void, out.len()) };
    if w as usize != out.len() {
        check(w, "write");
        die("short write");
    }
    let mut got = 0;
    while got < out.len() {
        let r = unsafe {
            libc::read(
                p.b,
                inb[got..].as_mut_ptr() as *mut libc::c_void,
                out.len() - got,
            )
        };
        if r <= 0 {
            check(r, "read");
            die("socket closed");
        }
        got += r as usize;
    }
}

#[inline(always)]
fn file_iter(path: &CString, buf: &mut [u8], expect: usize) {
    // SAFETY: openat/read/close on a NUL-terminated path and our own buffer.
    unsafe {
        let fd = libc::openat(
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
        check(fd as isize, "open");
        let r = libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len());
        if r as usize != expect {
            check(r, "read");
            die("short file read");
        }
        libc::close(fd);
    }
}

/// Runs `f` a few times untimed, then `iterations` times in `batches` timed batches;
/// returns the per-iteration nanoseconds of each batch and the total calls of `f`.
fn measure(iterations: u64, batches: u64, mut f: impl FnMut()) -> (Vec<f64>, u64) {
    let warmup = (iterations / 20).clamp(100, 10_000);
    for _ in 0..warmup {
        f();
    }
    let per = (iterations / batches).max(1);
    let mut out = Vec::with_capacity(batches as usize);
    for _ in 0..batches {
        let t = Instant::now();
        for _ in 0..per {
            f();
        }
        out.push(t.elapsed().as_nanos() as f64 / per as f64);
    }
    (out, warmup + per * batches)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let mut iterations: u64 = 200_000;
    let mut batches: u64 = 15;
    let mut settle_ms: u64 = 0;
    let mut hold_ms: u64 = 0;
    let mut out_path: Option<String> = None;
    let mut loops: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--iterations" => {
                iterations = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| die("--iterations needs a number"))
            }
            "--batches" => {
                batches = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&b| b > 0)
                    .unwrap_or_else(|| die("--batches needs a positive number"))
            }
            "--settle-ms" => {
                settle_ms = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| die("--settle-ms needs a number"))
            }
            "--hold-ms" => {
                hold_ms = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| die("--hold-ms needs a number"))
            }
            "--out" => out_path = Some(args.next().unwrap_or_else(|| die("--out needs a path"))),
            "sock1" | "sock4k" | "file" => loops.push(a),
            "-h" | "--help" => {
                println!("usage: syscall_loop [--iterations N] [--batches B] [--settle-ms MS] [--hold-ms MS] [--out FILE] [sock1|sock4k|file]...");
                return;
            }
            other => die(&format!("unknown argument {other:?}")),
        }
    }
    if loops.is_empty() {
        loops = vec!["sock1".into(), "sock4k".into(), "file".into()];
    }

    std::thread::sleep(std::time::Duration::from_millis(settle_ms));
    let mut lines = Vec::new();
    for kind in &loops {
        let (syscalls, (mut ns, calls)) = match kind.as_str() {
            "sock1" | "sock4k" => {
                let size = if kind == "sock1" { 1 } else { 4096 };
                let p = Pair::new();
                let out = vec![b'x'; size];
                let mut inb = vec![0u8; size];
                (
                    2,
                    measure(iterations, batches, || sock_iter(&p, &out, &mut inb)),
                )
            }
            _ => {
                let path = format!("/tmp/openbox-bench-{}.dat", std::process::id());
                let body = [b'y'; 100];
                std::fs::write(&path, body).unwrap_or_else(|e| die(&format!("{path}: {e}")));
                let c = CString::new(path.clone()).unwrap();
                let mut buf = vec![0u8; 4096];
                let ns = measure(iterations, batches, || file_iter(&c, &mut buf, body.len()));
                let _ = std::fs::remove_file(&path);
                (3, ns)
            }
        };
        let min = ns.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = ns.iter().cloned().fold(0.0, f64::max);
        let med = median(&mut ns);
        lines.push(format!(
            "{{\"loop\":\"{kind}\",\"iterations\":{iterations},\"total_iterations\":{calls},\"batches\":{batches},\"syscalls_per_iter\":{syscalls},\"ns_per_iter\":{med:.1},\"min_ns\":{min:.1},\"max_ns\":{max:.1}}}"
        ));
    }
    let text = lines.join("\n") + "\n";
    match out_path {
        Some(p) => {
            let part = format!("{p}.part");
            std::fs::write(&part, text).unwrap_or_else(|e| die(&format!("{part}: {e}")));
            std::fs::rename(&part, &p).unwrap_or_else(|e| die(&format!("{p}: {e}")));
        }
        None => {
            let _ = std::io::stdout().write_all(text.as_bytes());
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(hold_ms));
}
