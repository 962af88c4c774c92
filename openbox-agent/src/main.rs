//! openbox-agent: sees what Temporal activities do — HTTP(S), database queries, file
//! I/O — from the kernel, without instrumenting the worker.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use openbox_agent::{
    capture, check,
    config::{pick, pick_flag, pick_list, CaptureFile, FileConfig},
    conn, daemon, export,
    logging::{self, LogFormat},
    pipeline, preflight, redact, span, trace,
};
use openbox_common::{DEFAULT_CAPTURE_LIMIT, MAX_CAPTURE_LIMIT};

/// `--queue-mib`'s upper bound: 4 GiB of backlog.
const MAX_QUEUE_MIB: u32 = 4096;

/// Span building makes and drops a few dozen small strings per span: with glibc's
/// allocator, malloc and free were a quarter of the agent's CPU under a sustained load
/// (README "Benchmark", load part). The binary only: the library's tests keep their own.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (include/mimalloc.h): the -sys
/// crate names no constant for it; it comes just before `mi_option_use_numa_nodes`, which
/// the crate names (15 in the bundled mimalloc 3, checked below).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t =
    libmimalloc_sys::mi_option_use_numa_nodes - 1;
const _: () = assert!(
    MI_OPTION_PURGE_DELAY == 15,
    "mimalloc's option numbering changed: find mi_option_purge_delay in its mimalloc.h again"
);

/// Freed pages go back to the kernel at once (mimalloc 3 waits a second by default):
/// start-up frees tens of MiB (BTF, the object file, verifier logs) that a steady agent
/// never needs again; with the default its peak RSS under load was 100-130 MiB instead
/// of 71-78 MiB, for no measurable CPU (README "Benchmark").
fn tune_allocator() {
    // SAFETY: sets a process-wide option; mimalloc reads it on its next purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

#[derive(Parser)]
#[command(name = "openbox-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How the kernel programs capture and how spans are built (shared by `trace` and `run`;
/// `run` also reads them from the `[capture]` table of its config file).
#[derive(Args, Clone)]
struct CaptureArgs {
    /// Most body bytes kept per HTTP message in spans [default: 65536].
    #[arg(long)]
    max_body: Option<usize>,
    /// Most characters of a database statement kept in spans [default: 4096].
    #[arg(long)]
    max_statement: Option<usize>,
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
    /// Payload bytes captured per call (at most 262144) [default: 16384].
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=MAX_CAPTURE_LIMIT as i64))]
    capture_limit: Option<u32>,
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
    /// Ring-buffer size in MiB (a power of two) [default: 16].
    #[arg(long)]
    ring_mib: Option<u32>,
    /// Most MiB of records copied out of the ring and not parsed yet: the backlog
    /// while the agent is short of CPU (beyond it the ring fills, and the kernel drops
    /// and counts) [default: 64].
    #[arg(long)]
    queue_mib: Option<u32>,
    /// How sockets and files are captured: `fentry` (fentry/fexit programs on the
    /// syscall functions: only the calls pay), `tracepoint` (syscall tracepoints: every
    /// syscall of every process on the node pays the slow path), or `auto` (fentry
    /// where the kernel has BTF and trampolines) [default: auto]. `openbox-agent check`
    /// says which `auto` picks. Env: OPENBOX_CAPTURE_MODE.
    #[arg(long, value_enum, env = "OPENBOX_CAPTURE_MODE")]
    capture_mode: Option<capture::mode::ModeChoice>,
}

/// [`CaptureArgs`] with the config file's `[capture]` table and the defaults applied.
struct Capture {
    max_body: usize,
    max_statement: usize,
    no_redact: bool,
    redact_headers: Vec<String>,
    redact_patterns: Vec<String>,
    no_redact_patterns: Vec<String>,
    every_file_call: bool,
    capture_limit: u32,
    tls_libs: Vec<PathBuf>,
    skip_paths: Vec<String>,
    no_default_skips: bool,
    no_tls_pause: bool,
    ring_mib: u32,
    queue_mib: u32,
    capture_mode: capture::mode::ModeChoice,
}

impl CaptureArgs {
    fn resolve(self, file: CaptureFile) -> Capture {
        Capture {
            max_body: pick(self.max_body, file.max_body, 65536),
            max_statement: pick(self.max_statement, file.max_statement, 4096),
            no_redact: pick_flag(self.no_redact, file.no_redact),
            redact_headers: pick_list(self.redact_headers, file.redact_headers),
            redact_patterns: pick_list(self.redact_patterns, file.redact_patterns),
            no_redact_patterns: pick_list(self.no_redact_patterns, file.no_redact_patterns),
            every_file_call: pick_flag(self.every_file_call, file.every_file_call),
            capture_limit: pick(
                self.capture_limit,
                file.capture_limit,
                DEFAULT_CAPTURE_LIMIT,
            ),
            tls_libs: pick_list(self.tls_libs, file.tls_libs),
            skip_paths: pick_list(self.skip_paths, file.skip_paths),
            no_default_skips: pick_flag(self.no_default_skips, file.no_default_skips),
            no_tls_pause: pick_flag(self.no_tls_pause, file.no_tls_pause),
            ring_mib: pick(self.ring_mib, file.ring_mib, 16),
            queue_mib: pick(
                self.queue_mib,
                file.queue_mib,
                (pipeline::drain::QUEUE_BYTES >> 20) as u32,
            ),
            capture_mode: pick(self.capture_mode, file.capture_mode, Default::default()),
        }
    }
}

impl Capture {
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
            anyhow::bail!(
                "ring_mib (--ring-mib) must be a power of two (got {})",
                self.ring_mib
            );
        }
        if !(1..=MAX_QUEUE_MIB).contains(&self.queue_mib) {
            anyhow::bail!(
                "queue_mib (--queue-mib) must be 1 to {MAX_QUEUE_MIB} (got {})",
                self.queue_mib
            );
        }
        if self.capture_limit > MAX_CAPTURE_LIMIT {
            anyhow::bail!(
                "capture_limit (--capture-limit) must be at most {MAX_CAPTURE_LIMIT} (got {})",
                self.capture_limit
            );
        }
        Ok(capture::CaptureConfig {
            capture_limit: self.capture_limit,
            pause_on_tls_lib: !self.no_tls_pause,
            ring_bytes: self.ring_mib << 20,
            queue_bytes: (self.queue_mib as usize) << 20,
            mode: self.capture_mode,
        })
    }
}

/// Governance settings (flags > OPENBOX_* environment > `--config` file > defaults).
#[derive(Args, Clone)]
struct GovArgs {
    /// A TOML file with every setting of `run`: tables `[agent]`, `[capture]` and
    /// `[governance]` (see the README). Flags and environment variables override it.
    #[arg(long, value_name = "FILE", env = "OPENBOX_CONFIG")]
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
    /// `1.0` (default) or `2.0`: the SDK whose request conventions (headers, body
    /// encoding, ActivityCompleted rules) Core calls follow, for workers whose hook does
    /// not choose. Env: OPENBOX_SDK_CONVENTIONS.
    #[arg(long, value_name = "VERSION")]
    sdk_conventions: Option<String>,
    /// Characters kept of each captured body under 2.0 conventions (default 65536).
    #[arg(long, value_name = "CHARS")]
    max_body_size: Option<String>,
    /// Send every captured operation of a governed activity (HTTP request, database
    /// query, file operation) to Core as SDK 2.0 hook events (`started` and `completed`),
    /// for every worker; workers under 2.0 conventions get them anyway.
    /// Env: OPENBOX_HOOK_EVENTS.
    #[arg(long, value_name = "BOOL", env = "OPENBOX_HOOK_EVENTS", num_args = 0..=1, default_missing_value = "true")]
    hook_events: Option<bool>,
    /// Sign every Core request as this OpenBox agent DID (did:aip:<uuid>), with the key of
    /// --agent-private-key-file. Env: OPENBOX_AGENT_DID.
    #[arg(long, value_name = "DID")]
    agent_did: Option<String>,
    /// A file holding the base64 of the DID's raw 32-byte Ed25519 seed (readable by the
    /// agent only). Env: OPENBOX_AGENT_PRIVATE_KEY_FILE, or the key itself in
    /// OPENBOX_AGENT_PRIVATE_KEY.
    #[arg(long, value_name = "FILE")]
    agent_private_key_file: Option<PathBuf>,
    /// Sign every Core request as an Okta AI agent (API v2 routes) with this PKCS8 PEM RSA
    /// key; alone, Core names the agent's ids (bootstrap), or give them all with
    /// OPENBOX_AGENT_ID, OPENBOX_ORGANIZATION_ID, OPENBOX_DEPLOYMENT_ID,
    /// OPENBOX_OKTA_AGENT_ID, OPENBOX_OKTA_AGENT_KEY_ID, OPENBOX_AGENT_PROOF_AUDIENCE.
    /// Env: OPENBOX_OKTA_AGENT_PRIVATE_KEY_FILE, or the key itself in
    /// OPENBOX_OKTA_AGENT_PRIVATE_KEY.
    #[arg(long, value_name = "FILE")]
    okta_agent_private_key_file: Option<PathBuf>,
    /// Authenticate to Core as a workload (API v3 routes, OAuth2 token) with this PKCS8
    /// PEM RSA key. Env: OPENBOX_WORKLOAD_PRIVATE_KEY_FILE, or the key itself in
    /// OPENBOX_WORKLOAD_PRIVATE_KEY.
    #[arg(long, value_name = "FILE")]
    workload_private_key_file: Option<PathBuf>,
}

/// OTLP trace export (`trace` and `run`; `run` also reads the `[otlp]` table of its
/// config file). On when an endpoint is given. The standard OTEL_* variables set these;
/// OTEL_EXPORTER_OTLP_HEADERS and OTEL_EXPORTER_OTLP_TIMEOUT are read by the exporter
/// itself (their headers win over same-named --otlp-header ones).
#[derive(Args, Clone)]
struct OtlpArgs {
    /// Send spans to this OTLP collector (base URL: HTTP/protobuf posts to
    /// <URL>/v1/traces; https for TLS).
    #[arg(long, value_name = "URL", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// The full URL for traces, used as it is (beats --otlp-endpoint).
    #[arg(long, value_name = "URL", env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")]
    otlp_traces_endpoint: Option<String>,
    /// `http/protobuf` (default) or `grpc`.
    #[arg(long, value_name = "PROTOCOL", env = "OTEL_EXPORTER_OTLP_PROTOCOL")]
    otlp_protocol: Option<String>,
    /// A header sent with every export (e.g. `authorization=Bearer KEY`); repeatable.
    #[arg(long = "otlp-header", value_name = "NAME=VALUE")]
    otlp_headers: Vec<String>,
    /// `service.name` of the exported spans [default: openbox-agent].
    #[arg(long, value_name = "NAME", env = "OTEL_SERVICE_NAME")]
    service_name: Option<String>,
    /// A resource attribute of every exported span; repeatable (the variable takes a
    /// comma-separated list).
    #[arg(
        long = "resource-attribute",
        value_name = "KEY=VALUE",
        env = "OTEL_RESOURCE_ATTRIBUTES",
        value_delimiter = ','
    )]
    resource_attributes: Vec<String>,
    /// An extra CA bundle (PEM) trusted for the collector's TLS certificate.
    #[arg(long, value_name = "PEM", env = "OTEL_EXPORTER_OTLP_CERTIFICATE")]
    otlp_ca_file: Option<PathBuf>,
    /// Most spans waiting for export; more are dropped and counted [default: 4096].
    #[arg(long, value_name = "N")]
    otlp_queue_size: Option<usize>,
}

impl OtlpArgs {
    fn settings(self) -> export::OtlpSettings {
        let list = |v: Vec<String>| (!v.is_empty()).then_some(v);
        export::OtlpSettings {
            endpoint: self.otlp_endpoint,
            traces_endpoint: self.otlp_traces_endpoint,
            // The traces-only variable beats the general one, as the spec says.
            protocol: std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                .ok()
                .filter(|_| self.otlp_protocol.is_none())
                .or(self.otlp_protocol),
            headers: list(self.otlp_headers),
            service_name: self.service_name,
            resource_attributes: list(self.resource_attributes),
            ca_file: self.otlp_ca_file,
            queue_size: self.otlp_queue_size,
        }
    }
}

/// How logs are written (`trace` and `run`).
#[derive(Args, Clone)]
struct LogArgs {
    /// `text` (readable) or `json` (one object per line, for log collectors)
    /// [default: text]. Env: OPENBOX_LOG_FORMAT. Verbosity: OPENBOX_LOG (default warn).
    #[arg(long, value_enum, env = "OPENBOX_LOG_FORMAT")]
    log_format: Option<LogFormat>,
}

impl GovArgs {
    fn load(
        &self,
        events: Option<String>,
        allow_worker_core_url: Vec<String>,
    ) -> Result<openbox_agent::governance::GovernanceConfig> {
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
            sdk_conventions: self.sdk_conventions.clone(),
            max_body_size: self.max_body_size.clone(),
            hook_events: self.hook_events,
            agent_did: self.agent_did.clone(),
            agent_private_key_file: self.agent_private_key_file.clone(),
            okta_agent_private_key_file: self.okta_agent_private_key_file.clone(),
            workload_private_key_file: self.workload_private_key_file.clone(),
        };
        let mut cfg =
            openbox_agent::governance::GovernanceConfig::load(&raw, self.config.as_deref())?;
        cfg.allow_worker_core_urls = allow_worker_core_url;
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
        #[command(flatten)]
        log: LogArgs,
        #[command(flatten)]
        otlp: OtlpArgs,
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
        /// The hook socket (Unix stream socket) [default: /run/openbox/agent.sock].
        #[arg(long, env = "OPENBOX_AGENT_SOCKET")]
        socket: Option<PathBuf>,
        /// Group (name or gid) of the socket (mode 0660) and of its directory (0750):
        /// run workers with this group to let them connect [default: the agent's group].
        #[arg(long, env = "OPENBOX_SOCKET_GROUP", value_name = "NAME|GID")]
        socket_group: Option<String>,
        /// Most hook connections one uid may hold at once (root included); more are
        /// closed at once [default: 256].
        #[arg(long)]
        max_connections_per_uid: Option<usize>,
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
        /// Most spans kept per activity (more are counted and dropped) [default: 2000].
        #[arg(long)]
        span_limit: Option<usize>,
        /// Serve Prometheus metrics at /metrics, and the probes /healthz (alive) and
        /// /readyz (programs attached, hook socket serving), on this HOST:PORT.
        /// Env: OPENBOX_METRICS_ADDR.
        #[arg(long, value_name = "HOST:PORT", env = "OPENBOX_METRICS_ADDR")]
        metrics_addr: Option<String>,
        /// Hold each operation of a governed activity whose operations go out as hook
        /// events until Core answers its `started` stage (seccomp user notification on
        /// the worker threads that run activities; BLOCK/HALT deny the call, HALT stays
        /// for the activity's threads and processes). Env: OPENBOX_ENFORCE.
        #[arg(long, value_name = "BOOL", env = "OPENBOX_ENFORCE", num_args = 0..=1, default_missing_value = "true")]
        enforce: Option<bool>,
        #[command(flatten)]
        capture: CaptureArgs,
        #[command(flatten)]
        log: LogArgs,
        #[command(flatten)]
        otlp: OtlpArgs,
    },
    /// Report what this kernel offers, the privileges held, and the mode the agent will use.
    Check {
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    tune_allocator();
    let code = match real_main() {
        Ok(code) => code,
        Err(e) if logging::is_json() => {
            tracing::error!(error = %format!("{e:#}"), "openbox-agent failed");
            1
        }
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
            logging::init(LogFormat::Text);
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
            log,
            otlp,
            show_bytes,
            command,
        } => {
            logging::init(log.log_format.unwrap_or_default());
            let capture = capture.resolve(CaptureFile::default());
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
                otlp: otlp.settings().resolve()?,
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
            metrics_addr,
            enforce,
            capture,
            log,
            otlp,
        } => {
            let file = match &governance.config {
                Some(path) => FileConfig::load(path)?,
                None => FileConfig::default(),
            };
            let agent = file.agent;
            logging::init(pick(log.log_format, agent.log_format, LogFormat::Text));
            let capture = capture.resolve(file.capture);
            let allow = pick_list(
                governance.allow_worker_core_url.clone(),
                agent.allow_worker_core_url,
            );
            preflight::raise_nofile_limit();
            let opts = daemon::RunOpts {
                socket: pick(
                    socket,
                    agent.socket,
                    PathBuf::from(daemon::hook::DEFAULT_SOCKET),
                ),
                governance: governance.load(events, allow)?,
                unattributed: unattributed.or(agent.unattributed),
                spans: capture.spans(),
                capture: capture.capture()?,
                tls_libs: capture.tls_libs.clone(),
                skip: capture.skip(),
                span_limit: pick(span_limit, agent.span_limit, 2000),
                metrics_addr: metrics_addr.or(agent.metrics_addr),
                enforce: pick(enforce, agent.enforce, false),
                socket_group: socket_group
                    .or(agent.socket_group)
                    .as_deref()
                    .map(daemon::hook::parse_group)
                    .transpose()?,
                hook_limits: daemon::hook::Limits {
                    max_connections_per_uid: pick(
                        max_connections_per_uid,
                        agent.max_connections_per_uid,
                        daemon::hook::DEFAULT_MAX_CONNECTIONS_PER_UID,
                    ),
                    ..Default::default()
                },
                otlp: otlp.settings().or(file.otlp).resolve()?,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(daemon::run(opts))
        }
    }
}
