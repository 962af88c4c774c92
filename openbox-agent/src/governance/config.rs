//! Governance settings (protocol §7, SDK 1.0 names) and where they come from.
//!
//! Precedence: command-line flags > environment (`OPENBOX_URL`, `OPENBOX_API_KEY`,
//! `OPENBOX_GOVERNANCE_TIMEOUT`, `OPENBOX_GOVERNANCE_POLICY`) > the `[governance]` table of
//! the TOML config file > defaults. The CLI fills a [`RawSettings`] from its flags (every
//! field optional; `None` = not given) and calls [`GovernanceConfig::load`].
//!
//! Every bad value is rejected with an error that names where it came from, the setting,
//! and what is allowed, e.g. `OPENBOX_GOVERNANCE_TIMEOUT=abc: governance_timeout must be a
//! positive number of seconds`.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use super::{
    conventions::Conventions,
    identity::{Identity, OktaIds, RsaKey},
    signing::DidSigner,
};

/// Default spool directory (a DaemonSet mounts a hostPath here to keep it across pods).
pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/openbox-agent/spool";
/// Default spool limits: 256 MiB or 100 000 events, whichever is reached first.
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 256 * 1024 * 1024;
pub const DEFAULT_SPOOL_MAX_EVENTS: u64 = 100_000;
/// The SDK's default skip list entry (its own workflow-event activity).
pub const SEND_GOVERNANCE_EVENT: &str = "send_governance_event";

/// `on_api_error` / `governance_policy` (§6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FailPolicy {
    #[default]
    FailOpen,
    FailClosed,
}

impl FailPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            FailPolicy::FailOpen => "fail_open",
            FailPolicy::FailClosed => "fail_closed",
        }
    }
}

/// Where governance events are written as JSON lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkTarget {
    Stdout,
    File(PathBuf),
}

/// The settings as the CLI (clap) hands them over: every field `None` when not given.
/// Lists replace the default when given (as in the SDK: keep `send_governance_event` in
/// `skip_activity_types`).
///
/// Recommended flag names (used in error messages): `--openbox-url`, `--openbox-api-key`,
/// `--governance-policy`, `--governance-timeout`, `--send-start-event`,
/// `--send-activity-start-event`, `--skip-workflow-type`, `--skip-signal`,
/// `--skip-activity-type`, `--hitl-enabled`, `--skip-hitl-activity-type`,
/// `--policy-file`, `--events-sink`, `--ca-file`, `--spool-dir`, `--spool-max-bytes`,
/// `--spool-max-events`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RawSettings {
    pub openbox_url: Option<String>,
    pub openbox_api_key: Option<String>,
    /// `fail_open` or `fail_closed` (SDK 1.0 `on_api_error`).
    pub governance_policy: Option<String>,
    /// Seconds, a positive number (`api_timeout`).
    pub governance_timeout: Option<String>,
    pub send_start_event: Option<bool>,
    pub send_activity_start_event: Option<bool>,
    pub skip_workflow_types: Option<Vec<String>>,
    pub skip_signals: Option<Vec<String>>,
    pub skip_activity_types: Option<Vec<String>>,
    pub hitl_enabled: Option<bool>,
    pub skip_hitl_activity_types: Option<Vec<String>>,
    /// The embedded default's local policy file (TOML, see `policy`).
    pub policy_file: Option<PathBuf>,
    /// A path, `-` for stdout, or `off`.
    pub events_sink: Option<String>,
    /// An extra PEM CA bundle trusted for Core besides the system roots.
    pub ca_file: Option<PathBuf>,
    pub spool_dir: Option<PathBuf>,
    /// Bytes, with an optional K/M/G (or KiB/MiB/GiB) suffix.
    pub spool_max_bytes: Option<String>,
    pub spool_max_events: Option<String>,
    /// `1.0` or `2.0`: the default request conventions (a worker's hook may choose).
    pub sdk_conventions: Option<String>,
    /// Characters of each captured body kept under 2.0 conventions.
    pub max_body_size: Option<String>,
    /// Send SDK 2.0 hook events for every captured operation (whatever the conventions).
    pub hook_events: Option<bool>,
    /// The OpenBox agent DID requests are signed as (§1.3).
    pub agent_did: Option<String>,
    /// A file holding the base64 Ed25519 seed of `agent_did`.
    pub agent_private_key_file: Option<PathBuf>,
    /// A file holding the Okta AI agent's PKCS8 PEM RSA key (API v2 identity).
    pub okta_agent_private_key_file: Option<PathBuf>,
    /// A file holding the workload service account's PKCS8 PEM RSA key (API v3 identity).
    pub workload_private_key_file: Option<PathBuf>,
}

/// Where a value came from, for error messages.
#[derive(Clone, Debug)]
enum Origin {
    Flag(&'static str),
    Env(&'static str),
    File(PathBuf, &'static str),
    /// A worker's `create_openbox_worker` parameter, sent by its hook in `hello`.
    Worker(&'static str),
}

impl Origin {
    fn label(&self, value: &str) -> String {
        match self {
            Origin::Flag(f) => format!("{f} {value}"),
            Origin::Env(e) => format!("{e}={value}"),
            Origin::File(p, k) => format!("{}: governance.{k} = {value:?}", p.display()),
            Origin::Worker(k) => format!("the worker's {k} = {value:?}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
}

/// The resolved governance settings.
#[derive(Clone, Debug, PartialEq)]
pub struct GovernanceConfig {
    /// Core base URL without trailing `/`; `None` = embedded mode (local policy + sink).
    pub openbox_url: Option<String>,
    pub openbox_api_key: Option<String>,
    pub on_api_error: FailPolicy,
    /// Per HTTP call (default 30 s).
    pub governance_timeout: Duration,
    pub send_start_event: bool,
    pub send_activity_start_event: bool,
    pub skip_workflow_types: BTreeSet<String>,
    pub skip_signals: BTreeSet<String>,
    pub skip_activity_types: BTreeSet<String>,
    pub hitl_enabled: bool,
    pub skip_hitl_activity_types: BTreeSet<String>,
    pub policy_file: Option<PathBuf>,
    /// Default: stdout in embedded mode, none with a Core URL.
    pub events_sink: Option<SinkTarget>,
    pub ca_file: Option<PathBuf>,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    pub spool_max_events: u64,
    /// Spool delivery backoff: first wait and cap (not file settings; tests shorten them).
    pub spool_retry_initial: Duration,
    pub spool_retry_max: Duration,
    /// Non-fatal findings (API key format), also logged at load time.
    pub warnings: Vec<String>,
    /// Core URL prefixes a worker may ask for when the agent has no Core URL of its own
    /// (`--allow-worker-core-url`, operator only: never from a worker). Empty: none.
    pub allow_worker_core_urls: Vec<String>,
    /// The request conventions of workers that do not choose theirs.
    pub sdk_conventions: Conventions,
    /// Characters of each captured body kept under 2.0 conventions; `None`: SDK 2.0's
    /// default (65 536).
    pub max_body_size: Option<usize>,
    /// Every captured operation of a governed activity is sent as SDK 2.0 hook events
    /// (§3.2), for every worker; workers under 2.0 conventions get them anyway.
    pub hook_events: bool,
    /// Signs every Core request (§1.3: OpenBox DID, Okta AI agent or workload);
    /// operator settings only.
    pub identity: Option<Arc<Identity>>,
}

impl Default for GovernanceConfig {
    fn default() -> Self {
        let send = BTreeSet::from([SEND_GOVERNANCE_EVENT.to_owned()]);
        GovernanceConfig {
            openbox_url: None,
            openbox_api_key: None,
            on_api_error: FailPolicy::FailOpen,
            governance_timeout: Duration::from_secs(30),
            send_start_event: true,
            send_activity_start_event: true,
            skip_workflow_types: BTreeSet::new(),
            skip_signals: BTreeSet::new(),
            skip_activity_types: send.clone(),
            hitl_enabled: true,
            skip_hitl_activity_types: send,
            policy_file: None,
            events_sink: Some(SinkTarget::Stdout),
            ca_file: None,
            spool_dir: PathBuf::from(DEFAULT_SPOOL_DIR),
            spool_max_bytes: DEFAULT_SPOOL_MAX_BYTES,
            spool_max_events: DEFAULT_SPOOL_MAX_EVENTS,
            spool_retry_initial: Duration::from_millis(500),
            spool_retry_max: Duration::from_secs(30),
            warnings: Vec::new(),
            allow_worker_core_urls: Vec::new(),
            sdk_conventions: Conventions::V1,
            max_body_size: None,
            hook_events: false,
            identity: None,
        }
    }
}

const FILE_KEYS: &[&str] = &[
    "openbox_url",
    "openbox_api_key",
    "governance_policy",
    "on_api_error",
    "governance_timeout",
    "api_timeout",
    "send_start_event",
    "send_activity_start_event",
    "skip_workflow_types",
    "skip_signals",
    "skip_activity_types",
    "hitl_enabled",
    "skip_hitl_activity_types",
    "policy_file",
    "events_sink",
    "ca_file",
    "spool_dir",
    "spool_max_bytes",
    "spool_max_events",
    "sdk_conventions",
    "max_body_size",
    "hook_events",
    "agent_did",
    "agent_private_key_file",
    "okta_agent_private_key_file",
    "workload_private_key_file",
    "openbox_agent_id",
    "organization_id",
    "deployment_id",
    "okta_agent_id",
    "okta_agent_key_id",
    "agent_proof_audience",
    "okta_agent_algorithm",
];

/// The explicit Okta identity set besides the key (SDK 2.0's parameter names): all of
/// them, or none (bootstrap mode: Core names them).
const OKTA_IDS: &[&str] = &[
    "openbox_agent_id",
    "organization_id",
    "deployment_id",
    "okta_agent_id",
    "okta_agent_key_id",
    "agent_proof_audience",
];

/// The SDK parameters a worker may pass (`create_openbox_worker`).
const WORKER_KEYS: &[&str] = &[
    "openbox_url",
    "openbox_api_key",
    "governance_timeout",
    "governance_policy",
    "send_start_event",
    "send_activity_start_event",
    "skip_workflow_types",
    "skip_activity_types",
    "skip_signals",
    "hitl_enabled",
];

/// One layer of settings with the origin of each value.
#[derive(Default)]
struct Layer {
    values: Vec<(&'static str, Origin, Val)>,
}

#[derive(Clone, Debug)]
enum Val {
    Text(String),
    Bool(bool),
    List(Vec<String>),
    Path(PathBuf),
}

impl Layer {
    fn get(&self, name: &str) -> Option<(&Origin, &Val)> {
        self.values
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, o, v)| (o, v))
    }

    /// One layer of `layers` (first = strongest): each setting from the first that has it.
    fn merged(layers: &[Layer]) -> Layer {
        let mut out = Layer::default();
        for layer in layers {
            for (name, origin, val) in &layer.values {
                if out.get(name).is_none() {
                    out.values.push((name, origin.clone(), val.clone()));
                }
            }
        }
        out
    }

    fn take(&mut self, name: &str) -> Option<Val> {
        let i = self.values.iter().position(|(n, _, _)| *n == name)?;
        Some(self.values.remove(i).2)
    }

    /// The SDK parameters a worker passed to `create_openbox_worker`, as its hook sends
    /// them in `hello` (`config`, a JSON object; `null` = not given, other keys ignored).
    fn from_worker(settings: &serde_json::Value) -> Result<Layer, ConfigError> {
        use serde_json::Value;
        let mut l = Layer::default();
        let Some(map) = settings.as_object() else {
            return Ok(l);
        };
        for &name in WORKER_KEYS {
            let Some(value) = map.get(name).filter(|v| !v.is_null()) else {
                continue;
            };
            let wrong = |want: &str| {
                ConfigError::Invalid(format!("the worker's {name} must be {want}, not {value}"))
            };
            let val = match name {
                "send_start_event" | "send_activity_start_event" | "hitl_enabled" => {
                    Val::Bool(value.as_bool().ok_or_else(|| wrong("true or false"))?)
                }
                "skip_workflow_types" | "skip_signals" | "skip_activity_types" => Val::List(
                    value
                        .as_array()
                        .and_then(|a| {
                            a.iter()
                                .map(|v| v.as_str().map(str::to_owned))
                                .collect::<Option<Vec<_>>>()
                        })
                        .ok_or_else(|| wrong("a list of names"))?,
                ),
                "governance_timeout" => match value {
                    Value::Number(n) => Val::Text(n.to_string()),
                    _ => return Err(wrong("a positive number of seconds")),
                },
                _ => Val::Text(value.as_str().ok_or_else(|| wrong("a string"))?.to_owned()),
            };
            l.values.push((name, Origin::Worker(name), val));
        }
        Ok(l)
    }

    fn from_flags(raw: &RawSettings) -> Layer {
        let mut l = Layer::default();
        let mut text = |name, flag, v: &Option<String>| {
            if let Some(v) = v {
                l.values
                    .push((name, Origin::Flag(flag), Val::Text(v.clone())));
            }
        };
        text("openbox_url", "--openbox-url", &raw.openbox_url);
        text("openbox_api_key", "--openbox-api-key", &raw.openbox_api_key);
        text(
            "governance_policy",
            "--governance-policy",
            &raw.governance_policy,
        );
        text(
            "governance_timeout",
            "--governance-timeout",
            &raw.governance_timeout,
        );
        text("events_sink", "--events-sink", &raw.events_sink);
        text("spool_max_bytes", "--spool-max-bytes", &raw.spool_max_bytes);
        text(
            "spool_max_events",
            "--spool-max-events",
            &raw.spool_max_events,
        );
        text("sdk_conventions", "--sdk-conventions", &raw.sdk_conventions);
        text("max_body_size", "--max-body-size", &raw.max_body_size);
        text("agent_did", "--agent-did", &raw.agent_did);
        for (name, flag, v) in [
            (
                "send_start_event",
                "--send-start-event",
                raw.send_start_event,
            ),
            (
                "send_activity_start_event",
                "--send-activity-start-event",
                raw.send_activity_start_event,
            ),
            ("hitl_enabled", "--hitl-enabled", raw.hitl_enabled),
            ("hook_events", "--hook-events", raw.hook_events),
        ] {
            if let Some(b) = v {
                l.values.push((name, Origin::Flag(flag), Val::Bool(b)));
            }
        }
        for (name, flag, v) in [
            (
                "skip_workflow_types",
                "--skip-workflow-type",
                &raw.skip_workflow_types,
            ),
            ("skip_signals", "--skip-signal", &raw.skip_signals),
            (
                "skip_activity_types",
                "--skip-activity-type",
                &raw.skip_activity_types,
            ),
            (
                "skip_hitl_activity_types",
                "--skip-hitl-activity-type",
                &raw.skip_hitl_activity_types,
            ),
        ] {
            if let Some(list) = v {
                l.values
                    .push((name, Origin::Flag(flag), Val::List(list.clone())));
            }
        }
        for (name, flag, v) in [
            ("policy_file", "--policy-file", &raw.policy_file),
            ("ca_file", "--ca-file", &raw.ca_file),
            ("spool_dir", "--spool-dir", &raw.spool_dir),
            (
                "agent_private_key_file",
                "--agent-private-key-file",
                &raw.agent_private_key_file,
            ),
            (
                "okta_agent_private_key_file",
                "--okta-agent-private-key-file",
                &raw.okta_agent_private_key_file,
            ),
            (
                "workload_private_key_file",
                "--workload-private-key-file",
                &raw.workload_private_key_file,
            ),
        ] {
            if let Some(p) = v {
                l.values
                    .push((name, Origin::Flag(flag), Val::Path(p.clone())));
            }
        }
        l
    }

    fn from_env(getenv: &dyn Fn(&str) -> Option<String>) -> Layer {
        let mut l = Layer::default();
        for (name, var) in [
            ("openbox_url", "OPENBOX_URL"),
            ("openbox_api_key", "OPENBOX_API_KEY"),
            ("governance_timeout", "OPENBOX_GOVERNANCE_TIMEOUT"),
            ("governance_policy", "OPENBOX_GOVERNANCE_POLICY"),
            ("sdk_conventions", "OPENBOX_SDK_CONVENTIONS"),
            ("max_body_size", "OPENBOX_MAX_BODY_SIZE"),
            ("agent_did", "OPENBOX_AGENT_DID"),
            ("agent_private_key", "OPENBOX_AGENT_PRIVATE_KEY"),
            ("okta_agent_private_key", "OPENBOX_OKTA_AGENT_PRIVATE_KEY"),
            (
                "okta_agent_private_key_file",
                "OPENBOX_OKTA_AGENT_PRIVATE_KEY_FILE",
            ),
            ("workload_private_key", "OPENBOX_WORKLOAD_PRIVATE_KEY"),
            (
                "workload_private_key_file",
                "OPENBOX_WORKLOAD_PRIVATE_KEY_FILE",
            ),
            ("openbox_agent_id", "OPENBOX_AGENT_ID"),
            ("organization_id", "OPENBOX_ORGANIZATION_ID"),
            ("deployment_id", "OPENBOX_DEPLOYMENT_ID"),
            ("okta_agent_id", "OPENBOX_OKTA_AGENT_ID"),
            ("okta_agent_key_id", "OPENBOX_OKTA_AGENT_KEY_ID"),
            ("agent_proof_audience", "OPENBOX_AGENT_PROOF_AUDIENCE"),
            ("okta_agent_algorithm", "OPENBOX_OKTA_AGENT_ALGORITHM"),
        ] {
            // An empty variable counts as unset (a common shell idiom).
            if let Some(v) = getenv(var).filter(|v| !v.is_empty()) {
                l.values.push((name, Origin::Env(var), Val::Text(v)));
            }
        }
        if let Some(v) = getenv("OPENBOX_AGENT_PRIVATE_KEY_FILE").filter(|v| !v.is_empty()) {
            l.values.push((
                "agent_private_key_file",
                Origin::Env("OPENBOX_AGENT_PRIVATE_KEY_FILE"),
                Val::Path(PathBuf::from(v)),
            ));
        }
        l
    }

    fn from_toml(text: &str, path: &Path) -> Result<Layer, ConfigError> {
        let doc: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let mut l = Layer::default();
        let Some(section) = doc.get("governance") else {
            return Ok(l);
        };
        let table = section.as_table().ok_or_else(|| {
            ConfigError::Invalid(format!(
                "{}: governance must be a table ([governance])",
                path.display()
            ))
        })?;
        for (key, value) in table {
            let Some(&name) = FILE_KEYS.iter().find(|k| *k == key) else {
                return Err(ConfigError::Invalid(format!(
                    "{}: unknown setting governance.{key}; allowed: {}",
                    path.display(),
                    FILE_KEYS.join(", ")
                )));
            };
            // SDK aliases: on_api_error = governance_policy, api_timeout = governance_timeout.
            let canonical = match name {
                "on_api_error" => "governance_policy",
                "api_timeout" => "governance_timeout",
                n => n,
            };
            if l.get(canonical).is_some() {
                return Err(ConfigError::Invalid(format!(
                    "{}: governance.{key} and its alias are both set; keep one",
                    path.display()
                )));
            }
            let origin = Origin::File(path.to_owned(), name);
            let wrong = |want: &str| {
                ConfigError::Invalid(format!(
                    "{}: governance.{key} must be {want}, not {value}",
                    path.display()
                ))
            };
            let val = match canonical {
                "send_start_event"
                | "send_activity_start_event"
                | "hitl_enabled"
                | "hook_events" => {
                    Val::Bool(value.as_bool().ok_or_else(|| wrong("true or false"))?)
                }
                "skip_workflow_types"
                | "skip_signals"
                | "skip_activity_types"
                | "skip_hitl_activity_types" => {
                    let arr = value
                        .as_array()
                        .ok_or_else(|| wrong("an array of strings"))?;
                    let list = arr
                        .iter()
                        .map(|v| v.as_str().map(str::to_owned))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| wrong("an array of strings"))?;
                    Val::List(list)
                }
                "policy_file"
                | "ca_file"
                | "spool_dir"
                | "agent_private_key_file"
                | "okta_agent_private_key_file"
                | "workload_private_key_file" => {
                    let s = value.as_str().ok_or_else(|| wrong("a path string"))?;
                    // Relative paths in a file are relative to the file.
                    let p = Path::new(s);
                    Val::Path(if p.is_relative() {
                        path.parent().unwrap_or(Path::new(".")).join(p)
                    } else {
                        p.to_owned()
                    })
                }
                "governance_timeout" | "spool_max_bytes" | "spool_max_events" | "max_body_size" => {
                    match value {
                        toml::Value::Integer(i) => Val::Text(i.to_string()),
                        toml::Value::Float(f) => Val::Text(f.to_string()),
                        toml::Value::String(s) => Val::Text(s.clone()),
                        _ => return Err(wrong("a number")),
                    }
                }
                _ => Val::Text(value.as_str().ok_or_else(|| wrong("a string"))?.to_owned()),
            };
            l.values.push((canonical, origin, val));
        }
        Ok(l)
    }
}

fn invalid(origin: &Origin, value: &str, rule: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid(format!("{}: {rule}", origin.label(value)))
}

impl GovernanceConfig {
    /// Resolves flags > process environment > `config_file` (`[governance]` table) >
    /// defaults. A missing `config_file` is an error (the user named it).
    pub fn load(
        flags: &RawSettings,
        config_file: Option<&Path>,
    ) -> Result<GovernanceConfig, ConfigError> {
        Self::load_with_env(flags, config_file, &|k| std::env::var(k).ok())
    }

    /// [`GovernanceConfig::load`] with an explicit environment (tests).
    pub fn load_with_env(
        flags: &RawSettings,
        config_file: Option<&Path>,
        getenv: &dyn Fn(&str) -> Option<String>,
    ) -> Result<GovernanceConfig, ConfigError> {
        let file = match config_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Layer::from_toml(&text, path)?
            }
            None => Layer::default(),
        };
        Self::resolve(&[Layer::from_flags(flags), Layer::from_env(getenv), file])
    }

    /// Parses a config file's text alone (no flags or environment), for `check`-style
    /// validation of a file.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<GovernanceConfig, ConfigError> {
        Self::resolve(&[Layer::from_toml(text, path)?])
    }

    fn resolve(layers: &[Layer]) -> Result<GovernanceConfig, ConfigError> {
        let merged = Layer::merged(layers);
        let mut c = GovernanceConfig::default();
        c.apply(&merged)?;
        c.load_identity(&merged)?;
        if merged.get("events_sink").is_none() && c.openbox_url.is_some() {
            c.events_sink = None;
        }
        match (&c.openbox_url, &c.openbox_api_key) {
            (Some(url), None) => {
                return Err(ConfigError::Invalid(format!(
                    "openbox_url is {url} but no API key is set: set OPENBOX_API_KEY (or --openbox-api-key, \
                     or governance.openbox_api_key), or unset the URL to run on the embedded local policy"
                )))
            }
            (None, Some(_)) => c.warnings.push(
                "an OpenBox API key is set but no openbox_url: running on the embedded local policy".to_owned(),
            ),
            (Some(_), Some(key)) if !api_key_format_ok(key) => c.warnings.push(
                "OpenBox API key format may be invalid: expected obx_live_… or obx_test_… \
                 (^obx_(live|test)_[a-zA-Z0-9_]+$)"
                    .to_owned(),
            ),
            _ => {}
        }
        for w in &c.warnings {
            tracing::warn!("{w}");
        }
        Ok(c)
    }

    /// Sets what `layer` holds, checking each value (the errors name where it came from).
    fn apply(&mut self, layer: &Layer) -> Result<(), ConfigError> {
        let pick = |name: &str| layer.get(name);
        let c = self;
        let text = |name: &str| match pick(name) {
            Some((o, Val::Text(s))) => Some((o.clone(), s.clone())),
            _ => None,
        };

        if let Some((origin, url)) = text("openbox_url") {
            c.openbox_url = normalize_url(&url).map_err(|rule| invalid(&origin, &url, rule))?;
        }
        if let Some((_, key)) = text("openbox_api_key") {
            c.openbox_api_key = Some(key).filter(|k| !k.is_empty());
        }
        if let Some((origin, v)) = text("governance_policy") {
            c.on_api_error = match v.trim().to_lowercase().replace('-', "_").as_str() {
                "fail_open" => FailPolicy::FailOpen,
                "fail_closed" => FailPolicy::FailClosed,
                _ => {
                    return Err(invalid(
                        &origin,
                        &v,
                        "governance_policy must be fail_open or fail_closed",
                    ))
                }
            };
        }
        if let Some((origin, v)) = text("governance_timeout") {
            c.governance_timeout = v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s > 0.0 && *s <= 86_400.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| {
                    invalid(
                        &origin,
                        &v,
                        "governance_timeout must be a positive number of seconds (at most 86400)",
                    )
                })?;
        }
        for (name, slot) in [
            ("send_start_event", &mut c.send_start_event),
            (
                "send_activity_start_event",
                &mut c.send_activity_start_event,
            ),
            ("hitl_enabled", &mut c.hitl_enabled),
            ("hook_events", &mut c.hook_events),
        ] {
            if let Some((_, Val::Bool(b))) = pick(name) {
                *slot = *b;
            }
        }
        for (name, slot) in [
            ("skip_workflow_types", &mut c.skip_workflow_types),
            ("skip_signals", &mut c.skip_signals),
            ("skip_activity_types", &mut c.skip_activity_types),
            ("skip_hitl_activity_types", &mut c.skip_hitl_activity_types),
        ] {
            if let Some((origin, Val::List(list))) = pick(name) {
                if let Some(empty) = list.iter().find(|s| s.trim().is_empty()) {
                    return Err(invalid(
                        origin,
                        empty,
                        format!("{name} entries must be non-empty names"),
                    ));
                }
                *slot = list.iter().cloned().collect();
            }
        }
        let path = |name: &str| match pick(name) {
            Some((_, Val::Path(p))) => Some(p.clone()),
            _ => None,
        };
        if let Some(file) = path("policy_file") {
            c.policy_file = Some(file);
        }
        if let Some(file) = path("ca_file") {
            c.ca_file = Some(file);
        }
        if let Some(dir) = path("spool_dir") {
            c.spool_dir = dir;
        }
        if let Some((origin, s)) = text("events_sink") {
            c.events_sink = match s.as_str() {
                "-" => Some(SinkTarget::Stdout),
                "off" => None,
                _ if s.trim().is_empty() => {
                    return Err(invalid(
                        &origin,
                        &s,
                        "events_sink must be a file path, - (stdout) or off",
                    ))
                }
                _ => Some(SinkTarget::File(PathBuf::from(s))),
            };
        }
        if let Some((origin, v)) = text("spool_max_bytes") {
            c.spool_max_bytes = parse_size(&v).filter(|n| *n >= 4096).ok_or_else(|| {
                invalid(&origin, &v, "spool_max_bytes must be a size of at least 4096 bytes (e.g. 268435456, 256MiB, 1G)")
            })?;
        }
        if let Some((origin, v)) = text("sdk_conventions") {
            c.sdk_conventions = Conventions::parse(&v)
                .ok_or_else(|| invalid(&origin, &v, "sdk_conventions must be 1.0 or 2.0"))?;
        }
        if let Some((origin, v)) = text("max_body_size") {
            c.max_body_size = Some(
                v.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        invalid(
                            &origin,
                            &v,
                            "max_body_size must be a positive whole number of characters",
                        )
                    })?,
            );
        }
        if let Some((origin, v)) = text("spool_max_events") {
            c.spool_max_events =
                v.trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        invalid(
                            &origin,
                            &v,
                            "spool_max_events must be a positive whole number",
                        )
                    })?;
        }
        Ok(())
    }

    /// The signing identity (§1.3), at most one mode: OpenBox DID (`agent_did` and its
    /// key, `agent_private_key_file` or OPENBOX_AGENT_PRIVATE_KEY: both or neither), Okta
    /// AI agent (`okta_agent_private_key_file` or OPENBOX_OKTA_AGENT_PRIVATE_KEY, alone
    /// for bootstrap mode or with the whole explicit id set), or workload
    /// (`workload_private_key_file` or OPENBOX_WORKLOAD_PRIVATE_KEY). A bad DID or key
    /// stops the start.
    fn load_identity(&mut self, layer: &Layer) -> Result<(), ConfigError> {
        let did = match layer.get("agent_did") {
            Some((origin, Val::Text(d))) => Some((origin.clone(), d.trim().to_owned())),
            _ => None,
        };
        let key = key_text(layer, "agent_private_key", "the agent private key")?;
        let okta_key = key_text(
            layer,
            "okta_agent_private_key",
            "the Okta agent private key",
        )?;
        let workload_key = key_text(layer, "workload_private_key", "the workload private key")?;
        let okta_ids: Vec<(&str, Origin, String)> = OKTA_IDS
            .iter()
            .filter_map(|name| match layer.get(name) {
                Some((origin, Val::Text(v))) if !v.trim().is_empty() => {
                    Some((*name, origin.clone(), v.trim().to_owned()))
                }
                _ => None,
            })
            .collect();
        if let Some((origin, Val::Text(alg))) = layer.get("okta_agent_algorithm") {
            if alg.trim() != "RS256" {
                return Err(invalid(
                    origin,
                    alg,
                    "okta_agent_algorithm must be RS256 (the only algorithm of SDK 2.0's Okta identity)",
                ));
            }
        }
        let modes: Vec<&str> = [
            (did.is_some() || key.is_some())
                .then_some("OpenBox DID (agent_did, agent_private_key)"),
            (okta_key.is_some() || !okta_ids.is_empty())
                .then_some("Okta AI agent (okta_agent_private_key and the Okta ids)"),
            workload_key
                .is_some()
                .then_some("workload (workload_private_key)"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if modes.len() > 1 {
            return Err(ConfigError::Invalid(format!(
                "more than one identity is configured ({}): SDK 2.0 allows one; keep the settings of one mode",
                modes.join("; ")
            )));
        }
        if let Some((origin, pem)) = workload_key {
            let key = RsaKey::from_pem(&pem, "workload_private_key")
                .map_err(|rule| invalid(&origin, "(key not shown)", rule))?;
            self.identity = Some(Arc::new(Identity::Workload { key }));
            return Ok(());
        }
        if okta_key.is_some() || !okta_ids.is_empty() {
            let Some((origin, pem)) = okta_key else {
                let (_, origin, v) = &okta_ids[0];
                return Err(invalid(
                    origin,
                    v,
                    "the Okta identity needs its key: set OPENBOX_OKTA_AGENT_PRIVATE_KEY_FILE (or \
                     --okta-agent-private-key-file, governance.okta_agent_private_key_file) to a file \
                     holding the PKCS8 PEM RSA key",
                ));
            };
            if !okta_ids.is_empty() && okta_ids.len() < OKTA_IDS.len() {
                let missing: Vec<&str> = OKTA_IDS
                    .iter()
                    .filter(|n| !okta_ids.iter().any(|(m, _, _)| m == *n))
                    .copied()
                    .collect();
                let (_, origin, v) = &okta_ids[0];
                return Err(invalid(
                    origin,
                    v,
                    format!(
                        "partial Okta identity: {} missing; give only the key for bootstrap mode \
                         (Core names the ids), or the complete explicit set ({})",
                        missing.join(", "),
                        OKTA_IDS.join(", ")
                    ),
                ));
            }
            let key = RsaKey::from_pem(&pem, "okta_agent_private_key")
                .map_err(|rule| invalid(&origin, "(key not shown)", rule))?;
            let id = |name: &str| {
                okta_ids
                    .iter()
                    .find(|(n, _, _)| *n == name)
                    .map(|(_, _, v)| v.clone())
                    .unwrap_or_default()
            };
            let ids = (!okta_ids.is_empty()).then(|| OktaIds {
                openbox_agent_id: id("openbox_agent_id"),
                organization_id: id("organization_id"),
                deployment_id: id("deployment_id"),
                okta_agent_id: id("okta_agent_id"),
                key_id: id("okta_agent_key_id"),
                audience: id("agent_proof_audience"),
            });
            self.identity = Some(Arc::new(Identity::Okta { key, ids }));
            return Ok(());
        }
        self.identity = match (did, key) {
            (None, None) => None,
            (Some((origin, did)), None) => {
                return Err(invalid(
                    &origin,
                    &did,
                    "agent_did needs its key: set OPENBOX_AGENT_PRIVATE_KEY_FILE (or --agent-private-key-file, \
                     governance.agent_private_key_file) to a file holding the base64 Ed25519 seed",
                ))
            }
            (None, Some((origin, _))) => {
                return Err(invalid(
                    &origin,
                    "(key not shown)",
                    "an agent private key is set without agent_did: set OPENBOX_AGENT_DID (or --agent-did, \
                     governance.agent_did) to the DID it belongs to",
                ))
            }
            (Some((origin, did)), Some((_, key))) => Some(Arc::new(Identity::Did(
                DidSigner::new(&did, &key).map_err(|rule| invalid(&origin, &did, rule))?,
            ))),
        };
        Ok(())
    }

    /// These settings with a worker's own (the `create_openbox_worker` parameters its hook
    /// sent in `hello`) laid over them; `None` when it sent none. A Core URL configured on
    /// the agent wins over the worker's (a different one is reported and ignored); a
    /// worker's own Core gets a spool directory of its own.
    pub fn with_worker_settings(
        &self,
        settings: &serde_json::Value,
    ) -> Result<Option<GovernanceConfig>, ConfigError> {
        let mut layer = Layer::from_worker(settings)?;
        if layer.values.is_empty() {
            return Ok(None);
        }
        let mut cfg = self.clone();
        let url = layer.take("openbox_url");
        let key = layer.take("openbox_api_key");
        cfg.apply(&layer)?;
        if let Some(Val::Text(url)) = url {
            let theirs = normalize_url(&url)
                .map_err(|rule| invalid(&Origin::Worker("openbox_url"), &url, rule))?;
            match (&self.openbox_url, theirs) {
                (Some(mine), Some(theirs)) if *mine != theirs => tracing::warn!(
                    agent = %mine, worker = %theirs,
                    "a worker asked for another OpenBox Core URL; the agent's configured one is used"
                ),
                (None, Some(theirs)) if !self.allows_worker_core(&theirs) => {
                    return Err(invalid(
                        &Origin::Worker("openbox_url"),
                        &theirs,
                        "a worker may not choose where the agent sends its requests: the agent has no Core URL and this one matches no --allow-worker-core-url prefix (an operator setting)",
                    ));
                }
                (None, Some(theirs)) => {
                    // Each Core has a spool of its own (a spool directory is locked by one user).
                    cfg.spool_dir = self.spool_dir.join(format!("core-{:016x}", fnv1a(&theirs)));
                    cfg.openbox_url = Some(theirs);
                    cfg.openbox_api_key = match key {
                        Some(Val::Text(k)) => Some(k),
                        _ => None,
                    };
                }
                _ => {}
            }
        }
        if cfg.spool_dir == self.spool_dir {
            // Governed with the agent's Core but other settings: a governor of its own,
            // which cannot share the agent's spool (one user locks a spool directory), so
            // one per distinct settings (the same settings come back to the same spool).
            cfg.spool_dir = self
                .spool_dir
                .join(format!("worker-{:016x}", fnv1a(&settings.to_string())));
        }
        Ok(Some(cfg))
    }

    /// The failure policy a worker's own settings ask for (`governance_policy`), else the
    /// agent's: what the worker's activities follow when the agent refuses its settings.
    pub fn worker_fail_policy(&self, settings: &serde_json::Value) -> FailPolicy {
        let policy = settings
            .get("governance_policy")
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        let Ok(layer) = Layer::from_worker(&serde_json::json!({ "governance_policy": policy }))
        else {
            return self.on_api_error;
        };
        let mut cfg = self.clone();
        match cfg.apply(&layer) {
            Ok(()) => cfg.on_api_error,
            Err(_) => self.on_api_error,
        }
    }

    /// Whether a worker may have the agent talk to this Core: it starts with a prefix the
    /// operator allowed, and the next character ends a path segment (an allowed
    /// `https://core.example` must not let `https://core.example.evil` through).
    fn allows_worker_core(&self, url: &str) -> bool {
        self.allow_worker_core_urls.iter().any(|prefix| {
            let prefix = prefix.trim_end_matches('/');
            url.strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
    }

    /// True when events go to OpenBox Core (a URL is set), false for the embedded default.
    pub fn uses_core(&self) -> bool {
        self.openbox_url.is_some()
    }
}

/// SDK 1.0's key pattern `^obx_(live|test)_[a-zA-Z0-9_]+$` (a mismatch is only a warning).
pub fn api_key_format_ok(key: &str) -> bool {
    let rest = key
        .strip_prefix("obx_live_")
        .or_else(|| key.strip_prefix("obx_test_"));
    rest.is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
}

/// Validates a Core base URL and strips trailing `/`. `Ok(None)` for an empty value
/// (explicitly no Core). Plain http is allowed only for localhost, 127.0.0.1 and ::1.
pub fn normalize_url(raw: &str) -> Result<Option<String>, String> {
    let trimmed = raw.trim().trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok(None);
    }
    let url = reqwest::Url::parse(trimmed).map_err(|e| {
        format!("openbox_url must be an http(s) URL such as https://core.example.com ({e})")
    })?;
    let host = url.host_str().unwrap_or("");
    if host.is_empty() {
        return Err("openbox_url must name a host, e.g. https://core.example.com".to_owned());
    }
    match url.scheme() {
        "https" => {}
        "http" if matches!(host, "localhost" | "127.0.0.1" | "[::1]") => {}
        "http" => {
            return Err(
                "openbox_url must use https:// (plain http:// is allowed only for localhost, 127.0.0.1 and ::1)"
                    .to_owned(),
            )
        }
        other => return Err(format!("openbox_url must use https:// (not {other}://)")),
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("openbox_url must not have a query or fragment".to_owned());
    }
    Ok(Some(trimmed.to_owned()))
}

/// `268435456`, `256MiB`, `256M`, `1G`, `64k` (binary multiples).
fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// A key given as text (`name`, from the environment) or in a file (`name_file`), with
/// where it came from; `what` names it in errors.
fn key_text(
    layer: &Layer,
    name: &str,
    what: &str,
) -> Result<Option<(Origin, String)>, ConfigError> {
    let file = format!("{name}_file");
    match (layer.get(name), layer.get(&file)) {
        (Some((origin, Val::Text(k))), _) => Ok(Some((origin.clone(), k.clone()))),
        (_, Some((origin, Val::Path(p)))) => read_key(origin, p, what).map(Some),
        (_, Some((origin, Val::Text(p)))) => read_key(origin, Path::new(p), what).map(Some),
        _ => Ok(None),
    }
}

fn read_key(origin: &Origin, path: &Path, what: &str) -> Result<(Origin, String), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::Invalid(format!(
            "{}: cannot read {what} file: {e}",
            origin.label(&path.display().to_string())
        ))
    })?;
    Ok((origin.clone(), text))
}

/// FNV-1a: a stable name for a spool directory derived from text.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::{json, Value};

    use super::*;
    use crate::governance::testutil::TempDir;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn write_file(text: &str) -> (TempDir, PathBuf) {
        let dir = TempDir::new("cfg");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    const DID: &str = "did:aip:0f8e2c1a-6b7d-4e3f-9a21-5c4d3b2a1f00";
    /// base64 of 32 bytes of 7.
    const SEED: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";

    #[test]
    fn sdk_conventions_and_max_body_size_come_from_flags_env_or_file() {
        let load = |flags: &RawSettings, file: Option<&str>, e: &[(&str, &str)]| {
            let f = file.map(write_file);
            GovernanceConfig::load_with_env(flags, f.as_ref().map(|(_, p)| p.as_path()), &env(e))
        };
        let c = load(&RawSettings::default(), None, &[]).unwrap();
        assert_eq!(
            (c.sdk_conventions, c.max_body_size),
            (Conventions::V1, None)
        );
        let c = load(
            &RawSettings::default(),
            Some("[governance]\nsdk_conventions = \"2.0\"\nmax_body_size = 100\n"),
            &[],
        )
        .unwrap();
        assert_eq!(
            (c.sdk_conventions, c.max_body_size),
            (Conventions::V2, Some(100))
        );
        let c = load(
            &RawSettings::default(),
            None,
            &[("OPENBOX_SDK_CONVENTIONS", "2.0")],
        )
        .unwrap();
        assert_eq!(c.sdk_conventions, Conventions::V2);
        let flags = RawSettings {
            sdk_conventions: Some("1.0".into()),
            ..RawSettings::default()
        };
        let c = load(&flags, None, &[("OPENBOX_SDK_CONVENTIONS", "2.0")]).unwrap();
        assert_eq!(c.sdk_conventions, Conventions::V1, "the flag wins");
        let e = load(
            &RawSettings::default(),
            None,
            &[("OPENBOX_SDK_CONVENTIONS", "3")],
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "OPENBOX_SDK_CONVENTIONS=3: sdk_conventions must be 1.0 or 2.0"
        );
        let e = load(
            &RawSettings::default(),
            Some("[governance]\nmax_body_size = 0\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("max_body_size must be a positive whole number"),
            "{e}"
        );
    }

    #[test]
    fn the_signing_identity_comes_from_the_operator_and_bad_keys_stop_the_start() {
        let load = |flags: &RawSettings, e: &[(&str, &str)]| {
            GovernanceConfig::load_with_env(flags, None, &env(e))
        };
        let c = load(
            &RawSettings::default(),
            &[
                ("OPENBOX_AGENT_DID", DID),
                ("OPENBOX_AGENT_PRIVATE_KEY", SEED),
            ],
        )
        .unwrap();
        assert_eq!(c.identity.as_ref().and_then(|s| s.did()), Some(DID));

        let dir = TempDir::new("key");
        let key_file = dir.path().join("agent-key.b64");
        std::fs::write(&key_file, format!("{SEED}\n")).unwrap();
        let flags = RawSettings {
            agent_did: Some(DID.into()),
            agent_private_key_file: Some(key_file.clone()),
            ..RawSettings::default()
        };
        let from_file = load(&flags, &[]).unwrap();
        assert_eq!(from_file.identity, c.identity, "the same key from a file");

        let missing = RawSettings {
            agent_did: Some(DID.into()),
            agent_private_key_file: Some(dir.path().join("nope")),
            ..RawSettings::default()
        };
        let e = load(&missing, &[]).unwrap_err().to_string();
        assert!(e.contains("cannot read the agent private key file"), "{e}");
        // Identity settings (as environment variables) that stop the start, and what the
        // error says; it never shows the key.
        let refused: [(&[(&str, &str)], &str); 7] = [
            (&[("OPENBOX_AGENT_DID", DID)], "agent_did needs its key"),
            (&[("OPENBOX_AGENT_PRIVATE_KEY", SEED)], "without agent_did"),
            (
                &[
                    ("OPENBOX_AGENT_DID", DID),
                    ("OPENBOX_AGENT_PRIVATE_KEY", "AAAA"),
                ],
                "not 3 bytes",
            ),
            (
                &[
                    ("OPENBOX_AGENT_DID", "did:web:x"),
                    ("OPENBOX_AGENT_PRIVATE_KEY", SEED),
                ],
                "OPENBOX_AGENT_DID=did:web:x: agent_did must look like did:aip:<uuid>",
            ),
            (
                &[("OPENBOX_OKTA_AGENT_PRIVATE_KEY", "x")],
                "OPENBOX_OKTA_AGENT_PRIVATE_KEY=(key not shown): okta_agent_private_key is not a PKCS8 PEM",
            ),
            (
                &[
                    ("OPENBOX_OKTA_AGENT_PRIVATE_KEY", "x"),
                    ("OPENBOX_OKTA_AGENT_ID", "wlp1"),
                ],
                "partial Okta identity: openbox_agent_id, organization_id",
            ),
            (
                &[
                    ("OPENBOX_AGENT_DID", DID),
                    ("OPENBOX_WORKLOAD_PRIVATE_KEY", "x"),
                ],
                "more than one identity is configured",
            ),
        ];
        for (vars, says) in refused {
            let e = load(&RawSettings::default(), vars).unwrap_err().to_string();
            assert!(e.contains(says) && !e.contains(SEED), "{vars:?}: {e}");
        }
        // A worker cannot bring an identity: its settings never set the signer.
        let worker = c
            .with_worker_settings(
                &json!({"agent_did": "did:aip:11111111-1111-1111-1111-111111111111",
                "agent_private_key": SEED, "governance_policy": "fail_closed"}),
            )
            .unwrap()
            .unwrap();
        assert_eq!(worker.identity, c.identity);
    }

    #[test]
    fn defaults_match_sdk_1_0_and_run_embedded() {
        let c = GovernanceConfig::load_with_env(&RawSettings::default(), None, &env(&[])).unwrap();
        assert_eq!(c.on_api_error, FailPolicy::FailOpen);
        assert_eq!(c.governance_timeout, Duration::from_secs(30));
        assert!(c.send_start_event && c.send_activity_start_event && c.hitl_enabled);
        assert_eq!(
            c.skip_activity_types,
            BTreeSet::from(["send_governance_event".to_owned()])
        );
        assert_eq!(
            c.skip_hitl_activity_types,
            BTreeSet::from(["send_governance_event".to_owned()])
        );
        assert!(c.skip_workflow_types.is_empty() && c.skip_signals.is_empty());
        assert!(!c.uses_core());
        assert_eq!(c.events_sink, Some(SinkTarget::Stdout));
    }

    #[test]
    fn flags_beat_environment_beat_file_beat_defaults() {
        let (_d, path) = write_file(
            r#"
[capture]
something_else = 1
[governance]
openbox_url = "https://file.example.com/"
openbox_api_key = "obx_test_file"
api_timeout = 5
on_api_error = "fail_closed"
skip_signals = ["noisy"]
hitl_enabled = false
spool_max_bytes = "1MiB"
spool_max_events = 10
policy_file = "policy.toml"
"#,
        );
        let e = env(&[
            ("OPENBOX_URL", "https://env.example.com"),
            ("OPENBOX_GOVERNANCE_TIMEOUT", "7.5"),
        ]);
        let flags = RawSettings {
            openbox_url: Some("https://flag.example.com//".into()),
            ..Default::default()
        };
        let c = GovernanceConfig::load_with_env(&flags, Some(&path), &e).unwrap();
        assert_eq!(c.openbox_url.as_deref(), Some("https://flag.example.com"));
        assert_eq!(c.governance_timeout, Duration::from_millis(7500));
        assert_eq!(c.openbox_api_key.as_deref(), Some("obx_test_file"));
        assert_eq!(c.on_api_error, FailPolicy::FailClosed);
        assert_eq!(c.skip_signals, BTreeSet::from(["noisy".to_owned()]));
        assert!(!c.hitl_enabled);
        assert_eq!(c.spool_max_bytes, 1 << 20);
        assert_eq!(c.spool_max_events, 10);
        assert_eq!(
            c.policy_file,
            Some(path.parent().unwrap().join("policy.toml"))
        );
        assert_eq!(c.events_sink, None, "no sink by default with a Core URL");
        assert!(c.warnings.is_empty());

        let c = GovernanceConfig::load_with_env(&RawSettings::default(), Some(&path), &env(&[]))
            .unwrap();
        assert_eq!(c.openbox_url.as_deref(), Some("https://file.example.com"));
        assert_eq!(c.governance_timeout, Duration::from_secs(5));
    }

    #[test]
    fn bad_values_name_their_origin_setting_and_what_is_allowed() {
        let e = env(&[("OPENBOX_GOVERNANCE_TIMEOUT", "abc")]);
        let err = GovernanceConfig::load_with_env(&RawSettings::default(), None, &e)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "OPENBOX_GOVERNANCE_TIMEOUT=abc: governance_timeout must be a positive number of seconds (at most 86400)");
        for bad in ["0", "-1", "nan", "inf"] {
            let e = env(&[("OPENBOX_GOVERNANCE_TIMEOUT", bad)]);
            assert!(
                GovernanceConfig::load_with_env(&RawSettings::default(), None, &e).is_err(),
                "{bad}"
            );
        }
        let e = env(&[("OPENBOX_GOVERNANCE_POLICY", "maybe")]);
        let err = GovernanceConfig::load_with_env(&RawSettings::default(), None, &e)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "OPENBOX_GOVERNANCE_POLICY=maybe: governance_policy must be fail_open or fail_closed"
        );
        let flags = RawSettings {
            governance_timeout: Some("x".into()),
            ..Default::default()
        };
        let err = GovernanceConfig::load_with_env(&flags, None, &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("--governance-timeout x: governance_timeout must be"),
            "{err}"
        );
        let flags = RawSettings {
            spool_max_events: Some("0".into()),
            ..Default::default()
        };
        let err = GovernanceConfig::load_with_env(&flags, None, &env(&[]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "--spool-max-events 0: spool_max_events must be a positive whole number"
        );
        let flags = RawSettings {
            spool_max_bytes: Some("12 parsecs".into()),
            ..Default::default()
        };
        assert!(GovernanceConfig::load_with_env(&flags, None, &env(&[]))
            .unwrap_err()
            .to_string()
            .contains("spool_max_bytes must be"));
    }

    #[test]
    fn file_errors_name_the_file_and_key() {
        let (_d, path) = write_file("[governance]\ngovernance_timeout = \"soon\"\n");
        let err = GovernanceConfig::load_with_env(&RawSettings::default(), Some(&path), &env(&[]))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: governance.governance_timeout = \"soon\": governance_timeout must be a positive number of seconds (at most 86400)",
                path.display()
            )
        );
        let (_d, path) = write_file("[governance]\ntimeout = 3\n");
        let err = GovernanceConfig::load_with_env(&RawSettings::default(), Some(&path), &env(&[]))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("unknown setting governance.timeout; allowed: openbox_url"),
            "{err}"
        );
        let (_d, path) = write_file("[governance]\nhitl_enabled = \"yes\"\n");
        let err = GovernanceConfig::load_with_env(&RawSettings::default(), Some(&path), &env(&[]))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("governance.hitl_enabled must be true or false"),
            "{err}"
        );
        let (_d, path) = write_file("[governance\n");
        let err = GovernanceConfig::load_with_env(&RawSettings::default(), Some(&path), &env(&[]))
            .unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        let (_d, path) = write_file("[governance]\napi_timeout = 1\ngovernance_timeout = 2\n");
        assert!(
            GovernanceConfig::load_with_env(&RawSettings::default(), Some(&path), &env(&[]))
                .is_err()
        );
        let missing = Path::new("/nonexistent/agent.toml");
        let err =
            GovernanceConfig::load_with_env(&RawSettings::default(), Some(missing), &env(&[]))
                .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read config file /nonexistent/agent.toml"),
            "{err}"
        );
    }

    #[test]
    fn url_rules_http_only_for_loopback_and_trailing_slash_stripped() {
        assert_eq!(
            normalize_url("https://core.example.com/")
                .unwrap()
                .as_deref(),
            Some("https://core.example.com")
        );
        assert_eq!(
            normalize_url("http://localhost:8086").unwrap().as_deref(),
            Some("http://localhost:8086")
        );
        assert_eq!(
            normalize_url("http://127.0.0.1:9/base//")
                .unwrap()
                .as_deref(),
            Some("http://127.0.0.1:9/base")
        );
        assert_eq!(
            normalize_url("http://[::1]:9").unwrap().as_deref(),
            Some("http://[::1]:9")
        );
        assert_eq!(normalize_url("").unwrap(), None);
        let e = env(&[
            ("OPENBOX_URL", "http://core.example.com"),
            ("OPENBOX_API_KEY", "obx_live_x"),
        ]);
        let err = GovernanceConfig::load_with_env(&RawSettings::default(), None, &e)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "OPENBOX_URL=http://core.example.com: openbox_url must use https:// (plain http:// is allowed only for localhost, 127.0.0.1 and ::1)"
        );
        assert!(normalize_url("ftp://x").is_err());
        assert!(normalize_url("core.example.com").is_err());
        assert!(normalize_url("https://core.example.com/?a=1").is_err());
    }

    #[test]
    fn api_key_format_mismatch_is_a_warning_and_a_missing_key_an_error() {
        assert!(api_key_format_ok("obx_live_abc_123"));
        assert!(api_key_format_ok("obx_test_X"));
        assert!(!api_key_format_ok("obx_prod_abc"));
        assert!(!api_key_format_ok("obx_live_"));
        assert!(!api_key_format_ok("obx_live_a-b"));
        let e = env(&[
            ("OPENBOX_URL", "https://c.example"),
            ("OPENBOX_API_KEY", "sk-123"),
        ]);
        let c = GovernanceConfig::load_with_env(&RawSettings::default(), None, &e).unwrap();
        assert_eq!(c.warnings.len(), 1);
        assert!(c.warnings[0].contains("obx_live_"));
        let e = env(&[("OPENBOX_URL", "https://c.example")]);
        let err = GovernanceConfig::load_with_env(&RawSettings::default(), None, &e)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no API key is set: set OPENBOX_API_KEY"),
            "{err}"
        );
    }

    #[test]
    fn lists_replace_defaults_and_sink_accepts_stdout_off_and_paths() {
        let flags = RawSettings {
            skip_activity_types: Some(vec!["a".into(), "send_governance_event".into()]),
            events_sink: Some("off".into()),
            ..Default::default()
        };
        let c = GovernanceConfig::load_with_env(&flags, None, &env(&[])).unwrap();
        assert_eq!(c.skip_activity_types.len(), 2);
        assert_eq!(c.events_sink, None);
        let flags = RawSettings {
            events_sink: Some("/tmp/ev.jsonl".into()),
            ..Default::default()
        };
        let c = GovernanceConfig::load_with_env(&flags, None, &env(&[])).unwrap();
        assert_eq!(
            c.events_sink,
            Some(SinkTarget::File("/tmp/ev.jsonl".into()))
        );
        let flags = RawSettings {
            skip_signals: Some(vec!["".into()]),
            ..Default::default()
        };
        assert!(GovernanceConfig::load_with_env(&flags, None, &env(&[])).is_err());
    }

    #[test]
    fn the_documented_example_config_parses() {
        let path = Path::new("/etc/openbox-agent/agent.toml");
        let c = GovernanceConfig::from_toml_str(include_str!("example-config.toml"), path).unwrap();
        assert_eq!(c.openbox_url.as_deref(), Some("https://core.openbox.ai"));
        assert_eq!(
            c.policy_file,
            Some(PathBuf::from("/etc/openbox-agent/policy.toml"))
        );
        assert_eq!(c.spool_max_bytes, 256 << 20);
        assert_eq!(c.events_sink, Some(SinkTarget::Stdout));
        assert_eq!(
            c.warnings.len(),
            1,
            "the placeholder key does not have the SDK's format"
        );
    }

    #[test]
    fn a_bare_hook_keeps_the_agents_settings() {
        let base = GovernanceConfig::default();
        assert!(base.with_worker_settings(&json!({})).unwrap().is_none());
        assert!(base.with_worker_settings(&Value::Null).unwrap().is_none());
    }

    #[test]
    fn a_workers_sdk_parameters_lay_over_the_agents_settings() {
        let base = GovernanceConfig {
            allow_worker_core_urls: vec!["http://localhost:8086".into()],
            ..Default::default()
        };
        let cfg = base
            .with_worker_settings(
                &json!({"openbox_url": "http://localhost:8086/", "openbox_api_key": "obx_test_k",
                "governance_timeout": 2.5, "governance_policy": "fail_closed",
                "skip_activity_types": ["a", "b"], "send_start_event": false}),
            )
            .unwrap()
            .unwrap();
        assert_eq!(cfg.openbox_url.as_deref(), Some("http://localhost:8086"));
        assert_eq!(cfg.openbox_api_key.as_deref(), Some("obx_test_k"));
        assert_eq!(cfg.governance_timeout, Duration::from_millis(2500));
        assert_eq!(cfg.on_api_error, FailPolicy::FailClosed);
        assert!(!cfg.send_start_event);
        assert_eq!(cfg.skip_activity_types.len(), 2);
        assert_ne!(cfg.spool_dir, base.spool_dir);
    }

    #[test]
    fn the_agents_core_url_wins_and_bad_values_are_named() {
        let base = GovernanceConfig {
            openbox_url: Some("https://core.example.com".into()),
            ..Default::default()
        };
        let cfg = base
            .with_worker_settings(&json!({"openbox_url": "https://other.example.com"}))
            .unwrap()
            .unwrap();
        assert_eq!(cfg.openbox_url.as_deref(), Some("https://core.example.com"));
        // Governed apart from the agent's own governor, which holds the agent's spool: a
        // spool of its own, the same for the same settings.
        assert_ne!(cfg.spool_dir, base.spool_dir);
        assert!(cfg.spool_dir.starts_with(&base.spool_dir));
        let hitl = |on: bool| {
            base.with_worker_settings(&json!({"hitl_enabled": on}))
                .unwrap()
                .unwrap()
                .spool_dir
        };
        assert_eq!(hitl(false), hitl(false));
        assert_ne!(hitl(false), hitl(true));
        assert_ne!(hitl(false), cfg.spool_dir);
        let err = base
            .with_worker_settings(&json!({"governance_policy": "sometimes"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("governance_policy"), "{err}");
        let err = base
            .with_worker_settings(&json!({"governance_timeout": -1}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("governance_timeout"), "{err}");
        let err = base
            .with_worker_settings(&json!({"openbox_url": "http://core.example.com"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("https"), "{err}");
    }

    #[test]
    fn a_worker_may_not_choose_a_core_the_operator_did_not_allow() {
        let settings =
            json!({"openbox_url": "http://127.0.0.1:9/", "openbox_api_key": "obx_test_k"});
        let err = GovernanceConfig::default()
            .with_worker_settings(&settings)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--allow-worker-core-url"), "{err}");
        assert!(err.contains("127.0.0.1:9"), "{err}");
        let allowing = |prefix: &str| GovernanceConfig {
            allow_worker_core_urls: vec![prefix.into()],
            ..Default::default()
        };
        let cfg = allowing("http://127.0.0.1:9/")
            .with_worker_settings(&settings)
            .unwrap()
            .unwrap();
        assert_eq!(cfg.openbox_url.as_deref(), Some("http://127.0.0.1:9"));
        // A prefix is matched up to a path segment: no look-alike host gets through.
        let evil = json!({"openbox_url": "https://core.example.com.evil.net"});
        assert!(allowing("https://core.example.com")
            .with_worker_settings(&evil)
            .is_err());
        let path = json!({"openbox_url": "https://core.example.com/tenant-a"});
        assert!(allowing("https://core.example.com")
            .with_worker_settings(&path)
            .is_ok());
        // Other settings of the worker need no allow-list.
        assert!(GovernanceConfig::default()
            .with_worker_settings(&json!({"governance_policy": "fail_closed"}))
            .unwrap()
            .is_some());
    }

    #[test]
    fn a_refused_worker_follows_its_own_failure_policy_else_the_agents() {
        let agent = GovernanceConfig::default();
        assert_eq!(agent.on_api_error, FailPolicy::FailOpen);
        let closed =
            json!({"openbox_url": "http://127.0.0.1:9", "governance_policy": "fail_closed"});
        assert_eq!(agent.worker_fail_policy(&closed), FailPolicy::FailClosed);
        let open = json!({"openbox_url": "http://127.0.0.1:9", "governance_policy": "fail_open"});
        let strict = GovernanceConfig {
            on_api_error: FailPolicy::FailClosed,
            ..Default::default()
        };
        assert_eq!(strict.worker_fail_policy(&open), FailPolicy::FailOpen);
        // Not given, or not a policy: the agent's.
        let neither = json!({"openbox_url": "http://127.0.0.1:9"});
        assert_eq!(strict.worker_fail_policy(&neither), FailPolicy::FailClosed);
        let bad = json!({"governance_policy": "maybe"});
        assert_eq!(strict.worker_fail_policy(&bad), FailPolicy::FailClosed);
        assert_eq!(agent.worker_fail_policy(&json!(null)), FailPolicy::FailOpen);
    }
}
