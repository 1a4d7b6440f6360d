#!/usr/bin/env bash
# Shard one `autodeco eval` (or `sweep`, or `data reject-sample`) over a Slurm job array, then gather.
#
#   configs/slurm/eval_array.sh 8 -- eval --model r1-distill-qwen-7b --tasks aime,hmmt25 \
#       --decoding autodeco --seeds 8 --samples 16 --backend vllm --out outputs/paper
#
# submits an array of N tasks — task I runs `autodeco <command> ... --shard I/N`, one engine each —
# and a gather job that starts once every task has succeeded (afterok): OUT/<model_name>/ then holds
# the results and samples files of one unsharded run. A sweep gets its two rounds (round 2 with
# --best-from OUT) before the gather. All tasks write into the same --out folder (each shard to its
# own store), so OUT must be on a filesystem every node sees. Give --out on the command line.
#
# Resources per task: GPUS_PER_SHARD (default 1; = the tensor_parallel_size), CPUS_PER_SHARD
# (default 8), TIME (default 24:00:00), PARTITION, ACCOUNT; any other sbatch option through the
# SBATCH_* environment variables Slurm reads. AUTODECO: the command to run (default: autodeco).
# A task that failed (node lost, time limit): `sbatch --array=I ...` again, or simply rerun this
# script — finished samples are kept and every shard resumes from its store.
set -euo pipefail

usage() { echo "usage: $0 SHARDS -- eval|sweep|data reject-sample ARGS... --out OUT" >&2; exit 2; }
[ $# -ge 3 ] || usage
shards=$1; shift
[ "$1" = "--" ] && shift
[[ "$shards" =~ ^[1-9][0-9]*$ ]] || usage

command=$1
out=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --out) out="${args[$((i + 1))]:-}" ;;
    --out=*) out="${args[$i]#--out=}" ;;
    --shard|--shard=*|--best-from|--best-from=*) echo "$0: leave ${args[$i]%%=*} out; the script sets it" >&2; exit 2 ;;
  esac
done
[ -n "$out" ] || { echo "$0: give --out OUT on the command line" >&2; exit 2; }
case "$command" in
  eval|sweep) root=$out ;;
  data) root=$(dirname "$out") ;;  # reject-sample: --out is a file; its shards sit beside it
  *) usage ;;
esac

autodeco=${AUTODECO:-autodeco}
logs="$root/shards/logs"
mkdir -p "$logs"
quoted=$(printf '%q ' "$@")
common=(--parsable --job-name=autodeco-${command} --time="${TIME:-24:00:00}" --cpus-per-task="${CPUS_PER_SHARD:-8}")
[ "${GPUS_PER_SHARD:-1}" != 0 ] && common+=(--gpus-per-task="${GPUS_PER_SHARD:-1}")
[ -n "${PARTITION:-}" ] && common+=(--partition="$PARTITION")
[ -n "${ACCOUNT:-}" ] && common+=(--account="$ACCOUNT")

# One array of N shards; $SLURM_ARRAY_TASK_ID is expanded inside each task.
array() {  # array EXTRA_ARGS DEPENDENCY
  sbatch "${common[@]}" --array="0-$((shards - 1))" ${2:+--dependency=afterok:$2} \
    --output="$logs/%x-%A_%a.log" \
    --wrap "$autodeco $quoted --shard \${SLURM_ARRAY_TASK_ID}/$shards $1"
}

job=$(array "" "")
echo "submitted $shards shards: job $job"
if [ "$command" = sweep ]; then  # the top-p grid needs the best temperature of every shard's first round
  job=$(array "--best-from $(printf '%q' "$root")" "$job")
  echo "submitted round 2 of the sweep: job $job"
fi
gather=$(sbatch --parsable --job-name=autodeco-gather --time=02:00:00 --cpus-per-task="${CPUS_PER_SHARD:-8}" \
  --dependency=afterok:"$job" --output="$logs/%x-%j.log" \
  --wrap "$autodeco gather --runs $(printf '%q' "$root") --out $(printf '%q' "$root")")
echo "submitted the gather: job $gather (after job $job) → $root"
