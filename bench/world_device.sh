#!/usr/bin/env bash
# On a lent GPU machine: start the product-world job once (bench/world_job.sh: training on every
# GPU, then evaluation), wait for it, and pack what is finished into $OUT. Call again to keep waiting:
# the job's outputs live in /tmp/world, outside the working tree each call re-syncs, and a job is
# never started twice; a job that failed is started again (finished stages are kept, and a fix in
# the working tree is picked up). What comes back: results.tgz (records, figures, logs) and the
# model's folders as model.tgz.part-* (cat them together); both grow as stages finish.
# The device lacks some packages: their wheels travel in .whl/ (git-ignored; pass `carry: [".whl"]`), made with
#   pip download --no-deps --only-binary :all: --python-version 3.12 -d .whl diffusers==0.42.1 pydantic==2.14.4 \
#     pydantic_core==2.50.5 annotated_types typing_inspection typing_extensions importlib_metadata zipp
# Usage: bench/world_device.sh WAIT_SECONDS [python -m dreamcache.world.model args...] (none: wait for the started job)
set -u
wait_s=$1; shift
W=/tmp/world
if [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$W/src
[ -f $W/failed ] && rm -rf $W/started $W/failed $W/src $W/model/runs
if [ ! -f $W/started ] && [ $# = 0 ]; then
  # A call to keep waiting that lands on a fresh machine (the warm one was given back) must not start
  # a different job, from scratch: a job is started only with its arguments (defaults: --seed 0).
  echo "no job on this machine to wait for: it is a fresh one; start the job again with its arguments"
  exit 1
fi
if [ ! -f $W/started ]; then
  mkdir -p $W/src && touch $W/started
  cp -r dreamcache bench $W/src/  # the code as of the first call
  ( cd $W/src && setsid nohup bash bench/world_job.sh "$@" > $W/job.log 2>&1 < /dev/null & )
fi
end=$((SECONDS + wait_s))
while [ $SECONDS -lt $end ] && [ ! -f $W/done ] && [ ! -f $W/failed ]; do sleep 5; done
grep -v -i "warn\|it/s\]\|s/it\]" $W/job.log | tail -25
nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
[ -f $W/done ] && echo JOB-DONE
[ -f $W/failed ] && echo JOB-FAILED
cd $W && tar czf "$OUT/results.tgz" job.log results model/training.json model/runs/*/log.jsonl 2>/dev/null
cd $W/model 2>/dev/null || exit 0
keep=$(ls -d base clip classifier adapter adapter-middle stages 2>/dev/null)
[ -n "$keep" ] && tar czf /tmp/model.tgz $keep && split -b 15M /tmp/model.tgz "$OUT/model.tgz.part-"
ls -la "$OUT"
