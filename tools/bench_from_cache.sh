#!/bin/bash
# mount --from (docs/benchmarks.md, "mount --from disk cache"): first read (fetched from a dir: backend on the same disk) vs second read (disk
# cache) vs native read of the same bytes, page cache dropped before each; 1 GiB, 5 runs.
set -u
B=${B:-$HOME/.cache/snapfs/target/release/snapfs}
W=${W:-/var/tmp/snapfs-bench-from}; rm -rf $W; mkdir -p $W/mnt $W/from
head -c $((1<<30)) /dev/urandom > $W/src.bin
$B mount $W/s $W/mnt --replicate dir:$W/bk > $W/log 2>&1 &
for i in $(seq 50); do mountpoint -q $W/mnt && break; sleep 0.1; done
cp $W/src.bin $W/mnt/ckpt.bin; sync $W/mnt/ckpt.bin
$B snapshot create $W/mnt s1 >/dev/null; $B snapshot wait $W/mnt s1 --timeout 600s >/dev/null
$B umount $W/mnt; sleep 1
t() { echo 3 > /proc/sys/vm/drop_caches; local a=$(date +%s.%N); cat "$1" > /dev/null; local b=$(date +%s.%N); echo "$b - $a" | bc; }
for r in 0 1 2 3 4 5; do
  $B mount --from dir:$W/bk --snapshot s1 --cache-dir $W $W/from > $W/from.log 2>&1 &
  for i in $(seq 100); do mountpoint -q $W/from && break; sleep 0.1; done
  n=$(t $W/src.bin); f=$(t $W/from/ckpt.bin); c=$(t $W/from/ckpt.bin)
  $B umount $W/from; sleep 1
  echo "run $r native $n first $f second $c $(grep -o 'disk cache: .*' $W/from.log)"
done
rm -rf $W
