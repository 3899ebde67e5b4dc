#!/usr/bin/env bash
# On a lent GPU machine: train the world model's two adapter sets (default and middle-only placement)
# side by side on the carried base (.world/model2: base/, clip/, classifier/), each started once and
# resumed from its last checkpoint if it died; waits, then packs adapters, logs and the latest
# checkpoints into $OUT. Outputs live in /tmp/world, outside the synced tree.
# Usage: bench/world_adapters_device.sh WAIT_SECONDS [world_model args...]
set -u
wait_s=$1; shift
W=/tmp/world
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
if [ ! -d $W/model ]; then
  mkdir -p $W/src && cp -r dreamcache $W/src/ && cp -r .world/model2 $W/model && rm -rf $W/model/runs
fi
for name in adapter adapter-middle; do
  if [ ! -d $W/model/$name ] && ! ps -eo args | grep -q "[d]reamcache.world_model --output $W/model --adapters $name"; then
    ( cd $W/src && PYTHONPATH=/tmp/site:$W/src setsid nohup python3 -m dreamcache.world_model --output $W/model \
        --adapters $name "$@" >> $W/$name.log 2>&1 < /dev/null & )
  fi
done
end=$((SECONDS + wait_s))
while [ $SECONDS -lt $end ] && ! { [ -d $W/model/adapter ] && [ -d $W/model/adapter-middle ]; } \
      && ! grep -q Traceback $W/*.log; do sleep 5; done
for name in adapter adapter-middle; do
  echo "--- $name"; grep -v -i warn $W/$name.log | grep -v "it/s\]" | tail -4
  grep -h cache_effect $W/model/runs/$name/log.jsonl 2>/dev/null | tail -3
done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
cd $W/model && tar czf "$OUT/adapters.tgz" --exclude=optimizer.pt $(ls -d adapter adapter-middle training.json runs 2>/dev/null)
ls -la "$OUT"
