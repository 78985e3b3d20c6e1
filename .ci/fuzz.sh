#!/usr/bin/env bash
# Short fuzz runs: every cargo-fuzz target of fuzz/ is built (nightly, AddressSanitizer) and run
# for FUZZ_SECONDS (default 30) from its committed seeds, with its dictionary. A crash, a broken
# property (the targets assert them), a timeout or an out-of-memory fails the script, printing the
# input and the command that reproduces it. The long runs are documented in fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=never
seconds=${FUZZ_SECONDS:-30}
started=$(date +%s)

# cargo-fuzz passes -Zsanitizer=address and the sancov flags: nightly only.
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
fi
if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz 0.13.2" ]; then
    cargo install cargo-fuzz --version 0.13.2 --locked
fi

# The fuzz crate is its own workspace: the root's fmt, clippy and lockfile checks do not see it.
cargo fmt --check --manifest-path fuzz/Cargo.toml
cargo metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null

mapfile -t targets < <(cargo +nightly fuzz list)
[ "${#targets[@]}" -ge 5 ] || { echo "fuzz.sh: expected 5 targets, found: ${targets[*]}" >&2; exit 1; }
cargo +nightly fuzz build
built=$(date +%s)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "$work/$t/corpus" "$work/$t/artifacts"
    echo "== fuzz $t: ${seconds}s from fuzz/seeds/$t"
    # New inputs go to a scratch corpus; the committed seeds are only read.
    if ! cargo +nightly fuzz run "$t" "$work/$t/corpus" "fuzz/seeds/$t" -- \
        -max_total_time="$seconds" -dict="fuzz/dicts/$t.dict" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$work/$t/artifacts/" -print_final_stats=1 >"$work/$t/log" 2>&1; then
        tail -n 60 "$work/$t/log" >&2
        for a in "$work/$t"/artifacts/*; do
            [ -e "$a" ] || continue
            mkdir -p fuzz/artifacts/"$t"
            cp "$a" fuzz/artifacts/"$t"/
            echo "fuzz.sh: $t failed on fuzz/artifacts/$t/$(basename "$a") ($(wc -c <"$a") bytes):" >&2
            od -A x -t x1z "$a" | head -n 20 >&2
            echo "reproduce: cargo +nightly fuzz run $t fuzz/artifacts/$t/$(basename "$a")" >&2
        done
        echo "fuzz.sh: FAILED: target $t" >&2
        exit 1
    fi
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec)|^#[0-9]+.*DONE' "$work/$t/log" |
        tr '\n' ' '
    echo
done
echo "fuzz.sh: ${#targets[@]} targets, ${seconds}s each, 0 crashes (build $((built - started))s, total $(($(date +%s) - started))s)"
