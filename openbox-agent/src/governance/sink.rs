//! JSON-lines sink: every governance event, one compact JSON object per line (the exact
//! bytes sent to Core, see `events::encode`), flushed after each line. A file is opened
//! for appending (created if missing); `-` is stdout.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    path::Path,
    sync::Mutex,
};

use serde_json::Value;

use super::{config::SinkTarget, events};

pub struct Sink {
    out: Mutex<Box<dyn Write + Send>>,
    name: String,
}

impl Sink {
    pub fn open(target: &SinkTarget) -> io::Result<Sink> {
        match target {
            SinkTarget::Stdout => Ok(Sink {
                out: Mutex::new(Box::new(io::stdout())),
                name: "stdout".into(),
            }),
            SinkTarget::File(path) => Self::open_file(path),
        }
    }

    fn open_file(path: &Path) -> io::Result<Sink> {
        let file: File = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot open events sink {} for appending: {e}",
                        path.display()
                    ),
                )
            })?;
        Ok(Sink {
            out: Mutex::new(Box::new(file)),
            name: path.display().to_string(),
        })
    }

    /// A sink writing into any writer (tests, or a daemon that owns its own output).
    pub fn from_writer(name: &str, w: Box<dyn Write + Send>) -> Sink {
        Sink {
            out: Mutex::new(w),
            name: name.to_owned(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Writes one event line. A write error is logged, not returned: losing the local copy
    /// of an event must not change what the activity is told.
    pub fn write(&self, event: &Value) {
        let mut line = events::encode(event);
        line.push(b'\n');
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        // One write_all of the whole line keeps lines whole in an O_APPEND file shared
        // with other writers.
        if let Err(e) = out.write_all(&line).and_then(|()| out.flush()) {
            tracing::error!(sink = %self.name, error = %e, "cannot write governance event to the events sink");
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::governance::testutil::TempDir;

    #[test]
    fn events_are_appended_one_compact_line_each() {
        let dir = TempDir::new("sink");
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "{\"earlier\":true}\n").unwrap();
        let sink = Sink::open(&SinkTarget::File(path.clone())).unwrap();
        sink.write(
            &json!({"event_type": "WorkflowStarted", "source": "workflow-telemetry", "x": "a\nb"}),
        );
        sink.write(&json!({"event_type": "SignalReceived"}));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[1],
            r#"{"source":"workflow-telemetry","event_type":"WorkflowStarted","x":"a\nb"}"#
        );
        assert_eq!(lines[2], r#"{"event_type":"SignalReceived"}"#);
    }

    #[test]
    fn an_unwritable_sink_path_is_an_error_naming_it() {
        let err = Sink::open(&SinkTarget::File("/nonexistent-dir/e.jsonl".into()))
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .contains("cannot open events sink /nonexistent-dir/e.jsonl"),
            "{err}"
        );
    }
}
