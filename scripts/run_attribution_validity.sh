#!/usr/bin/env bash
# Issue 12's experiment on CPU, resumable (every step skips what is done): the runs behind
# results/attribution_validity.md.
#
#   bash scripts/run_attribution_validity.sh            # two lanes of one torch thread each (2 cores)
#
# Needs two trained models (run them first, each ~15-30 min on 2 cores):
#   python train.py freeze=none callbacks=default logger=csv hydra.run.dir=logs/align_full      # full alignment
#   python train.py freeze=train_only freeze.random_share=0.02 freeze.seed=0 callbacks=default logger=csv \
#       optim.lr=1e-3 data.num_samples=640 hydra.run.dir=logs/planted2                          # planted 2% set
# Settings are variables below; DOSE_EVAL drops the harmless over-refusal task (OKTest stays), about a third of
# each point's time. A lane that fails stops with its log named; rerun the script to resume.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=${PY:-python}
ALIGNED=${ALIGNED:-logs/align_full/model}
PLANTED=${PLANTED:-logs/planted2/model}
V=${V:-logs/validity}
CAL=${CAL:-"calibration.nsamples=128 calibration.max_length=192"}
DOSE_EVAL=${DOSE_EVAL:-"eval.tasks.harmless=null"}
RESULTS=${RESULTS:-results/attribution_validity}
declare -A SCORER=(
  [wifv]="scoring=wifv"
  [wifv_decision]="scoring=wifv scoring.tokens=decision"
  [activation_decision]="scoring=activation scoring.tokens=decision"
  [snip]="scoring=snip"
  [contrast]="scoring=contrast"
  [refusal_direction]="scoring=refusal_direction"
)

attribute() {  # attribute <model dir | shipped> <run dir> <overrides...>
  local model=$1 dir=$2; shift 2
  [[ -f $dir/unit_map.safetensors ]] && return 0
  local which=(model=hf model.path="$model")
  [[ $model == shipped ]] && which=(model=smollm2_135m)
  $PY attribute.py "${which[@]}" $CAL "$@" hydra.run.dir="$dir" > "$dir.log" 2>&1 \
    || { echo "attribution failed: $dir.log" >&2; return 1; }
}

sweep() {  # sweep <scorer> <arms...>
  local name=$1; shift
  $PY scripts/dose_response.py --model "$ALIGNED" --unit-map "$V/maps/$name" --runs-dir "$V/dose/$name" \
    --controls-dir "$V/dose/controls" --out "$RESULTS/dose/$name" --arms "$@" -- $DOSE_EVAL \
    > "$V/dose/$name.log" 2>&1
}

wait_for() { until [[ -e $1 ]]; do sleep 30; done; sleep 20; }  # the sleep: let the writer finish

mkdir -p "$V/maps" "$V/planted" "$V/stability" "$V/dose"

lane_controls_then_sweeps() {
  wait_for "$ALIGNED/model.safetensors"
  attribute "$ALIGNED" "$V/maps/wifv" scoring=wifv
  $PY scripts/dose_response.py --model "$ALIGNED" --unit-map "$V/maps/wifv" --runs-dir "$V/dose/controls" \
    --controls-dir "$V/dose/controls" --out "$V/dose/controls_report" --arms random -- $DOSE_EVAL \
    > "$V/dose/controls.log" 2>&1
  touch "$V/dose/controls.done"
  sweep wifv safety_minus_utility utility random
  for s in contrast snip; do wait_for "$V/maps/$s/unit_map.safetensors"; sweep "$s" safety_minus_utility random; done
  [[ -f $V/cost.json ]] || $PY benchmarks/scorers.py --model-path "$ALIGNED" --json "$V/cost.json" > "$V/cost.log" 2>&1
}

lane_maps_then_sweeps() {
  wait_for "$ALIGNED/model.safetensors"
  for s in refusal_direction contrast snip wifv_decision activation_decision; do
    attribute "$ALIGNED" "$V/maps/$s" ${SCORER[$s]}
  done
  wait_for "$PLANTED/trained_units.safetensors"
  [[ -f $V/planted_eval/eval.json ]] || $PY evaluate.py model=hf model.path="$PLANTED" eval=dose \
    eval.tasks.oktest=null eval.tasks.harmless=null hydra.run.dir="$V/planted_eval" > "$V/planted_eval.log" 2>&1
  for s in "${!SCORER[@]}"; do attribute "$PLANTED" "$V/planted/$s" ${SCORER[$s]}; done
  # stability of wifv maps of the aligned model: disjoint calibration halves, sources, shipped vs aligned
  attribute "$ALIGNED" "$V/stability/half_a" scoring=wifv +calibration.safety.hash_split=[0.0,0.5] \
    calibration.utility.hash_split=[0.0,0.45]
  attribute "$ALIGNED" "$V/stability/half_b" scoring=wifv +calibration.safety.hash_split=[0.5,1.0] \
    calibration.utility.hash_split=[0.45,0.9]
  attribute "$ALIGNED" "$V/stability/wei" scoring=wifv calibration=wei
  attribute "$ALIGNED" "$V/stability/self" scoring=wifv calibration=self
  attribute shipped "$V/stability/shipped" scoring=wifv
  wait_for "$V/dose/controls.done"
  for s in refusal_direction wifv_decision activation_decision; do sweep "$s" safety_minus_utility random; done
}

report() {
  # every dose point's eval.json / eval_meta.json travel with the report (results/.../runs); the maps stay in logs
  local runs="$RESULTS/runs" sweeps=() planted=() scorers=()
  (cd "$V/dose" && find . -name eval.json -o -name eval_meta.json) | while read -r f; do
    mkdir -p "$runs/$(dirname "$f")" && cp "$V/dose/$f" "$runs/$f"
  done
  for s in wifv contrast snip refusal_direction wifv_decision activation_decision; do
    sweeps+=(--sweep "$s=$runs/$s"); planted+=(--planted-map "$s=$V/planted/$s"); scorers+=("$s=$V/maps/$s")
  done
  $PY scripts/attribution_validity.py --out "$RESULTS.md" --model-run "$(dirname "$ALIGNED")" \
    --controls-dir "$runs/controls" "${sweeps[@]}" \
    --planted "$PLANTED" --planted-eval "$V/planted_eval" "${planted[@]}" \
    --stability "calibration halves (disjoint prompts)" "half_a=$V/stability/half_a" "half_b=$V/stability/half_b" \
    --stability "calibration sources" "stl=$V/maps/wifv" "wei=$V/stability/wei" "self=$V/stability/self" \
    --stability "scorers" "${scorers[@]}" \
    --stability "shipped vs aligned" "shipped=$V/stability/shipped" "aligned=$V/maps/wifv" \
    --cost "$V/cost.json"
}

LANES=${LANES:-"controls maps report"}   # e.g. LANES=maps to (re)start one lane, LANES=report for the report only
[[ $LANES == *controls* ]] && lane_controls_then_sweeps &
[[ $LANES == *maps* ]] && lane_maps_then_sweeps &
wait
[[ $LANES == *report* ]] && report
