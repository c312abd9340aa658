#!/usr/bin/env bash
# A folder of images through microdreamer as a Slurm job array: one shard of the inputs per array task, then
# one job joining the shards' manifests into OUT/manifest.json.
#
#   bash examples/slurm_array.sh PHOTOS OUT [microdreamer image2gs options...]
#
# run on a login node, submits the array (SHARDS tasks, default 8, one GPU each) and the merge job, which
# starts when every task has ended, whether or not some inputs failed. Each task runs
#
#   microdreamer image2gs PHOTOS --out OUT --skip-existing --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT
#
# An input's shard is a hash of its name, so every task, given the same PHOTOS, takes its own inputs and
# adding photos moves none of the others. Submitting again resumes: finished inputs are skipped. PHOTOS and
# OUT must be on storage the compute nodes mount. Change COMMAND for image2mesh, text2gs (prompts in place
# of PHOTOS) or preprocess; the #SBATCH lines below fit your cluster's partitions and limits.
#
#SBATCH --job-name=microdreamer
#SBATCH --gpus=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --output=microdreamer-%A_%a.log
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: bash $0 PHOTOS OUT [microdreamer options...]" >&2
    exit 2
fi
photos=$1
out=$2
shift 2
command=${COMMAND:-image2gs}

if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then  # on the login node: submit the array and the merge after it
    shards=${SHARDS:-8}
    job=$(sbatch --parsable --array="0-$((shards - 1))" --export=ALL,COMMAND="$command" "$0" "$photos" "$out" "$@")
    sbatch --parsable --job-name=microdreamer-merge --dependency="afterany:${job%%;*}" --gpus=0 \
        --output=microdreamer-merge-%j.log --wrap "microdreamer manifest merge '$out' --overwrite"
    echo "submitted array job $job ($shards shards) and its merge; the manifest will be $out/manifest.json"
    exit 0
fi

# in an array task: this task's shard. Exit code 1 (some inputs failed) is the batch's verdict, recorded in the
# shard's manifest; the merge job reports it for the whole batch.
microdreamer "$command" "$photos" --out "$out" --skip-existing \
    --shard "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT" "$@"
