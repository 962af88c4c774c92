//! Harness for the end-to-end tests: a real Temporal dev server, a real Python worker
//! with the OpenBox hook (support/worker.py), the agent daemon (`openbox-agent run`),
//! and the integration tests' fixture servers (an HTTPS server, a throwaway
//! PostgreSQL), all on 127.0.0.1.
//!
//! - Every process is started in its own process group, with `PR_SET_PDEATHSIG`
//!   (SIGKILL) set by a thread that lives as long as the test binary, so nothing
//!   outlives the tests even when the binary is killed; a test's processes are stopped
//!   (SIGTERM to the group, then SIGKILL) when their handle drops, also on panic.
//! - The Temporal dev server, the HTTPS server and PostgreSQL are shared by the tests of
//!   one binary ([`shared`]; they hold no state a test depends on) and stopped at exit.
//!   Each test has its own task queue, workflow ids and markers, its own agent and its
//!   own worker, so tests do not depend on their order.
//! - Every process's output goes to `target/e2e-runs/<test>/`, named in failure
//!   messages.
//!
//! The marker scheme: each activity gets a unique marker (`mk<hex>-NNN`) that it puts in
//! its HTTPS URL, its SQL text and its file name, so a captured span names the activity
//! that must own it; [`check_attribution`] compares that with what the agent reported.
//!
//! One module per part, each readable alone: `env` (what `cargo xtask test` provides,
//! the logs directories), `servers` (shared by a binary's tests), `agent` (the daemon),
//! `worker` (the hooked worker and the client), `scenario` (a test's world),
//! `attribution` (the check), `governance` (the fake Core, the governing agent and
//! its world), `conventions` (SDK 1.0 and 2.0 cases) and `jaeger` (the OTLP backend of the export tests). Process guards,
//! temporary directories and free ports come from `openbox-testkit`, which the agent's
//! integration tests use too.

mod agent;
mod attribution;
mod containers;
mod conventions;
mod env;
mod governance;
mod jaeger;
mod scenario;
mod servers;
mod worker;

use std::time::Duration;

pub use openbox_testkit::{free_port, tail, workspace_root, Proc, TempDir};

pub use crate::{
    agent::*, attribution::*, containers::*, conventions::*, env::*, governance::*, jaeger::*,
    scenario::*, servers::*, worker::*,
};

const START_TIMEOUT: Duration = Duration::from_secs(90);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);
