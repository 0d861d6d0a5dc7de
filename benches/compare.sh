#!/usr/bin/env bash
# Compare siphon-dataplane with haproxy (TCP mode) and nginx (stream module)
# on loopback, in one run, against the same backends:
#
#   direct   client -> backend                    (the baseline, ratio 1.00)
#   siphon   client -> siphon-dataplane -> backend
#   haproxy  client -> haproxy            -> backend
#   nginx    client -> nginx stream       -> backend
#
# Workloads, each run against every target:
#   iperf3 TCP throughput with 1 and 4 streams (receiver side, Gbit/s)
#   wrk with "Connection: close": new TCP connection per request (conn/s)
#   wrk --latency on keep-alive connections: p50 and p99 request latency
#   iperf3 UDP (-u -b 0) with 64-byte and 1,200-byte datagrams: packets/s
#   and Gbit/s the receiver got, and the share lost on the way (haproxy has
#   no UDP proxying, so its UDP rows are n/a)
#
# Every target is measured ROUNDS times, the order rotating each round, and
# the table shows the median of its rounds: on a shared 2-core machine one
# measurement swings by a third, and rotating keeps any one target from
# always running first, or right after another.
#
# Prints a Markdown table (medians, ratios to direct), the figures of every
# round, and siphon against haproxy, and writes them with a header to
# benches/results/compare-<timestamp>.md. See benches/README.md.
#
# Environment:
#   DURATION    seconds per measurement (default 5)
#   ROUNDS      measurements of every workload per target (default 3)
#   WORKERS     worker threads/processes of every proxy (default: nproc)
#   SIPHON_BIN  siphon-dataplane binary (default target/release/siphon-dataplane,
#               relative to the repository root)
#   SIPHON_ARGS extra arguments for `siphon-dataplane run`, e.g. "--no-splice"
#   TARGETS     proxies to compare, default "siphon haproxy nginx"; direct
#               (the baseline) is always measured, TARGETS=direct only that
#   WORKLOADS   which workloads, default "tcp http udp" (iperf3 TCP, wrk,
#               iperf3 UDP)
#   ORIGIN_WORKERS  nginx worker processes of the HTTP origin (default 1)
#   LATENCY_CONNS   keep-alive connection counts of the latency runs
#               (default "10 50 200")
#   KEEP_TMP=1  keep the temp dir with configs and logs (always kept when
#               something failed)
set -euo pipefail

cd "$(dirname "$0")/.."
REPO_ROOT=$PWD
HARNESS=$REPO_ROOT/benches/harness
RESULTS_DIR=$REPO_ROOT/benches/results

DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
WORKERS=${WORKERS:-$(nproc)}
SIPHON_BIN=${SIPHON_BIN:-target/release/siphon-dataplane}
read -r -a SIPHON_ARGS <<<"${SIPHON_ARGS:-}"
# One origin worker by default: the origin is not under test, and on a small
# machine every extra busy process steals CPU from the client or the proxy,
# which shows up as millisecond p99 spikes that have nothing to do with it.
ORIGIN_WORKERS=${ORIGIN_WORKERS:-1}

# wrk shape: one client thread so the load generator takes as little CPU from
# the proxy as possible; enough connections to keep the close test busy, a
# moderate fixed number for latency so it measures latency, not queueing.
WRK_THREADS=1
CLOSE_CONNS=50
# Keep-alive latency at each of these concurrencies: 10 measures the
# proxy's own delay, 50 and 200 how its tail grows once requests queue.
read -r -a LATENCY_CONNS <<<"${LATENCY_CONNS:-10 50 200}"
# UDP datagram payload sizes: a small one that measures packets/s, and one
# that fits a 1,280-byte IPv6 minimum MTU with room for tunnel headers.
UDP_SIZES=(64 1200)

# Backends, then one port pair per target: <x>5201 forwards to iperf3 (TCP,
# and UDP on the same port number), <x>8081 to the HTTP origin.
IPERF_PORT=15201
HTTP_PORT=18081
# TARGETS="siphon haproxy" runs a subset; direct is always measured first as
# the baseline of every ratio (TARGETS=direct measures only the baseline).
read -r -a TARGETS <<<"${TARGETS:-siphon haproxy nginx}"
read -r -a WORKLOADS <<<"${WORKLOADS:-tcp http udp}"
declare -A IPERF_PORTS=([direct]=15201 [siphon]=25201 [haproxy]=35201 [nginx]=45201)
declare -A HTTP_PORTS=([direct]=18081 [siphon]=28081 [haproxy]=38081 [nginx]=48081)

# Background processes we started, by name; cleanup stops exactly these.
declare -A PIDS=()
# Targets measured in at least one round, and the round being run.
declare -A MEASURED=()
ROUND=1
WORK=
NOFILE=
# Clock ticks per second of /proc/PID/stat times.
CLK_TCK=$(getconf CLK_TCK)
HAVE_IPERF=0
HAVE_HTTP=0
WRK_FIELDS=
IPERF_FIELDS=
LOADAVG=

log() { printf '[compare] %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }
wanted() { [[ " ${WORKLOADS[*]} " == *" $1 "* ]]; }

# Notes end up under the table: skipped peers, errors seen by the clients.
note() {
    # The same note from every round once is enough.
    grep -qxF -- "- $*" "$WORK/notes.md" && return 0
    log "note: $*"
    printf -- '- %s\n' "$*" >>"$WORK/notes.md"
}

# A note that points at a log: keep the temp dir so the log is still there.
failed() {
    note "$@"
    KEEP_TMP=1
}

# CPU time (clock ticks, user + system) the proxy of a target has used so
# far: its process and its children (nginx's workers), all threads. 0 for
# direct. Divided by the work done it gives the proxy's CPU cost per
# connection, request or datagram: on a machine whose cores the client and
# the backends share, a steadier comparison of the proxies than the rates,
# which the client and the backends bound as much as the proxy.
proxy_ticks() {
    local pid=${PIDS[$1]:-} p t total=0
    if [[ $1 != direct && -n $pid ]]; then
        for p in $pid $(pgrep -P "$pid" || true); do
            t=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null) || t=0
            total=$((total + ${t:-0}))
        done
    fi
    echo "$total"
}

# Records METRIC for TARGET: the proxy's CPU per unit of work, in UNIT_NS
# nanoseconds (1000: µs), from the ticks used since TICKS_BEFORE over WORK
# units (connections, requests, datagrams). n/a for direct.
record_cpu() {
    local target=$1 metric=$2 before=$3 work=$4 unit_ns=$5 after
    [[ $target == direct ]] && return 0
    after=$(proxy_ticks "$target")
    record "$target" "$metric" "$(awk -v t="$((after - before))" -v hz="$CLK_TCK" -v n="$work" \
        -v u="$unit_ns" 'BEGIN { if (n > 0) printf "%.2f", t * 1e9 / hz / n / u; else print "n/a" }')"
}

record() { printf '%s\t%s\t%s\t%s\n' "$ROUND" "$1" "$2" "$3" >>"$WORK/results.tsv"; }

# ---------------------------------------------------------------- processes

# True while the process exists and is not a zombie (a child that exited but
# has not been reaped yet still answers kill -0).
alive() {
    local stat
    stat=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    stat=${stat//[[:space:]]/}
    [[ -n $stat && $stat != Z* ]]
}

stop_process() {
    local name=$1 pid=${PIDS[$1]:-} _
    [[ -n $pid ]] || return 0
    unset "PIDS[$name]"
    if alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            alive "$pid" || break
            sleep 0.1
        done
        if alive "$pid"; then
            log "$name (pid $pid) still running 5s after SIGTERM, killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? name
    trap - EXIT INT TERM
    for name in "${!PIDS[@]}"; do
        stop_process "$name"
    done
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $rc -ne 0 || ${KEEP_TMP:-0} == 1 ]]; then
            log "configs and logs kept in $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}

port_listening() {
    if have ss; then
        [[ -n $(ss -Hltn "sport = :$1") ]]
    else
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
    fi
}

# A port someone else listens on would silently measure the wrong process.
ports_free() {
    local name=$1 port
    shift
    for port in "$@"; do
        if port_listening "$port"; then
            note "$name: skipped, port $port is already in use"
            return 1
        fi
    done
}

# Ready = the process is alive and all its ports listen (connections are then
# queued by the kernel and accepted). Checked with ss instead of connecting so
# that polling does not open stray iperf3 control connections.
wait_listening() {
    local name=$1 pid=${PIDS[$1]} port ready _
    shift
    for _ in $(seq 200); do
        alive "$pid" || return 1
        ready=1
        for port in "$@"; do
            port_listening "$port" || ready=0
        done
        [[ $ready == 1 ]] && return 0
        sleep 0.1
    done
    return 1
}

# Show why a process did not come up, then make sure it is gone.
start_failed() {
    local name=$1 logfile=$2
    failed "$name: skipped, it did not start listening (log: $logfile)"
    if [[ -s $logfile ]]; then
        tail -n 20 "$logfile" >&2
    fi
    stop_process "$name"
    return 1
}

# Fill a template from benches/harness/ with the ports and limits every
# config shares, plus NAME=VALUE pairs given as extra arguments.
render() {
    local template=$1 out=$2 kv
    shift 2
    local -a subst=(
        "WORKERS=$WORKERS" "NOFILE=$NOFILE" "MAXCONN=$MAXCONN"
        "WORKER_CONNECTIONS=$WORKER_CONNECTIONS"
        "IPERF_PORT=$IPERF_PORT" "HTTP_PORT=$HTTP_PORT"
        "SIPHON_IPERF_PORT=${IPERF_PORTS[siphon]}" "SIPHON_HTTP_PORT=${HTTP_PORTS[siphon]}"
        "HAPROXY_IPERF_PORT=${IPERF_PORTS[haproxy]}" "HAPROXY_HTTP_PORT=${HTTP_PORTS[haproxy]}"
        "NGINX_IPERF_PORT=${IPERF_PORTS[nginx]}" "NGINX_HTTP_PORT=${HTTP_PORTS[nginx]}"
        "$@"
    )
    local -a sed_args=()
    for kv in "${subst[@]}"; do
        sed_args+=(-e "s|@${kv%%=*}@|${kv#*=}|g")
    done
    sed "${sed_args[@]}" "$HARNESS/$template" >"$out"
    if grep -q '@[A-Z_]*@' "$out"; then
        die "unfilled placeholder in $out"
    fi
}

# ---------------------------------------------------------------- setup

check_settings() {
    [[ $DURATION =~ ^[1-9][0-9]*$ ]] || die "DURATION must be a positive integer (seconds), got '$DURATION'"
    [[ $WORKERS =~ ^[1-9][0-9]*$ ]] || die "WORKERS must be a positive integer, got '$WORKERS'"
    [[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, got '$ROUNDS'"
    local target
    local -a proxies=()
    for target in "${TARGETS[@]}"; do
        case $target in
        direct) ;;
        siphon | haproxy | nginx) proxies+=("$target") ;;
        *) die "unknown target '$target' in TARGETS (siphon, haproxy, nginx)" ;;
        esac
    done
    TARGETS=("${proxies[@]}")
    local w
    for w in "${WORKLOADS[@]}"; do
        [[ $w == tcp || $w == http || $w == udp ]] || die "unknown workload '$w' in WORKLOADS (tcp, http, udp)"
    done
    [[ $ORIGIN_WORKERS =~ ^[1-9][0-9]*$ ]] || die "ORIGIN_WORKERS must be a positive integer, got '$ORIGIN_WORKERS'"
    have python3 || die "python3 is required (it parses iperf3/wrk output and renders the table)"
    if have iperf3; then HAVE_IPERF=1; else log "iperf3 not installed: throughput rows will be n/a"; fi
    have wrk || log "wrk not installed: connection-rate and latency rows will be n/a"
}

# Thousands of short connections per second need file descriptors: raise the
# soft limit as far as allowed (past the hard limit only with privileges).
raise_nofile() {
    local nr_open
    nr_open=$(cat /proc/sys/fs/nr_open 2>/dev/null || echo 1048576)
    ulimit -n "$nr_open" 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    NOFILE=$(ulimit -n)
    if [[ $NOFILE == unlimited ]]; then
        NOFILE=$nr_open
    fi
    # Each proxied connection costs two descriptors (client and backend side),
    # and haproxy reserves a splice pipe (two more) for a quarter of them:
    # it refuses to start if maxconn needs more than the limit.
    MAXCONN=$(((NOFILE - 512) * 2 / 5))
    if ((MAXCONN > 100000)); then
        MAXCONN=100000
    fi
    WORKER_CONNECTIONS=$((NOFILE - 256))
    if ((WORKER_CONNECTIONS > 65535)); then
        WORKER_CONNECTIONS=65535
    fi
    log "open files limit: $NOFILE"
}

# Sockets in TIME_WAIT left by an earlier run (tens of thousands after the
# close test) make the kernel recycle 4-tuples, and wrk then reports write or
# read errors that have nothing to do with the proxy: let them expire first.
settle_time_wait() {
    local count i
    have ss || return 0
    for i in $(seq 70); do
        count=$(ss -Htan state time-wait | wc -l)
        if ((count < 5000)); then
            return 0
        fi
        if ((i == 1)); then
            log "waiting for $count TIME_WAIT sockets of an earlier run to expire (up to 70s)"
        fi
        sleep 1
    done
    note "$count sockets were still in TIME_WAIT at the start; connection-rate figures may suffer"
}

# iperf3 server and HTTP origin on 127.0.0.1, shared by all targets.
start_backends() {
    if ((HAVE_IPERF)); then
        ports_free "iperf3 server" "$IPERF_PORT" || die "backend port $IPERF_PORT is in use"
        iperf3 -s -B 127.0.0.1 -p "$IPERF_PORT" >"$WORK/iperf3-server.log" 2>&1 </dev/null &
        PIDS[iperf3]=$!
        wait_listening iperf3 "$IPERF_PORT" || die "iperf3 server did not start (see $WORK/iperf3-server.log)"
    fi

    if ! have nginx; then
        note "nginx is not installed: it also serves the HTTP origin, so the wrk rows are n/a"
    elif have wrk; then
        ports_free "HTTP origin" "$HTTP_PORT" || die "backend port $HTTP_PORT is in use"
        start_nginx_instance origin nginx-origin.conf.in "" || die "HTTP origin (nginx) did not start"
        wait_listening origin "$HTTP_PORT" || die "HTTP origin did not listen (see $WORK/origin/error.log)"
        HAVE_HTTP=1
    fi
}

# Private nginx instance: own prefix, config, pid and logs under $WORK/<name>;
# the system nginx config and /var/log/nginx are never read or written.
# Runs in the foreground (daemon off) so $! is the master and SIGTERM stops it.
start_nginx_instance() {
    local name=$1 template=$2 stream_module=$3 dir=$WORK/$1
    mkdir -p "$dir/tmp"
    render "$template" "$dir/nginx.conf" "DIR=$dir" "STREAM_MODULE=$stream_module" \
        "ORIGIN_WORKERS=$ORIGIN_WORKERS"
    # -e: error log used before the config is read (else the built-in path).
    if ! nginx -t -q -p "$dir/" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/check.log" 2>&1; then
        cat "$dir/check.log" >&2
        return 1
    fi
    nginx -p "$dir/" -c "$dir/nginx.conf" -e "$dir/error.log" -g 'daemon off;' \
        >"$dir/stdout.log" 2>&1 </dev/null &
    PIDS[$name]=$!
}

# ---------------------------------------------------------------- targets

start_siphon() {
    if [[ ! -x $SIPHON_BIN ]]; then
        note "siphon: skipped, $SIPHON_BIN not found (cargo build --release -p siphon-dataplane)"
        return 1
    fi
    ports_free siphon "${IPERF_PORTS[siphon]}" "${HTTP_PORTS[siphon]}" || return 1
    render siphon.toml.in "$WORK/siphon.toml"
    "$SIPHON_BIN" run --config "$WORK/siphon.toml" --socket "$WORK/siphon.sock" \
        --workers "$WORKERS" "${SIPHON_ARGS[@]}" \
        >"$WORK/siphon.log" 2>&1 </dev/null &
    PIDS[siphon]=$!
    wait_listening siphon "${IPERF_PORTS[siphon]}" "${HTTP_PORTS[siphon]}" ||
        start_failed siphon "$WORK/siphon.log"
}

start_haproxy() {
    if ! have haproxy; then
        note "haproxy: skipped, not installed (apt-get install haproxy)"
        return 1
    fi
    ports_free haproxy "${IPERF_PORTS[haproxy]}" "${HTTP_PORTS[haproxy]}" || return 1
    render haproxy.cfg.in "$WORK/haproxy.cfg"
    if ! haproxy -c -q -f "$WORK/haproxy.cfg" >"$WORK/haproxy-check.log" 2>&1; then
        cat "$WORK/haproxy-check.log" >&2
        failed "haproxy: skipped, config check failed (log: $WORK/haproxy-check.log)"
        return 1
    fi
    # -db: stay in the foreground so $! is haproxy itself.
    haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 </dev/null &
    PIDS[haproxy]=$!
    wait_listening haproxy "${IPERF_PORTS[haproxy]}" "${HTTP_PORTS[haproxy]}" ||
        start_failed haproxy "$WORK/haproxy.log"
}

# Prints the config line that makes the stream module available: nothing to
# load when it is compiled in, else load_module with the .so from the
# modules path (Debian/Ubuntu ship it in libnginx-mod-stream).
nginx_stream_module() {
    local build modules_dir dir
    build=$(nginx -V 2>&1)
    if [[ $build =~ --with-stream([[:space:]]|$) ]]; then
        echo "# stream module is compiled in"
        return 0
    fi
    [[ $build == *--with-stream=dynamic* ]] || return 1
    modules_dir=/usr/lib/nginx/modules
    if [[ $build =~ --modules-path=([^[:space:]]+) ]]; then
        modules_dir=${BASH_REMATCH[1]}
    fi
    for dir in "$modules_dir" /usr/lib/nginx/modules /usr/lib64/nginx/modules /usr/share/nginx/modules; do
        if [[ -f $dir/ngx_stream_module.so ]]; then
            echo "load_module $dir/ngx_stream_module.so;"
            return 0
        fi
    done
    return 1
}

start_nginx() {
    local module
    if ! have nginx; then
        note "nginx: skipped, not installed (apt-get install nginx libnginx-mod-stream)"
        return 1
    fi
    if ! module=$(nginx_stream_module); then
        note "nginx: skipped, stream module not found (apt-get install libnginx-mod-stream)"
        return 1
    fi
    ports_free nginx "${IPERF_PORTS[nginx]}" "${HTTP_PORTS[nginx]}" || return 1
    if ! start_nginx_instance nginx nginx-stream.conf.in "$module"; then
        failed "nginx: skipped, config check failed (log: $WORK/nginx/check.log)"
        return 1
    fi
    wait_listening nginx "${IPERF_PORTS[nginx]}" "${HTTP_PORTS[nginx]}" ||
        start_failed nginx "$WORK/nginx/error.log"
}

start_target() {
    case $1 in
    direct) return 0 ;;
    siphon) start_siphon ;;
    haproxy) start_haproxy ;;
    nginx) start_nginx ;;
    *) die "unknown target $1" ;;
    esac
}

# ---------------------------------------------------------------- workloads

# Runs a load generator in the background and waits for it. A foreground
# child that catches SIGINT itself (iperf3 and wrk do) makes bash ignore the
# Ctrl-C, and SIGTERM would wait for the child; `wait` instead returns at once
# on a trapped signal, so the run stops and cleanup ends the client too.
# timeout bounds a client stuck on a wedged proxy.
run_client() {
    local out=$1 err=$2 rc=0
    shift 2
    timeout $((DURATION + 30)) "$@" >"$out" 2>"$err" </dev/null &
    PIDS[client]=$!
    wait "${PIDS[client]}" || rc=$?
    unset "PIDS[client]"
    return "$rc"
}

# Runs an iperf3 client (iperf3 -c ... "$@" -J) against the target's port and
# leaves the figures results.py PARSER extracts in IPERF_FIELDS; returns 1
# (with a note) when both attempts fail. Control and data connections all
# reach the one iperf3 server because every proxy forwards the port to one
# backend. (Not a $(...) capture: the client must run in the main shell, see
# run_client.)
run_iperf3() {
    local target=$1 parser=$2 label=$3 out=$4 attempt
    shift 4
    for attempt in 1 2; do
        if run_client "$out" "$out.stderr" iperf3 -c 127.0.0.1 -p "${IPERF_PORTS[$target]}" \
            -t "$DURATION" "$@" -J &&
            IPERF_FIELDS=$(python3 "$HARNESS/results.py" "$parser" "$out" 2>>"$out.stderr"); then
            return 0
        fi
        # The server refuses a test while it still winds down the previous
        # one ("the server is busy"): give it a moment and try once more.
        log "$target: $label attempt $attempt failed: $(tail -n 1 "$out.stderr")"
        sleep 1
    done
    failed "$target: $label failed (see $out)"
    return 1
}

run_iperf() {
    local target=$1 streams=$2
    run_iperf3 "$target" iperf "iperf3 -P $streams" \
        "$WORK/iperf-$target-P$streams-r$ROUND.json" -P "$streams" || return 0
    record "$target" "tcp$streams" "$IPERF_FIELDS"
    log "$target: iperf3 -P $streams: $IPERF_FIELDS Gbit/s"
}

# iperf3 UDP at full offered load (-b 0) with SIZE-byte payloads. The
# control connection goes through the proxy's TCP listener and the datagrams
# through its UDP listener on the same port. Records what the server got:
# packets/s, Gbit/s and the share lost.
run_iperf_udp() {
    local target=$1 size=$2 pps gbps loss ticks
    ticks=$(proxy_ticks "$target")
    run_iperf3 "$target" iperf-udp "iperf3 -u -l $size" \
        "$WORK/iperf-udp-$target-$size-r$ROUND.json" -u -b 0 -l "$size" || return 0
    IFS=$'\t' read -r pps gbps loss <<<"$IPERF_FIELDS"
    record "$target" "udp${size}_pps" "$pps"
    record "$target" "udp${size}_gbps" "$gbps"
    record "$target" "udp${size}_loss" "$loss"
    # Per datagram forwarded (what the server got).
    record_cpu "$target" "udp${size}_cpu_ns" "$ticks" \
        "$(awk -v p="$pps" -v d="$DURATION" 'BEGIN { printf "%d", p * d }')" 1
    log "$target: iperf3 -u -l $size: $pps packets/s, $gbps Gbit/s, $loss % lost"
}

# Runs wrk with the options all wrk workloads share and leaves its parsed
# figures in WRK_FIELDS: "req/s p50_us p99_us errors requests", tab separated.
# (Not a $(...) capture: the client must run in the main shell, see run_client.)
run_wrk() {
    local out=$1
    shift
    run_client "$out" "$out.stderr" wrk -t "$WRK_THREADS" -d "${DURATION}s" "$@" &&
        WRK_FIELDS=$(python3 "$HARNESS/results.py" wrk "$out" 2>>"$out.stderr")
}

# Every request on a fresh connection: the proxy's accept + connect +
# teardown cost. The origin answers "Connection: close", so req/s = conn/s.
run_wrk_close() {
    local target=$1 out rps errors requests ticks
    out=$WORK/wrk-close-$target-r$ROUND.txt
    ticks=$(proxy_ticks "$target")
    if ! run_wrk "$out" -c "$CLOSE_CONNS" -H 'Connection: close' \
        "http://127.0.0.1:${HTTP_PORTS[$target]}/"; then
        failed "$target: wrk (Connection: close) failed (see $out)"
        return 0
    fi
    IFS=$'\t' read -r rps _ _ errors requests <<<"$WRK_FIELDS"
    record "$target" close_rps "$rps"
    record_cpu "$target" close_cpu_us "$ticks" "$requests" 1000
    log "$target: close: $rps conn/s"
    [[ $errors == - ]] || note "$target: wrk (Connection: close) reported $errors"
}

# Persistent connections at each fixed concurrency: latency the proxy adds
# per request once connections exist, and how its tail grows under load.
run_wrk_latency() {
    local target=$1 conns out rps p50 p99 errors requests ticks
    for conns in "${LATENCY_CONNS[@]}"; do
        out=$WORK/wrk-latency-$target-c$conns-r$ROUND.txt
        ticks=$(proxy_ticks "$target")
        if ! run_wrk "$out" -c "$conns" --latency \
            "http://127.0.0.1:${HTTP_PORTS[$target]}/"; then
            failed "$target: wrk -c $conns --latency failed (see $out)"
            continue
        fi
        IFS=$'\t' read -r rps p50 p99 errors requests <<<"$WRK_FIELDS"
        record "$target" "ka_rps_c$conns" "$rps"
        record_cpu "$target" "ka_cpu_us_c$conns" "$ticks" "$requests" 1000
        record "$target" "ka_p50_c$conns" "$p50"
        record "$target" "ka_p99_c$conns" "$p99"
        log "$target: keep-alive, $conns connections: p50 ${p50}us p99 ${p99}us ($rps req/s)"
        [[ $errors == - ]] || note "$target: wrk -c $conns --latency reported $errors"
    done
}

run_workloads() {
    local target=$1
    if ((HAVE_IPERF)) && wanted tcp; then
        run_iperf "$target" 1
        run_iperf "$target" 4
    fi
    if ((HAVE_IPERF)) && wanted udp; then
        if [[ $target == haproxy ]]; then
            note "haproxy: UDP rows n/a, haproxy does not proxy UDP"
        else
            local size
            for size in "${UDP_SIZES[@]}"; do
                run_iperf_udp "$target" "$size"
            done
        fi
    fi
    if ((HAVE_HTTP)) && wanted http; then
        run_wrk_close "$target"
        run_wrk_latency "$target"
    fi
    # A proxy that crashed mid-run leaves failed or suspicious figures.
    if [[ $target != direct ]] && ! alive "${PIDS[$target]}"; then
        failed "$target: exited during the run, figures are suspect (see its log in $WORK)"
    fi
}

# ---------------------------------------------------------------- report

first_line() {
    local out
    out=$("$@" 2>&1) || true
    printf '%s' "${out%%$'\n'*}"
}

report_header() {
    local siphon_version=absent
    if [[ -x $SIPHON_BIN ]]; then
        siphon_version="$(first_line "$SIPHON_BIN" --version) (binary built $(date -r "$SIPHON_BIN" '+%F %T'))"
        if ((${#SIPHON_ARGS[@]})); then
            siphon_version+=", run with: ${SIPHON_ARGS[*]}"
        fi
    fi
    cat <<EOF
# siphon vs haproxy vs nginx stream, loopback

- date: $(date '+%F %T %Z')
- kernel: $(uname -r)
- CPUs (nproc): $(nproc), load average at start: $LOADAVG
- WORKERS: $WORKERS, DURATION: ${DURATION}s, ROUNDS: $ROUNDS, ORIGIN_WORKERS: $ORIGIN_WORKERS, open files limit: $NOFILE
- commit: $(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo none)
- siphon-dataplane: $siphon_version
- haproxy: $(have haproxy && first_line haproxy -v || echo absent)
- nginx: $(have nginx && first_line nginx -v || echo absent)
- iperf3: $(have iperf3 && first_line iperf3 --version || echo absent)
- wrk: $(have wrk && first_line wrk -v || echo absent)
EOF
}

legend() {
    cat <<EOF
- TCP 1 stream / 4 streams: \`iperf3 -P 1|4 -t $DURATION\`, receiver-side Gbit/s.
- close conn/s: \`wrk -t $WRK_THREADS -c $CLOSE_CONNS -H 'Connection: close'\`; one TCP connection per request.
- keep-alive req/s, p50/p99 @N: \`wrk -t $WRK_THREADS -c N --latency\` over N persistent connections (N = ${LATENCY_CONNS[*]}),
  latency in microseconds.
- UDP 64 B / 1200 B: \`iperf3 -u -b 0 -l 64|1200 -t $DURATION\` (one flow, unlimited offered load); packets/s and
  Gbit/s received by the server, and the share of sent datagrams that never arrived.
- Figures are the median of $ROUNDS rounds (every round measures every target, in rotating order);
  the figures of each round follow the table.
- ÷direct: the target's figure divided by direct's. Throughput and conn/s: higher is better,
  1.00 = as fast as without a proxy. Latency: lower is better, 1.00 = no added latency.
- Client, proxy and backends share the same $(nproc) CPUs: figures compare the proxies with each other
  on this machine, not absolute capacity.
EOF
}

print_table() {
    local table stamp result_file target
    local -a measured=()
    # Report in the usual order, not the order of the last round.
    for target in direct siphon haproxy nginx; do
        [[ -n ${MEASURED[$target]:-} ]] && measured+=("$target")
    done
    table=$(python3 "$HARNESS/results.py" table "$WORK/results.tsv" "${measured[@]}")
    stamp=$(date '+%Y%m%d-%H%M%S')
    mkdir -p "$RESULTS_DIR"
    result_file=$RESULTS_DIR/compare-$stamp.md
    {
        report_header
        printf '\n%s\n\n' "$table"
        legend
        if [[ -s $WORK/notes.md ]]; then
            printf '\nNotes:\n\n'
            cat "$WORK/notes.md"
        fi
    } >"$result_file"

    printf '\n%s\n' "$table"
    if [[ -s $WORK/notes.md ]]; then
        printf '\nNotes:\n'
        cat "$WORK/notes.md"
    fi
    printf '\nWritten to %s\n' "${result_file#"$REPO_ROOT"/}"
}

main() {
    check_settings
    raise_nofile
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/siphon-compare.XXXXXX")
    : >"$WORK/results.tsv"
    : >"$WORK/notes.md"
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    # Other work on the machine skews every column: record how busy it was.
    LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
    settle_time_wait
    start_backends
    local target i
    local -a order=(direct "${TARGETS[@]}")
    for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
        for ((i = 0; i < ${#order[@]}; i++)); do
            target=${order[(i + ROUND - 1) % ${#order[@]}]}
            # One proxy at a time, so proxies never compete with each other for CPU.
            start_target "$target" || continue
            log "round $ROUND/$ROUNDS: measuring $target"
            run_workloads "$target"
            stop_process "$target"
            MEASURED[$target]=1
        done
    done
    print_table
}

main "$@"
