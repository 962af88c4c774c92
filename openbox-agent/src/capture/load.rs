//! Loading the kernel programs, several at once.
//!
//! Loading is the verifier's work, most of `trace`'s start-up: measured on this
//! project's 2-core VM, 90–140 ms for each of the eight socket data-exit programs
//! (~740 instructions each) and ~1 s for all of them under load, where attaching takes
//! a few ms per program. The kernel verifies programs loaded from different threads
//! concurrently (privileged loads take no global lock), so every program needed is
//! loaded first from a few threads, then attached one by one.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Result};
use aya::{
    programs::{FEntry, FExit, Program, ProgramError},
    Btf, Ebpf,
};

/// How a program is loaded: most need nothing; fentry/fexit programs are typed
/// against their kernel function in the kernel's BTF.
#[derive(Clone, Copy)]
pub enum How<'a> {
    Plain,
    Fentry(&'a str, &'a Btf),
    Fexit(&'a str, &'a Btf),
}

/// One program's load.
pub struct Outcome<'j> {
    pub program: &'j str,
    pub took: Duration,
    /// Instructions the verifier walked (its cost), when the kernel says.
    pub verified: Option<u32>,
    pub result: Result<(), ProgramError>,
}

/// What loading one program cost, as `check` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Cost {
    pub program: String,
    /// Time in the load call: mostly the verifier's.
    pub ms: f64,
    /// Instructions the verifier walked, when the kernel says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified_insns: Option<u32>,
}

/// Loads each of `jobs` (program name, how) from up to as many threads as there are
/// CPUs, and says how each went, in `jobs`' order. Fails only when a program is not in
/// the object.
pub fn load_all<'j>(ebpf: &mut Ebpf, jobs: &[(&'j str, How<'_>)]) -> Result<Vec<Outcome<'j>>> {
    let started = Instant::now();
    let mut work: Vec<(usize, &mut Program)> = Vec::with_capacity(jobs.len());
    for (name, program) in ebpf.programs_mut() {
        if let Some(i) = jobs.iter().position(|(n, _)| *n == name) {
            work.push((i, program));
        }
    }
    if let Some((missing, _)) = jobs
        .iter()
        .enumerate()
        .find(|(i, _)| !work.iter().any(|(j, _)| j == i))
        .map(|(_, job)| job)
    {
        return Err(anyhow!("program {missing} missing from the kernel object"));
    }
    // Started in `jobs`' order, so the caller puts the longest to verify first.
    work.sort_by_key(|(i, _)| *i);
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8)
        .min(work.len());
    let queue = Mutex::new(work.into_iter());
    let results: Mutex<Vec<Done>> = Mutex::default();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let next = queue.lock().unwrap().next();
                let Some((i, program)) = next else {
                    break;
                };
                let t = Instant::now();
                let r = load_one(program, &jobs[i].1);
                let took = t.elapsed();
                let verified = program
                    .info()
                    .ok()
                    .and_then(|info| info.verified_instruction_count());
                results.lock().unwrap().push((i, took, verified, r));
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|(i, _, _, _)| *i);
    let outcomes: Vec<Outcome<'j>> = results
        .into_iter()
        .map(|(i, took, verified, result)| Outcome {
            program: jobs[i].0,
            took,
            verified,
            result,
        })
        .collect();
    for o in &outcomes {
        tracing::debug!(
            program = o.program,
            ms = o.took.as_secs_f64() * 1e3,
            verified_insns = o.verified,
            ok = o.result.is_ok(),
            "loaded"
        );
    }
    tracing::debug!(
        programs = jobs.len(),
        threads,
        ms = started.elapsed().as_secs_f64() * 1e3,
        "kernel programs loaded"
    );
    Ok(outcomes)
}

/// [`load_all`], failing at the first program refused (in `jobs`' order), described
/// by `describe`.
pub fn load_or_fail(
    ebpf: &mut Ebpf,
    jobs: &[(&str, How<'_>)],
    describe: impl Fn(&str, ProgramError) -> anyhow::Error,
) -> Result<()> {
    for o in load_all(ebpf, jobs)? {
        o.result.map_err(|e| describe(o.program, e))?;
    }
    Ok(())
}

/// A job's index, its load time, the instructions verified and its result.
type Done = (usize, Duration, Option<u32>, Result<(), ProgramError>);

fn load_one(program: &mut Program, how: &How<'_>) -> Result<(), ProgramError> {
    match (program, how) {
        (Program::TracePoint(p), How::Plain) => p.load(),
        (Program::UProbe(p), How::Plain) => p.load(),
        (Program::KProbe(p), How::Plain) => p.load(),
        (program, How::Fentry(func, btf)) => <&mut FEntry>::try_from(program)?.load(func, btf),
        (program, How::Fexit(func, btf)) => <&mut FExit>::try_from(program)?.load(func, btf),
        // Not one of the types this agent has.
        (_, How::Plain) => Err(ProgramError::UnexpectedProgramType),
    }
}

/// The error a tracepoint or uprobe program's refusal is reported with.
pub fn rejected(program: &str, e: ProgramError) -> anyhow::Error {
    anyhow::Error::new(e).context(format!("the kernel rejected program {program}"))
}
