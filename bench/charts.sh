#!/usr/bin/env bash
# Regenerates the benchmark charts: builds the release binaries, runs threaded.sh
# and overhead.sh with RESULTS_OUT into bench/results/ (the JSON lines and the
# printed tables), then bench/plot.py into docs/img/bench-threaded.png and
# docs/img/bench-overhead.png. Commit all four result files and both images.
#
# The machine must be quiet: this refuses to start while another cargo/rustc is
# running (FORCE=1 starts anyway and says so), checks again after its own build,
# and if one ran during the measurement (sampled every 2 s) says so in red on the
# charts and exits 4 (0 with FORCE=1). With the defaults it takes about 7 minutes
# after the build (threaded.sh ~5.5: 4 targets x 3 loads x ~25 s; overhead.sh
# ~1.5: 6 rows x ~13 s).
#
# Env: RESULTS_DIR (bench/results), IMG_DIR (docs/img), BENCHES ("threaded
#      overhead"), FORCE=1, NO_BUILD=1, SVG=1 (also .svg), and everything the two
#      scripts read (BENCH_SECS, WARMUP_SECS, LOADS, TARGETS, ONLY, ...; note that
#      BENCH_SECS applies to both). Results are written to a temporary file and
#      moved into RESULTS_DIR only when the run succeeded.
set -euo pipefail
BENCH_DIR="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$BENCH_DIR/.." && pwd)"
RESULTS_DIR="${RESULTS_DIR:-$REPO/bench/results}"
IMG_DIR="${IMG_DIR:-$REPO/docs/img}"
BENCHES="${BENCHES:-threaded overhead}"

say() { printf '== charts: %s\n' "$*" >&2; }
loud() { printf '\n!!!!!!!! %s\n\n' "$*" >&2; }

# Compilers and anything else that would eat a core during the measurement:
# "PID NAME" lines (busy) or one line "NAME NAME ..." (busy_names).
BUSY_RE='cargo|rustc|cc1|cc1plus|ld|clippy-driver|rust-analyzer'
busy() { pgrep -l -x "$BUSY_RE" 2>/dev/null || true; }
busy_names() { pgrep -l -x "$BUSY_RE" 2>/dev/null | awk '{print $2}' | sort | uniq -c | xargs || true; }

quiet_or_refuse() {  # WHEN
  local b
  b="$(busy)"
  [[ -z "$b" ]] && return 0
  if [[ -n "${FORCE:-}" ]]; then
    loud "other builds are running $1 (FORCE=1: measuring anyway; the numbers will be distorted):"
    echo "$b" >&2
    return 0
  fi
  say "refusing to measure: other builds are running $1 (the machine must be quiet):"
  echo "$b" >&2
  say "wait for them to finish, or FORCE=1 to measure anyway"
  exit 3
}

python3 -c 'import matplotlib' 2>/dev/null || {
  say "bench/plot.py needs matplotlib: python3 -m pip install matplotlib"; exit 2; }

quiet_or_refuse "before the build"
say "load average: $(cut -d' ' -f1-3 /proc/loadavg)"

# The commit that is built and measured (the results record it, not the HEAD of
# whenever a run finishes).
BENCH_COMMIT="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
BENCH_DIRTY=false
[[ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]] && BENCH_DIRTY=true
export BENCH_COMMIT BENCH_DIRTY
say "commit $BENCH_COMMIT$([[ $BENCH_DIRTY == true ]] && echo ' + uncommitted changes')"

if [[ -z "${NO_BUILD:-}" ]]; then
  say "cargo build --release --workspace --bins"
  (cd "$REPO" && cargo build --release --workspace --bins)
fi
quiet_or_refuse "after the build"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/usher-charts.XXXXXX")"
SAMPLER=""
cleanup() {
  [[ -n "$SAMPLER" ]] && kill "$SAMPLER" 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Every 2 s, note any compiler that runs during the measurement.
( while sleep 2; do b="$(busy_names)"; [[ -n "$b" ]] && printf '%s %s\n' "$(date +%T)" "$b"; done ) \
  >"$TMP/busy.log" 2>/dev/null &
SAMPLER=$!

mkdir -p "$RESULTS_DIR"
files=()
for bench in $BENCHES; do
  case "$bench" in threaded | overhead) ;; *) say "unknown bench $bench"; exit 2 ;; esac
  say "bench/$bench.sh"
  start=$SECONDS
  NO_BUILD=1 RESULTS_OUT="$TMP/$bench.jsonl" "$BENCH_DIR/$bench.sh" | tee "$TMP/$bench.txt"
  say "bench/$bench.sh took $((SECONDS - start)) s"
  mv "$TMP/$bench.jsonl" "$RESULTS_DIR/$bench.jsonl"
  mv "$TMP/$bench.txt" "$RESULTS_DIR/$bench.txt"
  files+=("$RESULTS_DIR/$bench.jsonl")
done

kill "$SAMPLER" 2>/dev/null || true
wait "$SAMPLER" 2>/dev/null || true
SAMPLER=""

plot_args=(--out-dir "$IMG_DIR")
[[ -n "${SVG:-}" ]] && plot_args+=(--svg)
samples=0
[[ -s "$TMP/busy.log" ]] && samples="$(wc -l <"$TMP/busy.log")"
if ((samples)); then
  plot_args+=(--note "builds (cargo/rustc/cc/ld) were running during $((samples * 2)) s of the measurement: the figures are distorted")
fi
python3 "$BENCH_DIR/plot.py" "${plot_args[@]}" "${files[@]}"

if ((samples)); then
  loud "builds ran during the measurement ($samples samples of 2 s); do not commit these numbers:"
  head -5 "$TMP/busy.log" >&2
  [[ -n "${FORCE:-}" ]] || exit 4
fi
say "done: ${files[*]} and the charts in $IMG_DIR"
