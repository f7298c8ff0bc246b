#!/usr/bin/env bash
# The runs behind results/attribution_validity.md (issues 12 and 23) on CPU, resumable: every step skips what is
# done (a unit map that exists, a dose point with eval.json, a mask run resumes from its mask_state.pt).
#
#   bash scripts/run_attribution_validity.sh            # two lanes of one torch thread each (2 cores)
#   LANES=report bash scripts/run_attribution_validity.sh   # only rebuild the report from results/ (no logs/ needed)
#
# Needs two trained models (run them first, each ~5-10 min on 2 cores):
#   python train.py freeze=none callbacks=default logger=csv hydra.run.dir=logs/align_full      # full alignment
#   python train.py freeze=train_only freeze.random_share=0.02 freeze.seed=0 callbacks=default logger=csv \
#       optim.lr=1e-3 data.num_samples=640 hydra.run.dir=logs/planted2                          # planted 2% set
# Dose points already in results/attribution_validity/runs (the shipped sweeps and shared random controls) are
# copied in and not rerun. Settings are variables below; DOSE_EVAL drops the harmless over-refusal task (OKTest
# stays), about a third of each point's time. A lane that fails stops with its log named; rerun to resume.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=${PY:-python}
ALIGNED=${ALIGNED:-logs/align_full/model}
PLANTED=${PLANTED:-logs/planted2/model}
V=${V:-logs/validity}
CAL=${CAL:-"calibration.nsamples=128 calibration.max_length=192"}
DOSE_EVAL=${DOSE_EVAL:-"eval.tasks.harmless=null"}
SHORT_EVAL=${SHORT_EVAL:-"eval.tasks.harmless=null eval.tasks.oktest=null"}  # head sweeps, reached masks: ASR, ppl
RESULTS=${RESULTS:-results/attribution_validity}
SPARSITY=${SPARSITY:-"0.25 1.0"}   # the mask's sparsity sweep; 2.0 (the default) is the main mask map
HEAD_SHARES=${HEAD_SHARES:-"0.01 0.02 0.04"}  # 0.25% and 0.5% of 270 heads both round to 1 head; CPU time: 8% left out
declare -A SCORER=(
  [wifv]="scoring=wifv"
  [wifv_decision]="scoring=wifv scoring.tokens=decision"
  [activation_decision]="scoring=activation scoring.tokens=decision"
  [snip]="scoring=snip"
  [contrast]="scoring=contrast"
  [refusal_direction]="scoring=refusal_direction"
  [delta]="scoring=delta"
  [atp]="scoring=atp"
  [mask]="scoring=mask calibration.batch_size=4"
  [mask_logit]="scoring=mask calibration.batch_size=4 scoring.utility=none"
)
OLD=(wifv contrast snip refusal_direction wifv_decision activation_decision)
NEW=(mask mask_logit atp delta)   # mask_logit: the same mask ranked by its removal logit alone (scoring.utility=none)
declare -A HEADS=(   # heads as units: the scorers that apply (delta's weight change is per channel slice too)
  [mask_heads]="scoring=mask calibration.batch_size=4 units.heads=true"
  [atp_heads]="scoring=atp units.heads=true"
  [activation_decision_heads]="scoring=activation scoring.tokens=decision units.heads=true"
)
HEAD_NAMES=(mask_heads atp_heads activation_decision_heads)

attribute() {  # attribute <model dir | shipped> <run dir> <overrides...>
  local model=$1 dir=$2; shift 2
  [[ -f $dir/unit_map.safetensors ]] && return 0
  if [[ $dir == *mask_logit* ]]; then  # the same optimisation as its mask twin: start from that run's last state
    local twin=${dir/mask_logit/mask}
    wait_for "$twin/unit_map.safetensors"
    mkdir -p "$dir" && cp -n "$twin/mask_state.pt" "$dir/" 2>/dev/null || true
  fi
  local which=(model=hf model.path="$model")
  [[ $model == shipped ]] && which=(model=smollm2_135m)
  mkdir -p "$(dirname "$dir")"
  $PY attribute.py "${which[@]}" $CAL "$@" logger=none hydra.run.dir="$dir" > "$dir.log" 2>&1 \
    || { echo "attribution failed: $dir.log" >&2; return 1; }
}

sweep() {  # sweep <scorer> <controls dir> <arms...> [--shares ...] -- <evaluate.py overrides>
  local name=$1 controls=$2; shift 2
  $PY scripts/dose_response.py --model "$ALIGNED" --unit-map "$V/maps/$name" --runs-dir "$V/dose/$name" \
    --controls-dir "$controls" --out "$RESULTS/dose/$name" --arms "$@" \
    > "$V/dose/$name.log" 2>&1 || { echo "sweep failed: $V/dose/$name.log" >&2; return 1; }
}

evaluate() {  # evaluate <run dir> <overrides...>: one evaluate.py run of the aligned model, skipped when done
  local dir=$1; shift
  [[ -f $dir/eval.json ]] && return 0
  mkdir -p "$(dirname "$dir")"
  $PY evaluate.py model=hf model.path="$ALIGNED" "$@" logger=none hydra.run.dir="$dir" > "$dir.log" 2>&1 \
    || { echo "evaluate failed: $dir.log" >&2; return 1; }
}

wait_for() { until [[ -e $1 ]]; do sleep 30; done; sleep 20; }  # the sleep: let the writer finish

mkdir -p "$V/maps" "$V/planted" "$V/stability" "$V/dose" "$V/sparsity"

seed_shipped_runs() {  # the dose points already shipped (earlier sweeps, shared controls) are not rerun
  [[ -d $RESULTS/runs ]] || return 0
  (cd "$RESULTS/runs" && find . -name eval.json -o -name eval_meta.json) | while read -r f; do
    [[ -f $V/dose/$f ]] || { mkdir -p "$V/dose/$(dirname "$f")"; cp "$RESULTS/runs/$f" "$V/dose/$f"; }
  done
  mkdir -p "$V/dose/controls_heads/base"   # the unablated baseline does not depend on the unit kinds
  cp -n "$V/dose/controls/base/"eval*.json "$V/dose/controls_heads/base/" 2>/dev/null || true
}

lane_maps() {  # unit maps: the new scorers (aligned, planted, calibration halves), the earlier scorers' maps of the
  wait_for "$ALIGNED/model.safetensors"   # aligned model (stability), the mask's sparsity sweep
  for s in "${NEW[@]}"; do attribute "$ALIGNED" "$V/maps/$s" ${SCORER[$s]}; done
  for s in "${HEAD_NAMES[@]}"; do attribute "$ALIGNED" "$V/maps/$s" ${HEADS[$s]}; done
  wait_for "$PLANTED/trained_units.safetensors"
  for s in "${NEW[@]}"; do attribute "$PLANTED" "$V/planted/$s" ${SCORER[$s]}; done
  for s in atp delta wifv mask mask_logit; do  # stability: disjoint calibration halves
    attribute "$ALIGNED" "$V/stability/${s}_half_a" ${SCORER[$s]} +calibration.safety.hash_split=[0.0,0.5] \
      calibration.utility.hash_split=[0.0,0.45]
    attribute "$ALIGNED" "$V/stability/${s}_half_b" ${SCORER[$s]} +calibration.safety.hash_split=[0.5,1.0] \
      calibration.utility.hash_split=[0.45,0.9]
  done
  attribute "$ALIGNED" "$V/stability/wei" scoring=wifv calibration=wei
  attribute "$ALIGNED" "$V/stability/self" scoring=wifv calibration=self
  attribute shipped "$V/stability/shipped" scoring=wifv
  for s in "${OLD[@]}"; do attribute "$ALIGNED" "$V/maps/$s" ${SCORER[$s]}; done   # for the scorers' stability
  for w in $SPARSITY; do attribute "$ALIGNED" "$V/sparsity/w$w" ${SCORER[mask]} scoring.sparsity_weight="$w"; done
}

lane_evals() {  # dose sweeps against the shared controls, head controls, the planted eval and the earlier scorers'
  wait_for "$ALIGNED/model.safetensors"   # planted maps, the reached masks' evals, cost
  seed_shipped_runs
  # a retrained model: its unablated eval beside the shipped baseline (the report compares them)
  [[ -f $V/dose/controls/base/eval.json ]] && evaluate "$V/verify_base" eval=dose $DOSE_EVAL
  for s in "${NEW[@]}"; do wait_for "$V/maps/$s/unit_map.safetensors"; sweep "$s" "$V/dose/controls" \
    safety_minus_utility random -- $DOSE_EVAL; done
  wait_for "$V/maps/mask_heads/unit_map.safetensors"
  $PY scripts/dose_response.py --model "$ALIGNED" --unit-map "$V/maps/mask_heads" --runs-dir "$V/dose/controls_heads" \
    --controls-dir "$V/dose/controls_heads" --out "$V/dose/controls_heads_report" --arms random \
    --shares $HEAD_SHARES -- $SHORT_EVAL > "$V/dose/controls_heads.log" 2>&1 \
    || { echo "head controls failed: $V/dose/controls_heads.log" >&2; return 1; }
  for s in "${HEAD_NAMES[@]}"; do wait_for "$V/maps/$s/unit_map.safetensors"; sweep "$s" "$V/dose/controls_heads" \
    safety_minus_utility random --shares $HEAD_SHARES -- $SHORT_EVAL; done  # random: done above, shared
  wait_for "$PLANTED/trained_units.safetensors"
  [[ -f $V/planted_eval/eval.json ]] || $PY evaluate.py model=hf model.path="$PLANTED" eval=dose \
    eval.tasks.oktest=null eval.tasks.harmless=null logger=none hydra.run.dir="$V/planted_eval" > "$V/planted_eval.log" 2>&1
  for s in "${OLD[@]}"; do attribute "$PLANTED" "$V/planted/$s" ${SCORER[$s]}; done
  # cost at the harness's settings; mask_heads and mask_logit are left out (the steps cost what mask's do)
  [[ -f $V/cost.json ]] || $PY benchmarks/scorers.py --model-path "$ALIGNED" --json "$V/cost.json" \
    --scorers "${OLD[@]}" mask atp delta atp_heads activation_decision_heads -- calibration.batch_size=4 \
    > "$V/cost.log" 2>&1
  # the mask the optimiser reached, per sparsity weight: its own size against its ASR and perplexity
  for w in 2.0 $SPARSITY; do
    local map=$V/maps/mask
    [[ $w == 2.0 ]] || map=$V/sparsity/w$w
    wait_for "$map/mask_units.safetensors"
    evaluate "$V/sparsity/eval_w$w" eval=dose $SHORT_EVAL ablate.unit_map="$map" \
      ablate.selection="$map/mask_units.safetensors"
  done
}

regenerate_control() {  # regenerate_control controls/random_k<k>_s<seed>: its completions again (same model, set)
  local d=$1 k=${1#controls/random_k}; local seed=${k#*_s}; k=${k%_s*}
  evaluate "$V/dose/controls_gen/${d#controls/}" eval=dose $SHORT_EVAL ablate.unit_map="$V/maps/mask" \
    ablate.top=random ablate.share="$k" ablate.seed="$seed"
}

lane_regen() {  # after the maps lane: the shipped random sets at 1% and 2% generated again, for the second judge
  wait_for "$V/sparsity/w${SPARSITY##* }/unit_map.safetensors"
  for k in 0.01 0.02; do for seed in 0 1 2; do
    [[ -f $V/dose/controls/random_k${k}_s$seed/generations.jsonl ]] || regenerate_control "controls/random_k${k}_s$seed"
  done; done
}

rejudge_strings() {  # the top sets at 1% and 2% and their random sets, re-judged by the strings judge (no model)
  local out=$RESULTS/runs/rejudge_strings dirs=(controls/base)
  for k in 0.01 0.02; do
    for s in "${NEW[@]}" "${HEAD_NAMES[@]}"; do dirs+=("$s/safety_minus_utility_k$k"); done
    for seed in 0 1 2; do dirs+=("controls/random_k${k}_s$seed" "controls_heads/random_k${k}_s$seed"); done
  done
  for d in "${dirs[@]}"; do
    local src=$V/dose/$d
    if [[ $d == controls/random* && ! -f $src/generations.jsonl ]]; then  # shipped controls keep no completions:
      src=$V/dose/controls_gen/${d#controls/}                              # regenerate them (lane_regen)
      regenerate_control "$d"
    fi
    [[ -f $src/generations.jsonl && ! -f $out/$d/eval.json ]] || continue
    $PY evaluate.py eval=rejudge eval.tasks.rejudge.source.path="$src/generations.jsonl" \
      eval.tasks.rejudge.source.prompt=prompt eval.tasks.rejudge.source.completion=completion \
      "eval.tasks.rejudge.source.where={task: harmful}" eval.tasks.rejudge.report=asr judge=strings logger=none \
      hydra.run.dir="$V/rejudge/$d" > "$V/rejudge.log" 2>&1 || { echo "rejudge failed: $V/rejudge.log" >&2; return 1; }
    mkdir -p "$out/$d" && cp "$V/rejudge/$d/eval.json" "$out/$d/"
    [[ $src == "$V/dose/$d" ]] || cp "$src/eval.json" "$out/$d/source_eval.json"  # the regenerated run's verdicts
  done
}

artifacts() {  # logs -> results: every dose point's eval.json / eval_meta.json, the planted, stability, sparsity
  local runs="$RESULTS/runs"    # and cost inputs (small JSON; the maps stay in logs). A map not made is left out.
  (cd "$V/dose" && find . \( -path ./controls_heads_report -o -path ./controls_gen \) -prune -o \
    \( -name eval.json -o -name eval_meta.json \) -print) \
    | while read -r f; do mkdir -p "$runs/$(dirname "$f")" && cp "$V/dose/$f" "$runs/$f"; done
  have() { [[ -f $1/unit_map.safetensors ]]; }
  local planted=() args=(--out "$RESULTS" --model-run "$(dirname "$ALIGNED")")
  for s in "${NEW[@]}" "${OLD[@]}"; do have "$V/planted/$s" && planted+=("$s=$V/planted/$s"); done
  [[ -f $V/planted_eval/eval.json ]] && args+=(--planted "$PLANTED" --planted-eval "$V/planted_eval" \
    --planted-map "${planted[@]}")
  [[ -f $V/cost.json ]] && args+=(--cost "$V/cost.json")
  [[ -f $V/verify_base/eval.json ]] && args+=(--retrain-eval "$V/verify_base")
  compare() {  # compare <title> <label=map>...: only the maps that exist, and only with two of them
    local title=$1 items=(); shift
    for it in "$@"; do have "${it#*=}" && items+=("$it"); done
    (( ${#items[@]} >= 2 )) && args+=(--stability "$title" "${items[@]}") || true
  }
  for s in wifv "${NEW[@]}"; do
    compare "calibration halves (disjoint prompts): $s" "half_a=$V/stability/${s}_half_a" "half_b=$V/stability/${s}_half_b"
  done
  compare "calibration sources" "stl=$V/maps/wifv" "wei=$V/stability/wei" "self=$V/stability/self"
  local scorers=()
  for s in "${OLD[@]}" "${NEW[@]}"; do scorers+=("$s=$V/maps/$s"); done
  compare "scorers" "${scorers[@]}"
  compare "shipped vs aligned" "shipped=$V/stability/shipped" "aligned=$V/maps/wifv"
  local masks=()
  for w in 2.0 $SPARSITY; do
    local map=$V/sparsity/w$w
    [[ $w == 2.0 ]] && map=$V/maps/mask
    have "$map" && [[ -f $V/sparsity/eval_w$w/eval.json ]] && masks+=("$w=$map")
  done
  (( ${#masks[@]} )) && args+=(--sparsity "${masks[@]}" --sparsity-evals "$V/sparsity")
  $PY scripts/validity_artifacts.py "${args[@]}"
  rejudge_strings
}

report() {
  local runs="$RESULTS/runs" sweeps=()
  for s in "${OLD[@]}" "${NEW[@]}"; do [[ -d $runs/$s ]] && sweeps+=(--sweep "$s=$runs/$s"); done
  local heads=()
  for s in "${HEAD_NAMES[@]}"; do [[ -d $runs/$s ]] && heads+=(--head-sweep "$s=$runs/$s"); done
  $PY scripts/attribution_validity.py --out "$RESULTS.md" \
    --controls-dir "$runs/controls" "${sweeps[@]}" --head-controls-dir "$runs/controls_heads" "${heads[@]}" \
    --artifacts "$RESULTS"
}

LANES=${LANES:-"maps evals regen artifacts report"}   # e.g. LANES=maps to (re)start one lane, LANES=report: report only
[[ $LANES == *maps* ]] && lane_maps &
[[ $LANES == *evals* ]] && lane_evals &
[[ $LANES == *regen* ]] && lane_regen &
wait
[[ $LANES == *artifacts* ]] && artifacts
[[ $LANES == *report* ]] && report
