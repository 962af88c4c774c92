# The kernel-matrix steps, the same in a guest and on the host (`cargo xtask
# kernel-matrix` runs both): what the kernel offers, `openbox-agent check`, and per
# capture mode one `trace` of an HTTPS request (plaintext through the libssl uprobes)
# and a file write. Each result is a section of $KMX_OUT:
#   @@kmx begin NAME
#   ...
#   @@kmx end NAME rc=N
# Variables: KMX_OUT KMX_AGENT KMX_CERT_DIR KMX_WORK KMX_PORT KMX_MODES KMX_BPFTOOL,
# KMX_MMSG (guests only: tests/support/mmsg.c, built), and for the syscall-loop
# bench KMX_BENCH KMX_BENCH_ROUNDS KMX_BENCH_MODES.
set -u
out=$KMX_OUT
work=$KMX_WORK
mkdir -p "$work"

# section NAME CMD...: CMD's output and status as section NAME.
section() {
    name=$1
    shift
    echo "@@kmx begin $name" >>"$out"
    "$@" >>"$out" 2>&1
    rc=$?
    printf '\n@@kmx end %s rc=%s\n' "$name" "$rc" >>"$out"
    return $rc
}

section uname uname -r
section btf ls -l /sys/kernel/btf/vmlinux
section lsm cat /sys/kernel/security/lsm
section kprobes cat /sys/kernel/tracing/kprobe_events
section check "$KMX_AGENT" check --json
# The tracepoints whose records the kernel programs read at fixed offsets
# (openbox-agent/src/capture/tracefs.rs).
for tp in sched/sched_process_exit sched/sched_process_exec task/task_newtask \
    syscalls/sys_enter_write syscalls/sys_exit_write syscalls/sys_enter_openat \
    syscalls/sys_enter_socketpair syscalls/sys_enter_connect; do
    section "format $tp" cat "/sys/kernel/tracing/events/$tp/format"
done
if [ "$KMX_BPFTOOL" = 1 ]; then
    section bpftool bpftool feature probe kernel
fi
openssl s_server -accept "127.0.0.1:$KMX_PORT" -cert "$KMX_CERT_DIR/cert.pem" \
    -key "$KMX_CERT_DIR/key.pem" -www -quiet >"$work/server.log" 2>&1 &
server=$!
# Listening when /proc/net/tcp has the port in state 0A (LISTEN).
port_hex=$(printf '%04X' "$KMX_PORT")
tries=0
while ! grep -q ":$port_hex 00000000:0000 0A" /proc/net/tcp && [ $tries -lt 100 ]; do
    sleep 0.1
    tries=$((tries + 1))
done
section server-listening grep ":$port_hex 00000000:0000 0A" /proc/net/tcp

for mode in $(echo "$KMX_MODES" | tr , ' '); do
    flag=""
    [ "$mode" = default ] || flag="--capture-mode $mode"
    # One request and one written file per mode, named after the mode, so each run's
    # spans are told apart. `busybox tee` writes with write(2) on the file's own
    # descriptor (a shell redirection would write through a dup'ed stdout).
    client="curl -sk https://127.0.0.1:$KMX_PORT/kmatrix-$mode -o /dev/null; \
echo kmatrix-$mode | busybox tee $work/file-$mode.txt >/dev/null"
    # SIGINT first: the agent detaches and prints its summary.
    # shellcheck disable=SC2086
    timeout -s INT 120 "$KMX_AGENT" trace --json $flag -- sh -c "$client" \
        >"$work/spans-$mode" 2>"$work/stderr-$mode"
    rc=$?
    section "spans $mode" cat "$work/spans-$mode"
    section "stderr $mode" cat "$work/stderr-$mode"
    section "trace $mode" echo "$rc"
    # sendmmsg/recvmmsg batches (KMX_MMSG; guests only, where fentry mode runs), as
    # records: each message is a data record of its own; past the 16 copied per call,
    # only their length.
    if [ -n "${KMX_MMSG:-}" ]; then
        mkdir -p "$work/mmsg-$mode"
        # shellcheck disable=SC2086
        timeout -s INT 120 "$KMX_AGENT" trace --json --raw $flag -- "$KMX_MMSG" \
            "$work/mmsg-$mode" >"$work/mmsg-records-$mode" 2>"$work/mmsg-stderr-$mode"
        section "mmsg records $mode" grep -E '"type":"(data|close|summary)"' "$work/mmsg-records-$mode"
        section "mmsg sent $mode" cat "$work/mmsg-$mode/mmsg.sent"
        section "mmsg stderr $mode" tail -n 5 "$work/mmsg-stderr-$mode"
    fi
done
kill "$server" 2>/dev/null
section server-log cat "$work/server.log"

# The syscall loops of `cargo xtask bench` (KMX_BENCH iterations per loop; none when
# 0), for the capture modes the host cannot run: per round, the loops with no agent
# (baseline), then per mode in KMX_BENCH_MODES the loops while the agent is attached
# but watches only an idle sleep (unwatched), and the loops run under `trace`
# (watched). Each run's syscall_loop results are a section.
if [ "${KMX_BENCH:-0}" != 0 ]; then
    results="$work/loops.json"
    loops="/usr/bin/syscall_loop --iterations $KMX_BENCH --out $results"
    round=1
    while [ "$round" -le "$KMX_BENCH_ROUNDS" ]; do
        rm -f "$results"
        $loops >/dev/null 2>&1
        section "bench $round baseline" cat "$results"
        for mode in $(echo "$KMX_BENCH_MODES" | tr , ' '); do
            sleep 600 &
            idle=$!
            OPENBOX_LOG=info "$KMX_AGENT" trace --json --capture-mode "$mode" --pid "$idle" \
                >/dev/null 2>"$work/bench-agent.err" &
            agent=$!
            # Attached once it says it watches the sleep (programs loaded under TCG
            # take seconds).
            tries=0
            while ! grep -q "watching process" "$work/bench-agent.err" &&
                kill -0 "$agent" 2>/dev/null && [ $tries -lt 1800 ]; do
                sleep 0.1
                tries=$((tries + 1))
            done
            section "bench $round attached $mode" grep "watching process" "$work/bench-agent.err"
            # Then idle: on the one vCPU, the agent's work after attaching (TLS probes,
            # maps) would otherwise run inside the loops. Idle: at most one clock tick
            # of CPU time in a second.
            ticks() { awk '{ print $14 + $15 }' "/proc/$agent/stat" 2>/dev/null || echo 0; }
            before=$(ticks)
            tries=0
            while [ $tries -lt 60 ]; do
                sleep 1
                now=$(ticks)
                [ $((now - before)) -le 1 ] && break
                before=$now
                tries=$((tries + 1))
            done
            section "bench $round idle-after $mode" echo "$tries s"
            rm -f "$results"
            $loops >/dev/null 2>&1
            section "bench $round unwatched $mode" cat "$results"
            # Stopped like a service; killed if it has not exited within 60 s.
            kill -TERM "$agent" 2>/dev/null
            tries=0
            while kill -0 "$agent" 2>/dev/null && [ $tries -lt 600 ]; do
                sleep 0.1
                tries=$((tries + 1))
            done
            kill -KILL "$agent" 2>/dev/null
            wait "$agent"
            section "bench $round stopped $mode" echo "agent exit $?, after $tries tenths of a second"
            kill "$idle" 2>/dev/null
            wait "$idle" 2>/dev/null
            rm -f "$results"
            # shellcheck disable=SC2086
            "$KMX_AGENT" trace --json --capture-mode "$mode" -- $loops --settle-ms 300 \
                >/dev/null 2>"$work/bench-agent.err"
            section "bench $round watched $mode" cat "$results"
            section "bench $round watched-summary $mode" tail -n 1 "$work/bench-agent.err"
        done
        round=$((round + 1))
    done
fi
echo "@@kmx done" >>"$out"
