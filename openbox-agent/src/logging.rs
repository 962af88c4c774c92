//! Logs on stderr, as readable text or one JSON object per line (`--log-format json`,
//! for log collectors), filtered by `OPENBOX_LOG` (default `warn`).

use std::sync::atomic::{AtomicBool, Ordering};

/// `--log-format` / `log_format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

static JSON: AtomicBool = AtomicBool::new(false);

/// Where the agent's own status lines go (`announce`): always shown, whatever the filter.
const STATUS_TARGET: &str = "openbox_agent::status";

pub fn init(format: LogFormat) {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("OPENBOX_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"))
    };
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_env_filter(filter())
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => {
            JSON.store(true, Ordering::Relaxed);
            let status = format!("{STATUS_TARGET}=info")
                .parse()
                .expect("a valid directive");
            builder
                .json()
                .with_current_span(false)
                .with_env_filter(filter().add_directive(status))
                .init()
        }
    }
}

pub fn is_json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// A status line the user always sees (where the agent listens): `openbox-agent: …` in
/// text mode; in JSON mode a log object, so every stderr line parses.
pub fn announce(msg: std::fmt::Arguments) {
    if is_json() {
        tracing::info!(target: STATUS_TARGET, "{msg}");
    } else {
        eprintln!("openbox-agent: {msg}");
    }
}
