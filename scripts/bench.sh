#!/usr/bin/env bash
# Benchmarks in release mode (`make bench`; needs PostgreSQL and NATS: `make services`).
#
# Builds the release binary once, runs every benchmark the binary has, then merges
# target/bench/*.json into target/bench/report.json and target/bench/report.md with the
# machine description. Extra arguments go to `chartline bench store`
# (e.g. `scripts/bench.sh --backends postgres --read-events 200000`).
set -euo pipefail

cd "$(dirname "$0")/.."
CARGO="${CARGO:-cargo}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET_DIR/release/chartline"
OUT=target/bench
mkdir -p "$OUT"

echo "== building release binary" >&2
"$CARGO" build --release -p chartline >&2

echo "== chartline bench store" >&2
"$BIN" bench store --out "$OUT/store.json" "$@"

echo "== chartline bench commands" >&2
"$BIN" bench commands --out "$OUT/commands.json" || echo "commands bench failed (continuing)" >&2

echo "== chartline bench api" >&2
"$BIN" bench api --out "$OUT/api.json" || echo "api bench failed (continuing)" >&2

echo "== chartline projections bench" >&2
"$BIN" projections bench --out "$OUT/projections.json" || echo "projections bench failed (continuing)" >&2

echo "== chartline bench ehr" >&2
"$BIN" bench ehr --out "$OUT/ehr.json" || echo "ehr bench failed (continuing)" >&2

# The identity benchmark is built by another part of the project; run it when present.
if "$BIN" identity --help 2>/dev/null | grep -qE '^\s+bench\b'; then
    echo "== chartline identity bench" >&2
    "$BIN" identity bench --out "$OUT/identity.json" || echo "identity bench failed (continuing)" >&2
fi

pg_version="$(psql "${CHARTLINE_BENCH_PG:-postgres://postgres@127.0.0.1:5432/test}" -Atc 'SHOW server_version' 2>/dev/null || true)"
nats_version="$(nats-server --version 2>/dev/null || true)"

CHARTLINE_PG_VERSION="$pg_version" CHARTLINE_NATS_VERSION="$nats_version" \
CHARTLINE_RUSTC_VERSION="$(rustc --version 2>/dev/null || true)" \
python3 - "$OUT" <<'PY'
"""Merges target/bench/*.json into report.json and report.md."""
import glob
import json
import os
import platform
import sys

out = sys.argv[1]


def meminfo_total_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


machine = {
    "nproc": os.cpu_count(),
    "cpu": cpu_model(),
    "memory_gib": meminfo_total_gib(),
    "kernel": platform.release(),
    "rustc": os.environ.get("CHARTLINE_RUSTC_VERSION") or None,
    "postgresql": os.environ.get("CHARTLINE_PG_VERSION") or None,
    "nats_server": os.environ.get("CHARTLINE_NATS_VERSION") or None,
}

benchmarks = {}
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    name = os.path.splitext(os.path.basename(path))[0]
    if name == "report":
        continue
    try:
        with open(path) as f:
            benchmarks[name] = json.load(f)
    except (OSError, ValueError) as error:
        print(f"skipping {path}: {error}", file=sys.stderr)


def figures_of(data):
    """Figures in the store benchmark's shape; other shapes are flattened to numbers."""
    if isinstance(data, dict) and isinstance(data.get("figures"), list):
        return data["figures"]
    flat = []

    def walk(prefix, value):
        if isinstance(value, bool) or value is None:
            return
        if isinstance(value, (int, float)):
            flat.append({"name": prefix, "value": value, "unit": "", "target": None, "pass": None})
        elif isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)

    walk("", data)
    return flat


report = {"machine": machine, "benchmarks": {}}
for name, data in benchmarks.items():
    report["benchmarks"][name] = {"figures": figures_of(data), "raw": data}

with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(report, f, indent=2)


def fmt(value):
    if not isinstance(value, (int, float)):
        return str(value)
    if value != value:  # NaN
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


lines = ["# Chartline benchmark report", "", "## Machine", ""]
for key, value in machine.items():
    lines.append(f"- {key}: {value if value is not None else 'unknown'}")
passed = missed = 0
for name, bench in report["benchmarks"].items():
    lines += ["", f"## {name}", "", "| figure | value | unit | vs raw PG | target | result |", "|---|---:|---|---:|---|---|"]
    for fig in bench["figures"]:
        ratio = fig.get("ratio_to_raw")
        result = {True: "pass", False: "**miss**"}.get(fig.get("pass"), "")
        passed += fig.get("pass") is True
        missed += fig.get("pass") is False
        lines.append(
            f"| {fig.get('name')} | {fmt(fig.get('value'))} | {fig.get('unit') or ''} | "
            f"{f'{ratio * 100:.0f}%' if isinstance(ratio, (int, float)) else ''} | "
            f"{fig.get('target') or ''} | {result} |"
        )
lines += ["", f"Targets: {passed} pass, {missed} miss.", ""]
with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(lines))
print(f"wrote {out}/report.json and {out}/report.md ({passed} pass, {missed} miss)")
PY
