//! JSON-lines sink: one compact JSON object per line, flushed after each line. A file is
//! opened for appending (created if missing); `-` is stdout. The governance events sink
//! writes every event as the exact bytes sent to Core (see `events::encode`); the daemon
//! writes its unattributed spans through one too.

use std::{
    fs::File,
    io::{self, Write},
    path::Path,
    sync::Mutex,
};

use serde::Serialize;

use super::config::SinkTarget;

const EVENTS: &str = "events sink";

pub struct Sink {
    out: Mutex<Box<dyn Write + Send>>,
    name: String,
    /// What the lines are, for messages (`events sink`, `unattributed spans file`).
    what: &'static str,
}

impl Sink {
    pub fn open(target: &SinkTarget) -> io::Result<Sink> {
        match target {
            SinkTarget::Stdout => Ok(Self::stdout(EVENTS)),
            SinkTarget::File(path) => Self::open_file(path, EVENTS),
        }
    }

    /// Lines of another kind (`what` names them in messages): into the file at `path`,
    /// or stdout for `-`.
    pub fn open_path(path: &Path, what: &'static str) -> io::Result<Sink> {
        if path.as_os_str() == "-" {
            Ok(Self::stdout(what))
        } else {
            Self::open_file(path, what)
        }
    }

    fn stdout(what: &'static str) -> Sink {
        Sink {
            out: Mutex::new(Box::new(io::stdout())),
            name: "stdout".into(),
            what,
        }
    }

    fn open_file(path: &Path, what: &'static str) -> io::Result<Sink> {
        let cannot = |e: io::Error| {
            io::Error::new(
                e.kind(),
                format!("cannot open {what} {} for appending: {e}", path.display()),
            )
        };
        let file: File = super::private::options()
            .create(true)
            .append(true)
            .open(path)
            .map_err(cannot)?;
        // Events and unattributed spans hold inputs, outputs and bodies: owner only.
        super::private::tighten(path, super::private::FILE_MODE).map_err(cannot)?;
        Ok(Sink {
            out: Mutex::new(Box::new(file)),
            name: path.display().to_string(),
            what,
        })
    }

    /// A sink writing into any writer (tests, or a daemon that owns its own output).
    pub fn from_writer(name: &str, w: Box<dyn Write + Send>) -> Sink {
        Sink {
            out: Mutex::new(w),
            name: name.to_owned(),
            what: EVENTS,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Writes one line of JSON (`json` holds no newline: compact JSON never does). A write
    /// error is logged, not returned: losing the local copy of an event must not change
    /// what the activity is told.
    pub fn write(&self, json: &[u8]) {
        let mut line = Vec::with_capacity(json.len() + 1);
        line.extend_from_slice(json);
        line.push(b'\n');
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        // One write_all of the whole line keeps lines whole in an O_APPEND file shared
        // with other writers.
        if let Err(e) = out.write_all(&line).and_then(|()| out.flush()) {
            tracing::error!(sink = %self.name, error = %e, "cannot write a line to the {}", self.what);
        }
    }

    /// Writes `value` as one line of compact JSON.
    pub fn write_value(&self, value: &impl Serialize) {
        match serde_json::to_vec(value) {
            Ok(json) => self.write(&json),
            Err(e) => {
                tracing::error!(sink = %self.name, error = %e, "cannot write a line to the {}", self.what)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use serde_json::json;

    use super::*;
    use crate::governance::{events, testutil::TempDir};

    #[test]
    fn an_events_file_is_created_private_and_an_earlier_one_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("sink-modes");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let fresh = dir.path().join("events.jsonl");
        // SAFETY: umask only changes this process's file creation mask.
        let old = unsafe { libc::umask(0o022) };
        Sink::open(&SinkTarget::File(fresh.clone())).unwrap();
        unsafe { libc::umask(old) };
        assert_eq!(mode(&fresh), 0o600);
        let earlier = dir.path().join("unattributed.jsonl");
        std::fs::write(&earlier, "{}\n").unwrap();
        std::fs::set_permissions(&earlier, std::fs::Permissions::from_mode(0o644)).unwrap();
        Sink::open_path(&earlier, "unattributed spans").unwrap();
        assert_eq!(mode(&earlier), 0o600);
        assert_eq!(std::fs::read_to_string(&earlier).unwrap(), "{}\n");
    }

    #[test]
    fn events_are_appended_one_compact_line_each() {
        let dir = TempDir::new("sink");
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "{\"earlier\":true}\n").unwrap();
        let sink = Sink::open(&SinkTarget::File(path.clone())).unwrap();
        let wf = events::WorkflowInfo {
            workflow_id: "w".into(),
            run_id: "r\n1".into(),
            workflow_type: "T".into(),
            task_queue: "q".into(),
            multi_agent_session_id: None,
        };
        sink.write(&events::encode(&events::workflow_started(&wf, UNIX_EPOCH)));
        sink.write_value(&json!({"reason": "no_activity"}));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[1],
            r#"{"source":"workflow-telemetry","event_type":"WorkflowStarted","workflow_id":"w","run_id":"r\n1","workflow_type":"T","task_queue":"q","timestamp":"1970-01-01T00:00:00.000Z"}"#
        );
        assert_eq!(lines[2], r#"{"reason":"no_activity"}"#);
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
