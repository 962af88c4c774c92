# The kernel-matrix steps, the same in a guest and on the host (`cargo xtask
# kernel-matrix` runs both): what the kernel offers, `openbox-agent check`, and per
# capture mode one `trace` of an HTTPS request (plaintext through the libssl uprobes)
# and a file write. Each result is a section of $KMX_OUT:
#   @@kmx begin NAME
#   ...
#   @@kmx end NAME rc=N
# Variables: KMX_OUT KMX_AGENT KMX_CERT_DIR KMX_WORK KMX_PORT KMX_MODES KMX_BPFTOOL.
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
done
kill "$server" 2>/dev/null
section server-log cat "$work/server.log"
echo "@@kmx done" >>"$out"
