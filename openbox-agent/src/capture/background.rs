//! Start-up work done off the path to the first captured syscall.
//!
//! Measured on this project's 2-core VM (`strace -tt`, `OPENBOX_LOG=debug`): before the
//! programs load, aya's `EbpfLoader::new` parses the kernel's BTF (55–90 ms), which this
//! agent then discards (`.btf(None)`: its programs need no CO-RE relocations), and
//! aya has no constructor without that parse; fentry mode parses it again for its own
//! use. Then the verifier: the socket data-exit program was the longest (130–400 ms; 10–60
//! ms since its payload loop is branch-free), and the libssl return program next
//! (80–100 ms), although no libssl program is used before a watched process maps a
//! libssl. So:
//!
//! - [`load_object`] makes the loader and loads the object (its maps: ~45 ms more) on a
//!   thread of its own, while the caller does its checks and its own BTF parse;
//! - [`Programs`] lets the libssl programs be verified on a thread after start-up
//!   returns (the command runs meanwhile): the first TLS attach waits for them.

use std::{path::PathBuf, thread::JoinHandle};

use aya::{Ebpf, EbpfError, EbpfLoader};
use openbox_common::{
    GLOBAL_CAPTURE_LIMIT, GLOBAL_EXIT_SIGNAL_LIVE, GLOBAL_EXIT_TASK_SIGNAL, GLOBAL_PAUSE_ON_TLS_LIB,
};

use super::{
    btf::LiveThreads,
    load::{self, How},
};

/// What the kernel object is loaded with.
pub struct Object {
    pub capture_limit: u32,
    pub pause_on_tls_lib: u32,
    pub live: LiveThreads,
    pub ring_bytes: u32,
    /// Where the map of paused processes is pinned, if anywhere.
    pub pin: Option<PathBuf>,
}

/// Loads the kernel object (BTF parse, feature probes, maps; no program) on another
/// thread.
pub fn load_object(o: Object) -> JoinHandle<Result<Ebpf, EbpfError>> {
    std::thread::spawn(move || {
        let mut loader = EbpfLoader::new();
        loader
            .btf(None)
            .override_global(GLOBAL_CAPTURE_LIMIT, &o.capture_limit, true)
            .override_global(GLOBAL_PAUSE_ON_TLS_LIB, &o.pause_on_tls_lib, true)
            .override_global(GLOBAL_EXIT_TASK_SIGNAL, &o.live.task_signal, true)
            .override_global(GLOBAL_EXIT_SIGNAL_LIVE, &o.live.signal_live, true)
            .map_max_entries("EVENTS", o.ring_bytes);
        if let Some(pin) = &o.pin {
            loader.map_pin_path(super::pause::MAP, pin.clone());
        }
        loader.load(super::EBPF_OBJECT)
    })
}

/// The loaded object, or the thread still loading some of its programs.
pub struct Programs {
    state: State,
}

enum State {
    Ready(Ebpf),
    Loading(JoinHandle<Ebpf>),
    /// Given up at the end (see [`Programs::abandon`]).
    Gone,
}

impl Programs {
    /// `ebpf` with nothing left to load.
    pub fn ready(ebpf: Ebpf) -> Self {
        Programs {
            state: State::Ready(ebpf),
        }
    }

    /// Loads `later` on a thread; until [`Programs::get`] is called the caller goes on
    /// with the programs already attached. A program the kernel refuses is logged at
    /// error level (with what the refusal costs, `consequence`), and stays unloaded: its
    /// attach then fails and is counted where the caller counts such failures.
    pub fn load_later(
        mut ebpf: Ebpf,
        later: Vec<&'static str>,
        consequence: &'static str,
    ) -> anyhow::Result<Self> {
        let handle = std::thread::Builder::new()
            .name("load-later".into())
            .spawn(move || {
                let jobs: Vec<(&str, How<'_>)> = later.iter().map(|p| (*p, How::Plain)).collect();
                match load::load_all(&mut ebpf, &jobs) {
                    Ok(outcomes) => {
                        for o in outcomes {
                            if let Err(e) = o.result {
                                let e = load::rejected(o.program, e);
                                tracing::error!("{e:#}: {consequence}");
                            }
                        }
                    }
                    Err(e) => tracing::error!("{e:#}: {consequence}"),
                }
                ebpf
            })
            .map_err(|e| {
                anyhow::anyhow!("could not start a thread to load the kernel programs: {e}")
            })?;
        Ok(Programs {
            state: State::Loading(handle),
        })
    }

    /// The object, once every program is loaded (waits for the thread, if any); `None`
    /// after [`Programs::abandon`].
    pub fn get(&mut self) -> Option<&mut Ebpf> {
        if let State::Loading(_) = self.state {
            let State::Loading(handle) = std::mem::replace(&mut self.state, State::Gone) else {
                unreachable!()
            };
            let ebpf = handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            self.state = State::Ready(ebpf);
        }
        match &mut self.state {
            State::Ready(ebpf) => Some(ebpf),
            State::Loading(_) | State::Gone => None,
        }
    }

    /// At the end of capture, when nothing is watched any more: a thread still loading
    /// is not waited for, so a short command's `trace` returns at once. What it loaded
    /// is never dropped (closing its tracepoint links would detach them here, seconds,
    /// before `detach::hand_off` has a child holding them): the process exits next, and
    /// the kernel closes them then.
    pub fn abandon(&mut self) {
        if !matches!(self.state, State::Loading(_)) {
            return;
        }
        let State::Loading(handle) = std::mem::replace(&mut self.state, State::Gone) else {
            unreachable!("matched above")
        };
        if handle.is_finished() {
            if let Ok(ebpf) = handle.join() {
                self.state = State::Ready(ebpf);
            }
        } else {
            std::mem::forget(handle);
        }
    }
}

impl Drop for Programs {
    /// Waits for a thread still loading: the programs it holds are attached, and must
    /// be detached before whatever the caller drops next (see `Capture`'s field order).
    fn drop(&mut self) {
        if let State::Loading(handle) = std::mem::replace(&mut self.state, State::Gone) {
            drop(handle.join());
        }
    }
}
