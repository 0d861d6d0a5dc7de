#!/usr/bin/env python3
"""Parsing and table rendering for benches/compare.sh.

Kept in Python rather than bash because it has to do float arithmetic, JSON
and unit conversion, which bash cannot do without awk/jq gymnastics.

Subcommands:
  iperf FILE            print receiver-side throughput of an `iperf3 -J` run in Gbit/s
  iperf-udp FILE        print "packets_per_s gbit_per_s loss_percent" (tab separated),
                        receiver side, from an `iperf3 -u -J` run
  wrk FILE              print "req_per_s p50_us p99_us errors requests" (tab separated)
                        from wrk output
  table TSV TARGET...   print the Markdown comparison table of medians, the
                        figures of every round, and siphon against haproxy;
                        TSV rows are "round<TAB>target<TAB>metric<TAB>value"
                        with value a number or "n/a"
"""

import json
import re
import statistics
import sys

# wrk prints durations with these suffixes (see wrk's units.c); convert to µs.
_WRK_TIME_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}
_WRK_TIME = r"([0-9.]+)(us|ms|s|m|h)"


def iperf(path):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("error"):
        sys.exit(f"iperf3 error: {data['error']}")
    # sum_received is what the server side actually got: the figure that
    # includes the proxy, unlike sum_sent which only counts the client socket.
    bps = data["end"]["sum_received"]["bits_per_second"]
    print(f"{bps / 1e9:.2f}")


def iperf_udp(path):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("error"):
        sys.exit(f"iperf3 error: {data['error']}")
    # The server's view: `packets` is the highest sequence number it saw and
    # `lost_packets` the gaps, so what arrived is their difference.
    rx = data["end"]["sum_received"]
    seconds = rx["seconds"] or 1.0
    pps = (rx["packets"] - rx["lost_packets"]) / seconds
    print(f"{pps:.0f}\t{rx['bits_per_second'] / 1e9:.3f}\t{rx['lost_percent']:.2f}")


def wrk(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()

    def pct(p):
        m = re.search(rf"^\s*{p}%\s+{_WRK_TIME}\s*$", text, re.M)
        return float(m.group(1)) * _WRK_TIME_UNITS_US[m.group(2)] if m else None

    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
    if not rps:
        sys.exit("wrk output has no Requests/sec line")
    errors = []
    sock = re.search(r"Socket errors: (.*)", text)
    if sock:
        errors.append("socket errors: " + sock.group(1).strip())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        errors.append(f"{non2xx.group(1)} non-2xx responses")
    requests = re.search(r"^\s*(\d+) requests in", text, re.M)
    p50, p99 = pct(50), pct(99)
    fields = [
        rps.group(1),
        "n/a" if p50 is None else f"{p50:.1f}",
        "n/a" if p99 is None else f"{p99:.1f}",
        "; ".join(errors) or "-",
        requests.group(1) if requests else "0",
    ]
    print("\t".join(fields))


# (metric key, column title, lower_is_better, number format, ratio to direct)
TCP_COLUMNS = [
    ("tcp1", "TCP 1 stream Gbit/s", False, "{:.2f}", True),
    ("tcp4", "TCP 4 streams Gbit/s", False, "{:.2f}", True),
    ("close_rps", "close conn/s", False, "{:.0f}", True),
    ("close_cpu_us", "proxy CPU µs/conn", True, "{:.1f}", False),
]


def keepalive_conns(values):
    """The connection counts the keep-alive runs used, ascending."""
    return sorted({int(m[len("ka_p99_c"):]) for _, m in values if m.startswith("ka_p99_c")})


def keepalive_columns(values):
    cols = []
    for n in keepalive_conns(values):
        cols += [
            (f"ka_rps_c{n}", f"req/s @{n}", False, "{:.0f}", True),
            (f"ka_p50_c{n}", f"p50 µs @{n}", True, "{:.0f}", True),
            (f"ka_p99_c{n}", f"p99 µs @{n}", True, "{:.0f}", True),
            (f"ka_cpu_us_c{n}", f"proxy CPU µs/req @{n}", True, "{:.1f}", False),
        ]
    return cols
# A loss share has no meaningful ratio to direct's (often 0).
UDP_COLUMNS = [
    ("udp64_pps", "UDP 64 B packets/s", False, "{:.0f}", True),
    ("udp64_loss", "UDP 64 B loss %", True, "{:.2f}", False),
    ("udp64_cpu_ns", "UDP 64 B proxy CPU ns/datagram", True, "{:.0f}", False),
    ("udp1200_pps", "UDP 1200 B packets/s", False, "{:.0f}", True),
    ("udp1200_gbps", "UDP 1200 B Gbit/s", False, "{:.2f}", True),
    ("udp1200_loss", "UDP 1200 B loss %", True, "{:.2f}", False),
    ("udp1200_cpu_ns", "UDP 1200 B proxy CPU ns/datagram", True, "{:.0f}", False),
]


def load(tsv):
    """{(target, metric): [value of each round, in round order]}, None for
    a failed measurement ("n/a")."""
    values = {}
    with open(tsv, encoding="utf-8") as f:
        for line in f:
            _, target, metric, value = line.rstrip("\n").split("\t")
            try:
                number = float(value)
            except ValueError:
                number = None
            values.setdefault((target, metric), []).append(number)
    return values


def median(values, target, metric):
    rounds = [v for v in values.get((target, metric), []) if v is not None]
    return statistics.median(rounds) if rounds else None


def markdown(rows):
    return ["| " + " | ".join(row) + " |" for row in rows]


def medians_table(values, targets, columns):
    header = ["target"]
    for _, title, lower, _, ratio in columns:
        header.append(title)
        if ratio:
            header.append("÷direct (lower is better)" if lower else "÷direct (higher is better)")
    rows = [header, ["---"] + ["---:"] * (len(header) - 1)]
    for target in targets:
        row = [target]
        for key, _, _, fmt, ratio in columns:
            value = median(values, target, key)
            base = median(values, "direct", key)
            row.append("n/a" if value is None else fmt.format(value))
            if ratio:
                row.append("n/a" if value is None or not base else f"{value / base:.2f}")
        rows.append(row)
    return markdown(rows)


def rounds_table(values, targets, columns):
    """Every round's figure: how far apart the rounds were."""
    rows = [["target"] + [c[1] for c in columns], ["---"] + ["---:"] * len(columns)]
    for target in targets:
        row = [target]
        for key, _, _, fmt, _ in columns:
            rounds = values.get((target, key))
            row.append(" / ".join("n/a" if v is None else fmt.format(v) for v in rounds) if rounds else "n/a")
        rows.append(row)
    return markdown(rows)


def verdict(values, checks, us="siphon"):
    """The project's targets, as (metric, title, peer, factor, lower_is_better):
    `us` must reach factor × the peer's figure (or, lower being better, stay
    at or under the peer's)."""
    lines = []
    for key, title, them, factor, lower in checks:
        a, b = median(values, us, key), median(values, them, key)
        if a is None or b is None:
            lines.append(f"- {title}: n/a")
            continue
        if lower:
            met = a <= b
            lines.append(f"- {title}: {us} {a:g} vs {them} {b:g} (lower is better): {'met' if met else 'NOT met'}")
            continue
        ratio = a / b if b else float("inf")
        met = ratio >= factor
        want = "at least equal" if factor == 1 else f"target ≥ {factor:g}"
        lines.append(f"- {title}: {us} ÷ {them} = {ratio:.2f} ({want}): {'met' if met else 'NOT met'}")
    return lines


# siphon against haproxy on TCP: throughput and connection rate at least
# equal, p99 no worse. Against nginx on UDP (haproxy has none): 1.5× the
# packets/s at no higher loss.
TCP_TARGETS = [
    ("tcp1", "TCP 1 stream Gbit/s", "haproxy", 1.0, False),
    ("tcp4", "TCP 4 streams Gbit/s", "haproxy", 1.0, False),
    ("close_rps", "close conn/s", "haproxy", 1.0, False),
    ("close_cpu_us", "proxy CPU µs per connection", "haproxy", 1.0, True),
]


def keepalive_targets(values):
    checks = []
    for n in keepalive_conns(values):
        checks.append((f"ka_p99_c{n}", f"keep-alive p99 µs @{n}", "haproxy", 1.0, True))
        checks.append((f"ka_cpu_us_c{n}", f"keep-alive proxy CPU µs per request @{n}", "haproxy", 1.0, True))
    return checks
UDP_TARGETS = [
    ("udp64_pps", "UDP 64 B packets/s", "nginx", 1.5, False),
    ("udp64_loss", "UDP 64 B loss %", "nginx", 1.0, True),
    ("udp1200_pps", "UDP 1200 B packets/s", "nginx", 1.5, False),
    ("udp1200_loss", "UDP 1200 B loss %", "nginx", 1.0, True),
    ("udp64_cpu_ns", "UDP 64 B proxy CPU ns per datagram", "nginx", 1.0, True),
]


def table(tsv, targets):
    values = load(tsv)
    have_udp = any(metric.startswith("udp") for _, metric in values)
    have_tcp = any(metric.startswith(("tcp", "close")) for _, metric in values)
    ka_columns = keepalive_columns(values)
    out = []
    if have_tcp:
        out += ["TCP:", ""] + medians_table(values, targets, TCP_COLUMNS) + [""]
    if ka_columns:
        out += ["Keep-alive (wrk --latency, @N = N persistent connections):", ""]
        out += medians_table(values, targets, ka_columns) + [""]
    if have_udp:
        out += ["UDP:", ""] + medians_table(values, targets, UDP_COLUMNS) + [""]
    out += ["Figures of each round (round 1 / round 2 / …):", ""]
    if have_tcp:
        out += rounds_table(values, targets, TCP_COLUMNS) + [""]
    if ka_columns:
        out += rounds_table(values, targets, ka_columns) + [""]
    if have_udp:
        out += rounds_table(values, targets, UDP_COLUMNS) + [""]
    out.pop()
    if (have_tcp or ka_columns) and "siphon" in targets and "haproxy" in targets:
        out += ["", "siphon against haproxy, TCP (medians; target: throughput and conn/s at least equal, p99 no worse):", ""]
        checks = (TCP_TARGETS if have_tcp else []) + keepalive_targets(values)
        out += verdict(values, checks)
    if have_udp and "siphon" in targets and "nginx" in targets:
        out += ["", "siphon against nginx, UDP (medians; target: 1.5× the packets/s at no higher loss):", ""]
        out += verdict(values, UDP_TARGETS)
    print("\n".join(out))


def main(argv):
    if len(argv) >= 2 and argv[0] == "iperf":
        iperf(argv[1])
    elif len(argv) >= 2 and argv[0] == "iperf-udp":
        iperf_udp(argv[1])
    elif len(argv) >= 2 and argv[0] == "wrk":
        wrk(argv[1])
    elif len(argv) >= 3 and argv[0] == "table":
        table(argv[1], argv[2:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
