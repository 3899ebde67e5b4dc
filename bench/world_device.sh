#!/usr/bin/env bash
# On a lent GPU machine: start the world model's training once (or keep waiting for it), then pack
# whatever stages are finished into $OUT. Outputs live in /tmp/world, outside the working tree that
# each call re-syncs (a sync deletes files it does not know). Call again to keep waiting: the
# running job is found by its command line, so a second copy is never started.
# Usage: [SEED=DIR] bench/world_device.sh WAIT_SECONDS [python -m dreamcache.world_model args...]
# SEED: finished stages to start from (a model folder's stages/, classifier/, ...), copied in once.
set -u
wait_s=$1; shift
W=/tmp/world
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
running() { ps -eo args | grep -q "[d]reamcache.world_model --output $W/model"; }
mkdir -p $W
if [ ! -f $W/done ] && ! running; then
  rm -rf $W/src && mkdir -p $W/src && cp -r dreamcache $W/src/  # the code as of the first call
  if [ -n "${SEED:-}" ] && [ ! -d $W/model ]; then mkdir -p $W/model && cp -r "$SEED"/. $W/model/; fi
  ( cd $W/src && PYTHONPATH=/tmp/site:$W/src setsid nohup bash -c \
    "python3 -m dreamcache.world_model --output $W/model --workers 14 $* && touch $W/done" >> $W/train.log 2>&1 < /dev/null & )
fi
end=$((SECONDS + wait_s))
while [ $SECONDS -lt $end ] && [ ! -f $W/done ] && ! grep -q Traceback $W/train.log; do sleep 5; done
grep -v -i warn $W/train.log | grep -v "it/s\]" | tail -14
[ -f $W/done ] && echo TRAINING-DONE
cd $W/model 2>/dev/null || exit 0
keep=$(ls -d base clip classifier adapter adapter-middle training.json runs 2>/dev/null)
[ -d base ] || keep="$keep $(ls -d stages 2>/dev/null)"
tar czf /tmp/world.tgz --exclude=checkpoints $keep && split -b 15M /tmp/world.tgz "$OUT/world.tgz.part-"
ls -la "$OUT"
