#!/usr/bin/env bash
# On a lent GPU machine: the adapter-settings sweep (bench/world_adapter_sweep.py) on the carried
# model .world/probe, alongside the world model's base training (bench/world_device.sh), each
# started once; waits, then packs both into $OUT. Outputs live in /tmp, outside the synced tree.
# Usage: bench/world_sweep_device.sh WAIT_SECONDS SWEEP_MINUTES [world_model args...]
set -u
wait_s=$1; minutes=$2; shift 2
S=/tmp/sweep
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
if [ ! -d $S ]; then
  mkdir -p $S/src && cp -r dreamcache bench $S/src/ && cp -r .world/probe $S/model
  ( cd $S/src && PYTHONPATH=/tmp/site:$S/src setsid nohup python3 bench/world_adapter_sweep.py --model $S/model \
      --output $S/out --minutes "$minutes" > $S/sweep.log 2>&1 < /dev/null & )
fi
bash bench/world_device.sh "$wait_s" "$@"
echo "--- sweep"; tail -n 3 $S/out/*.log 2>/dev/null | grep -v -i warn; cat $S/sweep.log
( cd $S/out 2>/dev/null && tar czf "$OUT/sweep.tgz" --exclude=model/base --exclude=model/clip --exclude=model/classifier \
    --exclude=checkpoints . )
