//! openbox-agent: sees what Temporal activities do — HTTP(S), database queries, file
//! I/O — from the kernel, without instrumenting the worker.

use openbox_agent::{capture, check, conn, daemon, preflight, redact, span, trace};

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use openbox_common::{DEFAULT_CAPTURE_LIMIT, MAX_CAPTURE_LIMIT};

#[derive(Parser)]
#[command(name = "openbox-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How the kernel programs capture and how spans are built (shared by `trace` and `run`).
#[derive(Args, Clone)]
struct CaptureArgs {
    /// Most body bytes kept per HTTP message in spans.
    #[arg(long, default_value_t = 65536)]
    max_body: usize,
    /// Most characters of a database statement kept in spans.
    #[arg(long, default_value_t = 4096)]
    max_statement: usize,
    /// Redact nothing: headers, URLs, bodies and statements are shown as captured.
    #[arg(long)]
    no_redact: bool,
    /// Redact this HTTP header too (exact name, case-insensitive); repeatable.
    #[arg(long = "redact-header", value_name = "NAME")]
    redact_headers: Vec<String>,
    /// Also redact header, query parameter and body field names containing this
    /// (case-insensitive); repeatable.
    #[arg(long = "redact-pattern", value_name = "SUBSTR")]
    redact_patterns: Vec<String>,
    /// Drop this pattern from the default list (auth, token, secret, key, password,
    /// session, cookie, signature, credential); repeatable.
    #[arg(long = "no-redact-pattern", value_name = "SUBSTR")]
    no_redact_patterns: Vec<String>,
    /// One file.read/file.write span per call, instead of one per burst of calls.
    #[arg(long)]
    every_file_call: bool,
    /// Payload bytes captured per call (at most 262144).
    #[arg(long, default_value_t = DEFAULT_CAPTURE_LIMIT, value_parser = clap::value_parser!(u32).range(0..=MAX_CAPTURE_LIMIT as i64))]
    capture_limit: u32,
    /// Also probe this libssl (or binary exporting SSL_write/SSL_read); repeatable.
    #[arg(long = "tls-lib", value_name = "PATH")]
    tls_libs: Vec<PathBuf>,
    /// Also skip files whose path starts with this prefix; repeatable.
    #[arg(long = "skip-path", value_name = "PREFIX")]
    skip_paths: Vec<String>,
    /// Report every file, including the default noise paths (/dev/, /proc/, .so …).
    #[arg(long)]
    no_default_skips: bool,
    /// Do not stop a process that loads a TLS library until its probes are attached
    /// (its first TLS calls may then be missed).
    #[arg(long)]
    no_tls_pause: bool,
    /// Ring-buffer size in MiB (a power of two).
    #[arg(long, default_value_t = 16)]
    ring_mib: u32,
}

impl CaptureArgs {
    fn skip(&self) -> conn::SkipPaths {
        let mut skip = if self.no_default_skips {
            conn::SkipPaths::none()
        } else {
            conn::SkipPaths::default()
        };
        skip.prefixes.extend(self.skip_paths.iter().cloned());
        skip
    }

    fn spans(&self) -> span::SpanConfig {
        let mut spans = span::SpanConfig::default();
        spans.parser.max_body = self.max_body;
        spans.parser.max_statement = self.max_statement;
        spans.every_file_call = self.every_file_call;
        spans.redact = self.redactor();
        spans
    }

    fn redactor(&self) -> redact::Redactor {
        if self.no_redact {
            return redact::Redactor::off();
        }
        let mut r = redact::Redactor::default();
        for p in &self.no_redact_patterns {
            r.remove_pattern(p);
        }
        for p in &self.redact_patterns {
            r.add_pattern(p);
        }
        for h in &self.redact_headers {
            r.add_header(h);
        }
        r
    }

    fn capture(&self) -> Result<capture::CaptureConfig> {
        if !self.ring_mib.is_power_of_two() {
            anyhow::bail!("--ring-mib must be a power of two (got {})", self.ring_mib);
        }
        Ok(capture::CaptureConfig {
            capture_limit: self.capture_limit,
            pause_on_tls_lib: !self.no_tls_pause,
            ring_bytes: self.ring_mib << 20,
        })
    }
}

/// Governance settings (flags > OPENBOX_* environment > `--config` file > defaults).
#[derive(Args, Clone)]
struct GovArgs {
    /// A TOML file with a `[governance]` table (see the README).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// OpenBox Core base URL; without one, the embedded default governs (local policy
    /// file and the events sink). Env: OPENBOX_URL.
    #[arg(long, value_name = "URL")]
    openbox_url: Option<String>,
    /// Core API key (obx_live_… / obx_test_…). Env: OPENBOX_API_KEY.
    #[arg(long, value_name = "KEY")]
    openbox_api_key: Option<String>,
    /// fail_open (default) or fail_closed: what happens when Core cannot answer.
    /// Env: OPENBOX_GOVERNANCE_POLICY.
    #[arg(long, value_name = "POLICY")]
    governance_policy: Option<String>,
    /// Seconds per Core call (default 30). Env: OPENBOX_GOVERNANCE_TIMEOUT.
    #[arg(long, value_name = "SECONDS")]
    governance_timeout: Option<String>,
    #[arg(long, value_name = "BOOL")]
    send_start_event: Option<bool>,
    #[arg(long, value_name = "BOOL")]
    send_activity_start_event: Option<bool>,
    /// Repeatable; given, the list replaces the default.
    #[arg(long = "skip-workflow-type", value_name = "TYPE")]
    skip_workflow_types: Option<Vec<String>>,
    #[arg(long = "skip-signal", value_name = "NAME")]
    skip_signals: Option<Vec<String>>,
    /// Repeatable; given, the list replaces the default (send_governance_event).
    #[arg(long = "skip-activity-type", value_name = "TYPE")]
    skip_activity_types: Option<Vec<String>>,
    #[arg(long, value_name = "BOOL")]
    hitl_enabled: Option<bool>,
    #[arg(long = "skip-hitl-activity-type", value_name = "TYPE")]
    skip_hitl_activity_types: Option<Vec<String>>,
    /// The embedded default's local policy (TOML rules → verdicts).
    #[arg(long, value_name = "FILE")]
    policy_file: Option<PathBuf>,
    /// An extra CA bundle (PEM) trusted for Core.
    #[arg(long, value_name = "PEM")]
    ca_file: Option<PathBuf>,
    /// Where events wait while Core is unreachable (durable, bounded).
    #[arg(long, value_name = "DIR")]
    spool_dir: Option<PathBuf>,
    /// Spool limit in bytes (K/M/G suffixes), default 256MiB.
    #[arg(long, value_name = "BYTES")]
    spool_max_bytes: Option<String>,
    /// Spool limit in events, default 100000.
    #[arg(long, value_name = "N")]
    spool_max_events: Option<String>,
    /// A Core URL prefix a worker may ask for in its own settings (create_openbox_worker's
    /// openbox_url) when the agent has no Core URL of its own. Repeatable; default none:
    /// a worker never chooses where the agent sends its requests.
    #[arg(
        long,
        value_name = "PREFIX",
        env = "OPENBOX_ALLOW_WORKER_CORE_URL",
        value_delimiter = ','
    )]
    allow_worker_core_url: Vec<String>,
}

impl GovArgs {
    fn load(&self, events: Option<String>) -> Result<openbox_agent::governance::GovernanceConfig> {
        let raw = openbox_agent::governance::RawSettings {
            openbox_url: self.openbox_url.clone(),
            openbox_api_key: self.openbox_api_key.clone(),
            governance_policy: self.governance_policy.clone(),
            governance_timeout: self.governance_timeout.clone(),
            send_start_event: self.send_start_event,
            send_activity_start_event: self.send_activity_start_event,
            skip_workflow_types: self.skip_workflow_types.clone(),
            skip_signals: self.skip_signals.clone(),
            skip_activity_types: self.skip_activity_types.clone(),
            hitl_enabled: self.hitl_enabled,
            skip_hitl_activity_types: self.skip_hitl_activity_types.clone(),
            policy_file: self.policy_file.clone(),
            events_sink: events,
            ca_file: self.ca_file.clone(),
            spool_dir: self.spool_dir.clone(),
            spool_max_bytes: self.spool_max_bytes.clone(),
            spool_max_events: self.spool_max_events.clone(),
        };
        let mut cfg =
            openbox_agent::governance::GovernanceConfig::load(&raw, self.config.as_deref())?;
        cfg.allow_worker_core_urls = self.allow_worker_core_url.clone();
        Ok(cfg)
    }
}

#[derive(Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once from the command line, never copied"
)]
enum Command {
    /// Watch a process and its children and print what they do: connections, cleartext
    /// and TLS-plaintext bytes, files.
    Trace {
        /// One JSON object per line instead of readable text: spans in the SDK's span
        /// JSON (the summary then goes to stderr), or with --raw the capture records.
        #[arg(long)]
        json: bool,
        /// Print the capture records (connections, bytes per direction, files) instead
        /// of spans.
        #[arg(long)]
        raw: bool,
        /// Watch a running process (and its current and future children).
        #[arg(long, conflicts_with = "command")]
        pid: Option<u32>,
        #[command(flatten)]
        capture: CaptureArgs,
        /// Payload bytes shown per record in readable output.
        #[arg(long, default_value_t = 160)]
        show_bytes: usize,
        /// The command to run and watch.
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// The daemon: serve the worker hooks' socket, watch registered workers and their
    /// children, attribute what they do to Temporal activities, and write one event per
    /// activity start and end (ActivityCompleted carries the activity's spans).
    Run {
        /// The hook socket (Unix stream socket).
        #[arg(long, env = "OPENBOX_AGENT_SOCKET", default_value = daemon::hook::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Group (name or gid) of the socket (mode 0660) and of its directory (0750):
        /// run workers with this group to let them connect [default: the agent's group].
        #[arg(long, env = "OPENBOX_SOCKET_GROUP", value_name = "NAME|GID")]
        socket_group: Option<String>,
        /// Most hook connections one uid may hold at once (root included); more are
        /// closed at once.
        #[arg(long, default_value_t = daemon::hook::DEFAULT_MAX_CONNECTIONS_PER_UID)]
        max_connections_per_uid: usize,
        /// Where governance events go, one JSON object per line: a file (appended), `-`
        /// for stdout, or `off` [default: `-` without a Core URL, off with one].
        #[arg(long, value_name = "FILE")]
        events: Option<String>,
        #[command(flatten)]
        governance: GovArgs,
        /// Also write spans that could not be attributed exactly, with the reason, as
        /// JSON lines to this file.
        #[arg(long, value_name = "FILE")]
        unattributed: Option<PathBuf>,
        /// Most spans kept per activity (more are counted and dropped).
        #[arg(long, default_value_t = 2000)]
        span_limit: usize,
        #[command(flatten)]
        capture: CaptureArgs,
    },
    /// Report what this kernel offers, the privileges held, and the mode the agent will use.
    Check {
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OPENBOX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let code = match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("openbox-agent: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn real_main() -> Result<i32> {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { json } => {
            let report = check::report();
            match check::print(&report, json) {
                // Rust ignores SIGPIPE, so a reader that left (`check --json | head`)
                // is an EPIPE here: the output ends, as it would have with SIGPIPE.
                // SIGPIPE is not restored instead: the daemon writing events to a pipe
                // must outlive its reader, not die silently with processes paused.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                r => r?,
            }
            Ok(if report.ready { 0 } else { 1 })
        }
        Command::Trace {
            json,
            raw,
            pid,
            capture,
            show_bytes,
            command,
        } => {
            preflight::raise_nofile_limit();
            let opts = trace::TraceOpts {
                json,
                raw,
                spans: capture.spans(),
                pid,
                command,
                capture: capture.capture()?,
                tls_libs: capture.tls_libs.clone(),
                skip: capture.skip(),
                show_bytes,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(trace::run(opts))
        }
        Command::Run {
            socket,
            socket_group,
            max_connections_per_uid,
            events,
            governance,
            unattributed,
            span_limit,
            capture,
        } => {
            preflight::raise_nofile_limit();
            let opts = daemon::RunOpts {
                socket,
                governance: governance.load(events)?,
                unattributed,
                spans: capture.spans(),
                capture: capture.capture()?,
                tls_libs: capture.tls_libs.clone(),
                skip: capture.skip(),
                span_limit,
                socket_group: socket_group
                    .as_deref()
                    .map(daemon::hook::parse_group)
                    .transpose()?,
                hook_limits: daemon::hook::Limits {
                    max_connections_per_uid,
                    ..Default::default()
                },
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(daemon::run(opts))
        }
    }
}
