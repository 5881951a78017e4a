#!/usr/bin/env bash
# Short fuzz run of every cargo-fuzz target in tests/fuzz (a cloud frame, a spool segment, the
# config file, a local API line): builds them, runs each for SECONDS_PER_TARGET (default 60), prints
# the executions per target and any crash artefact, and exits non-zero when a target crashed.
# Not part of CI's test command.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]
#
# Environment: FUZZ_SANITIZER (default `none`: the fuzzed code is safe Rust, and no sanitizer runs
# several times faster; `address` for ASan), FUZZ_TARGETS (space-separated subset to run).
# New inputs that find coverage are kept in tests/fuzz/corpus/<target>/ (git-ignored; only the
# `seed-*` files are committed), crashes in tests/fuzz/artifacts/<target>/, the last run's
# libFuzzer logs in tests/fuzz/target/logs/.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-60}
if ! [[ $secs =~ ^[0-9]+$ ]] || ((secs == 0)); then
    echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET]" >&2
    exit 2
fi
fuzz_dir=tests/fuzz
sanitizer=${FUZZ_SANITIZER:-none}
# libFuzzer's instrumentation needs rustc's -Z flags; this lets the stable toolchain take them.
export RUSTC_BOOTSTRAP=1
started=$SECONDS

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

# Release build with debug assertions and overflow checks on: an overflow is a finding too.
cargo fuzz build --fuzz-dir "$fuzz_dir" --release --debug-assertions --sanitizer "$sanitizer"
build_secs=$((SECONDS - started))
bin_dir=$fuzz_dir/target/$(rustc -vV | sed -n 's/^host: //p')/release
targets=${FUZZ_TARGETS:-$(cargo fuzz list --fuzz-dir "$fuzz_dir")}

# No target needs a network, and config's validate() may hand a malformed dotted-digit server to
# the system resolver: run the targets in an empty network namespace so nothing leaves the machine.
# Without one, the config target skips validate() for such servers (see its file comment).
isolate=()
offline=0
if unshare --net true 2>/dev/null; then
    isolate=(unshare --net)
    offline=1
else
    echo "fuzz: cannot create a network namespace; config skips validate() on dotted-digit servers" >&2
fi

# The spool target writes a segment file per input: keep its scratch directory in memory.
scratch_parent=/tmp
[[ -d /dev/shm && -w /dev/shm ]] && scratch_parent=/dev/shm
scratch=$(mktemp -d "$scratch_parent/edgehub-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$fuzz_dir/target/logs"

failed=0
summary=()
for target in $targets; do
    corpus=$fuzz_dir/corpus/$target
    artifacts=$fuzz_dir/artifacts/$target
    log=$fuzz_dir/target/logs/$target.log
    mkdir -p "$corpus" "$artifacts"
    echo "fuzz: $target for ${secs}s" >&2
    t0=$SECONDS
    rc=0
    TMPDIR=$scratch EDGEHUB_FUZZ_OFFLINE=$offline "${isolate[@]}" "$bin_dir/$target" \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" "$corpus" >"$log" 2>&1 || rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    corpus_files=$(find "$corpus" -type f | wc -l)
    result=ok
    if ((rc != 0)); then
        failed=1
        result="FAILED (exit $rc)"
        echo "---- $target: last lines of $log" >&2
        tail -n 30 "$log" >&2
        while IFS= read -r artefact; do
            result+=" artefact: $artefact"
        done < <(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log")
    fi
    if ((rc == 0)); then
        # libFuzzer keeps every input that once added coverage; merge the corpus down to a set
        # with the same coverage (seeds kept first) so it does not grow with each run.
        merged=$scratch/merged-$target
        mkdir -p "$merged"
        find "$corpus" -maxdepth 1 -type f -name 'seed-*' -exec cp {} "$merged/" \;
        if TMPDIR=$scratch EDGEHUB_FUZZ_OFFLINE=$offline "${isolate[@]}" "$bin_dir/$target" \
            -merge=1 -timeout=10 "$merged" "$corpus" >>"$log" 2>&1; then
            find "$corpus" -maxdepth 1 -type f ! -name 'seed-*' -delete
            find "$merged" -maxdepth 1 -type f ! -name 'seed-*' -exec mv {} "$corpus/" \;
        fi
        rm -rf "$merged"
        corpus_files=$(find "$corpus" -type f | wc -l)
    fi
    summary+=("$(printf '%-16s %12s execs %5ss  corpus %5s files  %s' \
        "$target" "${execs:-?}" "$((SECONDS - t0))" "$corpus_files" "$result")")
done

echo
echo "fuzz summary (sanitizer $sanitizer, ${secs}s per target, build ${build_secs}s, total $((SECONDS - started))s):"
printf '  %s\n' "${summary[@]}"
if ((failed)); then
    echo "fuzz: crash found; reproduce with: RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir $fuzz_dir -s $sanitizer <target> <artefact>" >&2
fi
exit "$failed"
