#!/usr/bin/env bash
# The offline GPU kit: prove the harness's CUDA path on a lent GPU in one run of about 8 minutes.
# Run from anywhere; it works in the repository root. Documented in ci/gpu/README.md.
#
#   bash ci/gpu/run.sh                      # on the GPU machine (OUT set by the device tool)
#   OUT=/tmp/out bash ci/gpu/run.sh --devices cpu --llama tiny --run-models tiny-llama \
#       --suite-models tiny-llama --precisions fp32,nf4      # the CPU rehearsal
#   bash ci/gpu/run.sh --plan               # print the steps and their commands, run nothing
#
# Steps (each under `timeout`, all under one deadline, --budget-s): machine facts; offline install
# of what the image lacks from the wheelhouse; zoo (carried zoo.tar, the rest built) in the
# background; a random 1.1B Llama made on the device + a torch.profiler trace of one decode step;
# `harness run` over the run models and the 1B in every precision, NVML process list sampled; a
# --memory-limit run that must end as CUDA oom; the pytest suites on the zoo, sampled too;
# `python ci/gpu/cudacheck.py` on each run dir; run dirs tarred into $OUT (<= 8 files, 16 MiB each).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEVICES=cuda
PRECISIONS=fp32,fp16,bf16,int8,nf4,nf4-dq,fp4
RUN_MODELS=tiny-llama-trained
SUITE_MODELS=tiny-llama,tiny-gpt2,tiny-bert,tiny-llama-trained
LLAMA=1b
BUDGET_S=500
MEMLIMIT=auto
RUN_ARGS=""
PLAN=0
OUT_DIR=${OUT:-}
WORK=${GPU_KIT_WORK:-/tmp/gpu-kit}
WHEELHOUSE=$REPO/ci/gpu/wheelhouse
PY=${PYTHON:-python3}
RESERVE_S=25   # kept back from every step for the checks, the tarballs and the final table
MAX_OUT_BYTES=$((16 << 20))

usage() {
    sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    cat <<EOF
options: --devices cuda|cpu  --precisions LIST  --run-models LIST  --suite-models LIST (empty: no suites)
         --llama 1b|tiny|none  --budget-s N (default $BUDGET_S)  --memlimit on|off (default: on for cuda)
         --run-args "ARGS" (appended to harness run, e.g. "--no-quality --repeats 1": later flags win)
         --out DIR (default \$OUT)  --work DIR (default $WORK)  --wheelhouse DIR  --plan
EOF
}

while (($#)); do
    case $1 in
        --devices) DEVICES=$2; shift 2 ;;
        --precisions) PRECISIONS=$2; shift 2 ;;
        --run-models) RUN_MODELS=$2; shift 2 ;;
        --suite-models) SUITE_MODELS=$2; shift 2 ;;
        --llama) LLAMA=$2; shift 2 ;;
        --budget-s) BUDGET_S=$2; shift 2 ;;
        --memlimit) MEMLIMIT=$2; shift 2 ;;
        --run-args) RUN_ARGS=$2; shift 2 ;;
        --out) OUT_DIR=$2; shift 2 ;;
        --work) WORK=$2; shift 2 ;;
        --wheelhouse) WHEELHOUSE=$2; shift 2 ;;
        --plan) PLAN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case $DEVICES in cuda|cpu) ;; *) echo "run.sh: --devices is cuda or cpu, got $DEVICES" >&2; exit 2 ;; esac
case $LLAMA in 1b|tiny|none) ;; *) echo "run.sh: --llama is 1b, tiny or none, got $LLAMA" >&2; exit 2 ;; esac
[[ $MEMLIMIT == auto ]] && { [[ $DEVICES == cuda ]] && MEMLIMIT=on || MEMLIMIT=off; }
if ((!PLAN)) && [[ -z $OUT_DIR ]]; then echo "run.sh: set OUT or pass --out DIR" >&2; exit 2; fi

cd "$REPO" || exit 2
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
LLAMA_DIR=$WORK/models/llama-$LLAMA
PROFILE_STEPS=32
[[ $DEVICES == cpu ]] && PROFILE_STEPS=4
read -ra RUN_ARGV <<<"$RUN_ARGS"
REPORTS=$WORK/reports
SITE=$WORK/site
export HARNESS_ZOO_DIR=${HARNESS_ZOO_DIR:-$WORK/zoo}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
STEPS=()
FAILED=0
BACKGROUND=()

TEE_PID=
if ((!PLAN)); then
    mkdir -p "$OUT_DIR" "$WORK"
    rm -rf "$REPORTS" "$WORK"/nvml-*.jsonl  # a rerun on a warm machine starts its run dirs afresh
    exec > >(tee -a "$OUT_DIR/gpu-kit.log") 2>&1
    TEE_PID=$!
fi

finish() {  # stop what runs in the background, and let tee write the log's last lines
    local pid
    for pid in "${BACKGROUND[@]}"; do kill "$pid" 2>/dev/null; done
    if [[ -n $TEE_PID ]]; then
        exec 1>&- 2>&-
        wait "$TEE_PID" 2>/dev/null
    fi
}
trap finish EXIT

# run_step NAME CAP_S COMMAND...: run under `timeout`, capped by what the deadline leaves; record rc and time.
run_step() {
    local name=$1 cap=$2
    shift 2
    local left=$((DEADLINE - $(date +%s) - RESERVE_S))
    if ((PLAN)); then
        printf '== %-14s (cap %ss) %s\n' "$name" "$cap" "$*"
        return 0
    fi
    if ((left < 10)); then
        echo "== $name: skipped, ${left}s of the budget left"
        STEPS+=("$(printf '%-16s skipped (budget)' "$name")")
        FAILED=1
        return 99
    fi
    ((cap > left)) && cap=$left
    echo "== $name (cap ${cap}s, $(($(date +%s) - START))s into the run): $*"
    local t0 rc
    t0=$(date +%s)
    if declare -F "$1" >/dev/null; then
        "$@"  # a function of this script: bounded by its own commands
    else
        timeout --kill-after=15 "$cap" "$@"
    fi
    rc=$?
    STEPS+=("$(printf '%-16s rc=%-4s %4ss' "$name" "$rc" "$(($(date +%s) - t0))")")
    ((rc == 124)) && echo "== $name: cut off at its ${cap}s cap"
    ((rc != 0)) && FAILED=1
    return $rc
}

# Processes still holding the GPU between steps would distort the next one: say so.
gpu_leftovers() {
    [[ $DEVICES == cuda ]] && command -v nvidia-smi >/dev/null || return 0
    local apps
    apps=$(nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader 2>/dev/null)
    [[ -n $apps ]] && echo "!! processes still on the GPU after $1: $apps"
    return 0
}

sampler_start() {  # sampler_start LOG: NVML's process list, with roles, until sampler_stop
    SAMPLER_PID=
    [[ $DEVICES == cuda ]] || return 0
    if ((PLAN)); then echo "== nvml-sampler   $PY ci/gpu/nvml_sampler.py --out $1 (background)"; return 0; fi
    "$PY" ci/gpu/nvml_sampler.py --out "$1" --interval 0.2 &
    SAMPLER_PID=$!
    BACKGROUND+=("$SAMPLER_PID")
}

sampler_stop() {
    [[ -n ${SAMPLER_PID:-} ]] || return 0
    kill -TERM "$SAMPLER_PID" 2>/dev/null
    wait "$SAMPLER_PID" 2>/dev/null
    SAMPLER_PID=
}

# wheels_to_install: the wheelhouse's wheels whose distribution this python lacks (not the harness's own).
wheels_to_install() {
    local wheel name
    for wheel in "$WHEELHOUSE"/*.whl; do
        [[ -e $wheel ]] || continue
        name=$(basename "$wheel" | cut -d- -f1)
        [[ $name == harness ]] && continue
        "$PY" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$name" 2>/dev/null || echo "$wheel"
    done
}

install_offline() {
    rm -rf "$SITE" "$WORK/src"
    mkdir -p "$SITE" "$WORK/src"
    local wheels
    mapfile -t wheels < <(wheels_to_install)
    if ((${#wheels[@]})); then
        echo "installing from $WHEELHOUSE: ${wheels[*]##*/}"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "${wheels[@]}" || return 1
    else
        echo "nothing to install from the wheelhouse: this python has every carried distribution"
    fi
    # The harness's distribution (its `harness` command and pytest11 entry point) from the wheelhouse;
    # built offline from the tree if the wheel is missing. The code itself is always the tree's: the
    # repo root (cwd of `python -m`, or put first by the kit's scripts) precedes PYTHONPATH.
    local harness_wheels=("$WHEELHOUSE"/harness-*.whl)
    if [[ -e ${harness_wheels[0]} ]]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "${harness_wheels[@]}" || return 1
    else
        echo "no harness wheel in $WHEELHOUSE: building the harness from the tree, offline"
        cp -r harness pyproject.toml README.md "$WORK/src/"
        "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
            --upgrade --target "$SITE" "$WORK/src" || return 1
    fi
    PYTHONPATH=$SITE "$PY" -c 'import harness, importlib.metadata as m; print("harness", m.version("harness"), "imports from", harness.__file__)'
}

zoo_models() {  # the zoo names among the run and suite models
    local names
    names=$(echo "$RUN_MODELS,$SUITE_MODELS" | tr ',' '\n' | grep -xE 'tiny-llama|tiny-gpt2|tiny-bert|tiny-llama-trained' | sort -u | paste -sd, -)
    echo "$names"
}

copy_configs() {  # copy_configs RUN_DIR: the config.json of every model it ran, for cudacheck on the CPU side
    local run_dir=$1 name
    mkdir -p "$run_dir/model-configs"
    for name in $(echo "$RUN_MODELS,$SUITE_MODELS" | tr ',' ' '); do
        [[ -f $HARNESS_ZOO_DIR/$name/config.json ]] && cp "$HARNESS_ZOO_DIR/$name/config.json" "$run_dir/model-configs/$name.json"
    done
    [[ -f $LLAMA_DIR/config.json ]] && cp "$LLAMA_DIR/config.json" "$run_dir/model-configs/$(basename "$LLAMA_DIR").json"
    return 0
}

pack() {  # pack NAME: $REPORTS/NAME -> $OUT/run-NAME.tgz (reference outputs left out; logs too if over 16 MiB)
    local name=$1 tarball=$OUT_DIR/run-$1.tgz
    [[ -d $REPORTS/$name ]] || return 0
    tar -czf "$tarball" -C "$REPORTS" --exclude="$name/reference" "$name"
    if (($(stat -c %s "$tarball") > MAX_OUT_BYTES)); then
        echo "!! $tarball is over 16 MiB: packing it again without logs/ and traces"
        tar -czf "$tarball" -C "$REPORTS" --exclude="$name/reference" --exclude="$name/logs" \
            --exclude='*trace.json.gz' "$name"
    fi
    echo "packed $tarball ($(($(stat -c %s "$tarball") / 1024)) KiB)"
}

# --- 1. what the machine has ------------------------------------------------------------------
echo "gpu kit: devices=$DEVICES precisions=$PRECISIONS run-models=$RUN_MODELS,llama-$LLAMA suite-models=$SUITE_MODELS"
echo "         budget ${BUDGET_S}s, work $WORK, out ${OUT_DIR:-<plan>}, zoo $HARNESS_ZOO_DIR, python $PY"
if ((!PLAN)) && [[ $DEVICES == cuda ]] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.mem --format=csv
fi
run_step facts 60 "$PY" ci/gpu/facts.py --freeze "${OUT_DIR:-/tmp}/image-packages.txt"

# --- 2. offline install ---------------------------------------------------------------------------
if ((PLAN)); then
    printf '== %-14s pip install --no-index --no-deps --target %s <the wheels of %s this python lacks> + the harness\n' \
        install "$SITE" "$WHEELHOUSE"
else
    run_step install 120 install_offline
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}

# --- 3. zoo (background) and the Llama (foreground, on the device) ---------------------------------
ZOO_BUILD=$(zoo_models)
if ((!PLAN)); then
    mkdir -p "$HARNESS_ZOO_DIR"
    if [[ -f $WHEELHOUSE/zoo.tar ]]; then
        tar -xf "$WHEELHOUSE/zoo.tar" -C "$HARNESS_ZOO_DIR" --skip-old-files && echo "zoo: unpacked the carried zoo.tar"
    fi
fi
ZOO_PID=
if [[ -n $ZOO_BUILD ]]; then
    if ((PLAN)) || [[ ! -f $HARNESS_ZOO_DIR/_tokenizer/tokenizer.json ]]; then
        run_step zoo 240 "$PY" -m harness.cli zoo build "$ZOO_BUILD"   # trains the tokenizer first: not beside the Llama
    else
        echo "== zoo (background): $PY -m harness.cli zoo build $ZOO_BUILD > $WORK/zoo-build.log"
        "$PY" -m harness.cli zoo build "$ZOO_BUILD" >"$WORK/zoo-build.log" 2>&1 &
        ZOO_PID=$!
        BACKGROUND+=("$ZOO_PID")
    fi
fi
LLAMA_MODELS=  # the Llama goes first in the harness run: its numbers are the anchors' counterpart
if [[ $LLAMA != none ]]; then
    if ((!PLAN)) && [[ -f $LLAMA_DIR/build-facts.json && -f $WORK/profile/summary.json ]]; then
        echo "== llama: $LLAMA_DIR and its profile are here from an earlier run on this machine: kept"
        LLAMA_MODELS=$LLAMA_DIR,
    elif run_step llama 180 "$PY" ci/gpu/build_llama.py "$LLAMA_DIR" --preset "$LLAMA" --device "$DEVICES" \
        --profile-out "$WORK/profile" --profile-steps "$PROFILE_STEPS"; then
        LLAMA_MODELS=$LLAMA_DIR,
    fi
fi
if [[ -n $ZOO_PID ]]; then
    wait "$ZOO_PID"
    rc=$?
    cat "$WORK/zoo-build.log"
    STEPS+=("$(printf '%-16s rc=%-4s (background)' zoo "$rc")")
    ((rc != 0)) && FAILED=1
fi
gpu_leftovers "the Llama build"

# --- 4. harness run over the Llama and the run models, every precision -----------------------------
sampler_start "$WORK/nvml-harness.jsonl"
run_step harness-run 300 "$PY" -m harness.cli run --devices "$DEVICES" --models "$LLAMA_MODELS$RUN_MODELS" \
    --precisions "$PRECISIONS" --repeats 2 --timing-repeats 3 --new-tokens 32 --timeout 150 \
    --out "$REPORTS" --run-id harness --no-report "${RUN_ARGV[@]}"
sampler_stop
gpu_leftovers "harness run"

# --- 5. --memory-limit on the device: the 1B in fp32 (4.4 GB) under 2 GiB must be a CUDA oom ---------
if [[ $MEMLIMIT == on && -n $LLAMA_MODELS ]]; then
    run_step memlimit 90 "$PY" -m harness.cli run --devices "$DEVICES" --models "$LLAMA_DIR" --precisions fp32 \
        --memory-limit 2G --no-preflight --repeats 1 --no-throughput --no-quality --timeout 120 --out "$REPORTS" \
        --run-id memlimit --no-report
fi

# --- 6. the pytest suites on the zoo, in whatever the deadline leaves ---------------------------------
if [[ -n $SUITE_MODELS ]]; then
    sampler_start "$WORK/nvml-suites.jsonl"
    # Only the two plugins the suites use: the image's other pytest plugins (jax, hypothesis, cov...) stay out.
    run_step suites 180 env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "$PY" -m pytest suites/ -q -p no:cacheprovider \
        -p harness.plugin -p pytest_benchmark.plugin --devices "$DEVICES" --models "$SUITE_MODELS" \
        --precisions "$PRECISIONS" --reports-dir "$REPORTS" --run-id suites
    sampler_stop
    gpu_leftovers "the suites"
fi

# --- 7. checks and packing ---------------------------------------------------------------------------
if ((PLAN)); then
    echo "== cudacheck      $PY ci/gpu/cudacheck.py $REPORTS/{harness,suites}$([[ $DEVICES == cuda ]] && echo ' --require-cuda'); memlimit with --expect-oom"
    echo "== pack           ${OUT_DIR:-\$OUT}/run-{harness,suites,memlimit}.tgz, cudacheck.txt, image-packages.txt, gpu-kit.log"
    exit 0
fi
REQUIRE=()
[[ $DEVICES == cuda ]] && REQUIRE=(--require-cuda)
: >"$OUT_DIR/cudacheck.txt"
for name in harness suites memlimit; do
    run_dir=$REPORTS/$name
    [[ -f $run_dir/results.jsonl ]] || { [[ $name != memlimit || $MEMLIMIT == on ]] && echo "!! no $run_dir/results.jsonl"; continue; }
    copy_configs "$run_dir"
    [[ -f $WORK/nvml-$name.jsonl ]] && cp "$WORK/nvml-$name.jsonl" "$run_dir/nvml.jsonl"
    if [[ $name == harness && -d $WORK/profile ]]; then
        cp -r "$WORK/profile" "$run_dir/profile"
        [[ -f $LLAMA_DIR/build-facts.json ]] && cp "$LLAMA_DIR/build-facts.json" "$run_dir/profile/"
    fi
    if [[ $name == memlimit ]]; then
        "$PY" ci/gpu/cudacheck.py "$run_dir" --expect-oom | tee -a "$OUT_DIR/cudacheck.txt"
    else
        "$PY" ci/gpu/cudacheck.py "$run_dir" "${REQUIRE[@]}" | tee -a "$OUT_DIR/cudacheck.txt"
    fi
    ((PIPESTATUS[0] != 0)) && FAILED=1
    pack "$name"
done

echo
echo "== steps (rc, seconds); whole run $(($(date +%s) - START))s of a ${BUDGET_S}s budget"
printf '   %s\n' "${STEPS[@]}"
grep -E '^(cudacheck|PASS|FAIL|SKIP) ' "$OUT_DIR/cudacheck.txt" | cut -c1-230
echo "gpu kit: $([[ $FAILED == 0 ]] && echo 'all steps and checks passed' || echo 'SOMETHING FAILED: read the lines above')"
exit "$FAILED"
