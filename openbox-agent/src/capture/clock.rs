//! Kernel timestamps (CLOCK_MONOTONIC, what `bpf_ktime_get_ns` returns) and the
//! Unix-epoch times spans carry.

/// CLOCK_MONOTONIC (kernel timestamps) to Unix-epoch nanoseconds.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    offset: i128,
}

fn now(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

impl Clock {
    pub fn new() -> Self {
        Self {
            offset: now(libc::CLOCK_REALTIME) - now(libc::CLOCK_MONOTONIC),
        }
    }

    pub fn epoch_ns(&self, mono: u64) -> u64 {
        (mono as i128 + self.offset).max(0) as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// CLOCK_MONOTONIC now, in the kernel's timestamp units.
pub fn now_mono() -> u64 {
    now(libc::CLOCK_MONOTONIC) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_time_of_now_is_close_to_the_wall_clock() {
        let clock = Clock::new();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let ours = clock.epoch_ns(now_mono());
        assert!(ours.abs_diff(wall) < 1_000_000_000, "{ours} vs {wall}");
    }
}
