//! Races between the traced process and the agent, which reads the kernel's records a
//! little after they happen.

mod common;

use common::*;

/// The dynamic loader opens and closes libraries (noise paths) as the first thing after
/// exec; the next descriptor it hands out, with the same number, is a socket. An update
/// of the kernel's descriptor table made by the agent for the library (stop reporting
/// it) must never land on the socket: every write must be captured.
#[test]
fn socket_reusing_the_number_of_a_just_closed_library_is_captured_in_full() {
    let env = TestEnv::get();
    let loop_bin = workspace_root().join("target/release/examples/syscall_loop");
    assert!(
        loop_bin.exists(),
        "{} is built by cargo test (an example of openbox-agent)",
        loop_bin.display()
    );
    let out = TempDir::new("race");
    let iterations: u64 = 20_000;
    let trace = trace(
        &env,
        "socket_reusing_the_number_of_a_just_closed_library_is_captured_in_full",
        &[
            loop_bin.display().to_string(),
            "--iterations".into(),
            iterations.to_string(),
            "--batches".into(),
            "1".into(),
            "--out".into(),
            out.join("loop.json").display().to_string(),
            "sock1".into(),
        ],
    );
    // The loop reports how many write+read pairs it made, warm-up included.
    let report = String::from_utf8_lossy(&read(&out.join("loop.json"))).to_string();
    let line = report.lines().next().unwrap_or_default();
    let made = u64_of(
        &serde_json::from_str(line).expect("the loop's report is JSON"),
        "total_iterations",
    );
    assert!(made > iterations);
    let egress: Vec<&serde_json::Value> = trace
        .of_type("data")
        .filter(|r| str_of(r, "direction") == "egress")
        .collect();
    let bytes: u64 = egress.iter().map(|r| u64_of(r, "len")).sum();
    assert_eq!(
        bytes,
        made,
        "every 1-byte write over the socketpair is captured ({}): {}",
        trace.saved.display(),
        trace.census()
    );
    assert_eq!(trace.summary_u64("ringbuf_drops"), 0);
}
