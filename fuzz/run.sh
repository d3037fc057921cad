#!/usr/bin/env bash
# Coverage-guided fuzzing of Stella's untrusted-input surfaces (cargo-fuzz + libFuzzer, ASan).
#
# Usage: fuzz/run.sh [SECONDS]     (from anywhere; SECONDS per target, default 20)
#
#   fuzz/run.sh          quick pass, about two minutes of fuzzing plus the build
#   fuzz/run.sh 3600     long run: one hour per target (five hours in all)
#
# Targets (fuzz/fuzz_targets/):
#   job_envelope   JobVerifier::verify on raw bytes; signed structured jobs, damaged by byte
#                  flips/overwrites/truncation, are accepted only when untouched, and untouched
#                  ones get exactly the refusal the documented order of checks predicts
#   dsse_envelope  Envelope JSON -> TrustedKeys::verify, decode_payload, pae
#   agent_frames   prost decoding of AgentMessage / PlaneMessage; re-encode/decode round trip
#   csr            CertificateAuthority::sign_agent_csr on PEM text and PEM-armoured raw bytes;
#                  whatever is issued names the plane's agent id, not the CSR's
#   receipt        Envelope JSON -> verify_receipt against a fixed agent certificate
#
# What it does: installs cargo-fuzz if missing (`cargo install cargo-fuzz --locked`), writes the
# seed corpora (valid signed envelopes, receipts, CSRs, frames; see fuzz/seeds.rs) into
# fuzz/corpus/<target>/, builds every target, runs each for SECONDS with -max_total_time and
# prints one line per target (runs, coverage, corpus size). Inputs that grow coverage stay in
# fuzz/corpus/, so later runs resume from there. Exits non-zero if any target crashed, timed out
# or ran out of memory; the reproducer is in fuzz/artifacts/<target>/ and the full libFuzzer
# log in fuzz/target/run-logs/<target>.log.
#
# Requires only rustup with the nightly toolchain (`rustup toolchain install nightly`). Builds
# go to fuzz/target (not the workspace's target dir). Useful by hand, from the repository root:
#   cargo +nightly fuzz run job_envelope -- -max_total_time=600        # one target
#   cargo +nightly fuzz run csr fuzz/artifacts/csr/crash-<sha1>          # reproduce a crash
#   cargo +nightly fuzz fmt csr fuzz/artifacts/csr/crash-<sha1>          # show it (Debug)
#   cargo +nightly fuzz cmin job_envelope                               # shrink a corpus
#   cargo +nightly fuzz coverage receipt                                # coverage data (needs llvm-tools)
set -euo pipefail

SECS="${1:-20}"
if ! [[ "$SECS" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS per target, a positive integer]" >&2
    exit 2
fi

FUZZ_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$FUZZ_DIR")"
cd "$ROOT"

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck disable=SC1091
    . "$HOME/.cargo/env"
fi
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "run.sh: the nightly toolchain is required: rustup toolchain install nightly" >&2
    exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "run.sh: installing cargo-fuzz" >&2
    cargo +nightly install cargo-fuzz --locked
fi

FUZZ=(cargo +nightly fuzz)
FUZZ_OPTS=(--fuzz-dir "$FUZZ_DIR")

echo "== seeds"
(cd "$FUZZ_DIR" && cargo +nightly run --quiet --example seeds -- corpus)

echo "== build"
"${FUZZ[@]}" build "${FUZZ_OPTS[@]}"

mapfile -t TARGETS < <("${FUZZ[@]}" list "${FUZZ_OPTS[@]}")
LOG_DIR="$FUZZ_DIR/target/run-logs"
mkdir -p "$LOG_DIR"

echo "== fuzzing ${#TARGETS[@]} targets, ${SECS}s each"
failed=()
for t in "${TARGETS[@]}"; do
    log="$LOG_DIR/$t.log"
    mkdir -p "$FUZZ_DIR/corpus/$t" "$FUZZ_DIR/artifacts/$t"
    status=0
    "${FUZZ[@]}" run "${FUZZ_OPTS[@]}" "$t" -- \
        -max_total_time="$SECS" -timeout=30 -print_final_stats=1 >"$log" 2>&1 || status=$?
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)"
    speed="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)"
    # The last status line, e.g. "#123456 DONE cov: 2345 ft: 6789 corp: 321/45Kb ...".
    last="$(grep -E '^#[0-9]+[[:space:]]' "$log" | tail -n1 || true)"
    cov="$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")"
    ft="$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")"
    corp="$(sed -nE 's/.* corp: ([0-9]+\/[0-9]+[a-zA-Z]*).*/\1/p' <<<"$last")"
    if [ "$status" -eq 0 ]; then
        verdict=ok
    else
        verdict="FAILED (exit $status)"
        failed+=("$t")
    fi
    printf '%-14s %s  runs=%s exec/s=%s cov=%s ft=%s corpus=%s  log=%s\n' \
        "$t" "$verdict" "${runs:-?}" "${speed:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" \
        "${log#"$ROOT"/}"
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "== FAILED: ${failed[*]}" >&2
    for t in "${failed[@]}"; do
        echo "--- $t: $(ls -t "$FUZZ_DIR/artifacts/$t" 2>/dev/null | head -n1)" >&2
        grep -E -A30 "panicked at|ERROR: (AddressSanitizer|libFuzzer)|SUMMARY" \
            "$LOG_DIR/$t.log" | head -n60 >&2 || true
    done
    exit 1
fi
echo "== all ${#TARGETS[@]} targets ran ${SECS}s without a crash"
