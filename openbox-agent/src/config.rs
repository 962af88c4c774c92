//! The `--config` file of `run`: every setting of the command line, one TOML table per
//! part. Keys are the flags' names with `_` for `-` (repeatable flags take a list, named
//! in the plural, e.g. `--tls-lib` → `tls_libs`):
//!
//! ```toml
//! [agent]       # socket, socket_group, max_connections_per_uid, unattributed,
//!               # span_limit, metrics_addr, log_format, allow_worker_core_url,
//!               # enforce
//! [capture]     # max_body, max_statement, no_redact, redact_headers, redact_patterns,
//!               # no_redact_patterns, every_file_call, capture_limit, tls_libs,
//!               # skip_paths, no_default_skips, no_tls_pause, ring_mib,
//!               # queue_mib, capture_mode
//! [governance]  # see governance::config (`--events` is `events_sink` there)
//! [otlp]        # endpoint, traces_endpoint, protocol, headers, service_name,
//!               # resource_attributes, ca_file, queue_size
//! ```
//!
//! Precedence, for every setting: command-line flag > environment variable (where the
//! setting has one) > this file > the default. A list given on the command line replaces
//! the file's. An unknown table or key is an error naming it: a misspelled setting must
//! not be silently ignored.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::{export::OtlpSettings, logging::LogFormat};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub agent: AgentFile,
    #[serde(default)]
    pub capture: CaptureFile,
    /// Read and checked by [`crate::governance::config`], with its own messages.
    #[serde(default)]
    pub governance: Option<toml::Table>,
    /// OTLP export (`--otlp-*` flags, `OTEL_*` variables).
    #[serde(default)]
    pub otlp: OtlpSettings,
}

/// The daemon's own settings (`[agent]`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    pub socket: Option<PathBuf>,
    /// A group name or numeric gid, as `--socket-group`.
    pub socket_group: Option<String>,
    pub max_connections_per_uid: Option<usize>,
    pub unattributed: Option<PathBuf>,
    pub span_limit: Option<usize>,
    pub metrics_addr: Option<String>,
    pub log_format: Option<LogFormat>,
    pub allow_worker_core_url: Option<Vec<String>>,
    pub enforce: Option<bool>,
}

/// Capture and span settings (`[capture]`), as the flags shared with `trace`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureFile {
    pub max_body: Option<usize>,
    pub max_statement: Option<usize>,
    pub no_redact: Option<bool>,
    pub redact_headers: Option<Vec<String>>,
    pub redact_patterns: Option<Vec<String>>,
    pub no_redact_patterns: Option<Vec<String>>,
    pub every_file_call: Option<bool>,
    pub capture_limit: Option<u32>,
    pub tls_libs: Option<Vec<PathBuf>>,
    pub skip_paths: Option<Vec<String>>,
    pub no_default_skips: Option<bool>,
    pub no_tls_pause: Option<bool>,
    pub ring_mib: Option<u32>,
    pub queue_mib: Option<u32>,
    pub capture_mode: Option<crate::capture::mode::ModeChoice>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let mut c = Self::parse(&text).map_err(|e| {
            anyhow::anyhow!(
                "config file {}: {}",
                path.display(),
                e.to_string().trim_end()
            )
        })?;
        // Relative paths are the file's neighbours, as `policy_file` in [governance]: a
        // config must not mean something else when the agent starts from another directory.
        let dir = path.parent().unwrap_or(Path::new("."));
        let near = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        let (agent, capture) = (&mut c.agent, &mut c.capture);
        agent
            .socket
            .iter_mut()
            .chain(agent.unattributed.iter_mut())
            .chain(capture.tls_libs.iter_mut().flatten())
            .chain(c.otlp.ca_file.iter_mut())
            .for_each(near);
        Ok(c)
    }

    pub fn parse(text: &str) -> Result<FileConfig, toml::de::Error> {
        toml::from_str(text)
    }
}

/// The value of a setting: the command line's (flag or environment), else the file's,
/// else the default.
pub fn pick<T>(cli: Option<T>, file: Option<T>, default: T) -> T {
    cli.or(file).unwrap_or(default)
}

/// A list setting: the command line's when given (it replaces the file's), else the file's.
pub fn pick_list<T>(cli: Vec<T>, file: Option<Vec<T>>) -> Vec<T> {
    if cli.is_empty() {
        file.unwrap_or_default()
    } else {
        cli
    }
}

/// An on/off flag: on when the flag is given, else as the file says (default off).
pub fn pick_flag(cli: bool, file: Option<bool>) -> bool {
    cli || file.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_is_read_and_an_unknown_key_is_named_with_its_line() {
        let c = FileConfig::parse(
            r#"
[agent]
socket = "/run/x.sock"
metrics_addr = "127.0.0.1:9464"
log_format = "json"
[capture]
ring_mib = 32
queue_mib = 48
capture_mode = "tracepoint"
tls_libs = ["/opt/ssl/libssl.so.3"]
[governance]
governance_policy = "fail_closed"
[otlp]
endpoint = "http://collector:4318"
headers = ["x-api-key=k"]
"#,
        )
        .unwrap();
        assert_eq!(c.otlp.endpoint.as_deref(), Some("http://collector:4318"));
        assert_eq!(c.otlp.headers, Some(vec!["x-api-key=k".to_string()]));
        assert_eq!(c.agent.socket, Some("/run/x.sock".into()));
        assert_eq!(c.agent.log_format, Some(LogFormat::Json));
        assert_eq!(c.capture.ring_mib, Some(32));
        assert_eq!(c.capture.queue_mib, Some(48));
        assert_eq!(
            c.capture.capture_mode,
            Some(crate::capture::mode::ModeChoice::Tracepoint)
        );
        assert!(c.governance.is_some());

        let e = FileConfig::parse("[capture]\nring_mb = 32\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `ring_mb`"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        let e = FileConfig::parse("[metrics]\naddr = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `metrics`"), "{e}");
        let e = FileConfig::parse("[agent]\nlog_format = \"xml\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("xml"), "{e}");
        let e = FileConfig::parse("[capture]\ncapture_mode = \"kprobe\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("kprobe") && e.contains("fentry"), "{e}");
    }

    #[test]
    fn the_example_config_holds_every_table_and_its_governance_table_is_valid() {
        let text = include_str!("../../deploy/agent.toml");
        let c = FileConfig::parse(text).unwrap();
        assert_eq!(c.agent.metrics_addr.as_deref(), Some("0.0.0.0:9464"));
        assert!(c.capture.ring_mib.is_some());
        assert_eq!(
            c.otlp.queue_size,
            Some(crate::export::otlp::DEFAULT_QUEUE_SIZE)
        );
        crate::governance::GovernanceConfig::from_toml_str(
            text,
            Path::new("/etc/openbox-agent/agent.toml"),
        )
        .unwrap();
    }

    #[test]
    fn the_command_line_beats_the_file_which_beats_the_default() {
        assert_eq!(pick(Some(1), Some(2), 3), 1);
        assert_eq!(pick(None, Some(2), 3), 2);
        assert_eq!(pick(None, None, 3), 3);
        assert_eq!(pick_list(vec![1], Some(vec![2, 3])), vec![1]);
        assert_eq!(pick_list(vec![], Some(vec![2, 3])), vec![2, 3]);
        assert!(pick_flag(false, Some(true)));
        assert!(!pick_flag(false, None));
    }
}
