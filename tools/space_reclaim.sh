#!/bin/bash
# Space of deleted checkpoints (docs/benchmarks.md): a training log appended and fsynced
# (20 kB every 50 ms) while four 512 MiB checkpoints are written 15 s apart; then three are
# deleted and the daemon's GC (every 60 s) has 130 s. Prints the size of the store's db/
# before and after, the daemon's "chunk space" lines, and checks the files left.
#   B=/path/to/snapfs W=/var/tmp/snapfs-space tools/space_reclaim.sh
set -u
B=${B:-$HOME/.cache/snapfs/target/release/snapfs}
W=${W:-/var/tmp/snapfs-space}; rm -rf "$W"; mkdir -p "$W/mnt"
$B mount $W/s $W/mnt > $W/log 2>&1 &
for i in $(seq 50); do mountpoint -q $W/mnt && break; sleep 0.1; done
python3 - $W/mnt <<'PY' &
import os, sys, time
p = os.path.join(sys.argv[1], "train.log")
with open(p, "ab") as f:
    while not os.path.exists(os.path.join(sys.argv[1], "stop")):
        f.write(os.urandom(20000)); f.flush(); os.fsync(f.fileno())
        time.sleep(0.05)
PY
LOGGER=$!
for c in 1 2 3 4; do
  head -c $((512<<20)) /dev/urandom > $W/mnt/ckpt$c.bin; sync $W/mnt/ckpt$c.bin; sleep 15
done
touch $W/mnt/stop; wait $LOGGER
b3sum $W/mnt/ckpt4.bin $W/mnt/train.log > $W/sums
du -sm $W/s/db; ls -la $W/mnt | grep -v total
rm $W/mnt/ckpt1.bin $W/mnt/ckpt2.bin $W/mnt/ckpt3.bin
echo "deleted 1.5 GiB of checkpoints; waiting 130 s for GC"
sleep 130
du -sm $W/s/db; grep 'chunk space' $W/log
echo 3 > /proc/sys/vm/drop_caches; b3sum -c $W/sums
$B umount $W/mnt
