#!/usr/bin/env python3
"""Several snapfs configurations in one run, alternating, each against native ext4 in the same
round (stdlib only; run as root). For the kernel-option measurements of docs/benchmarks.md,
where one bench.sh invocation per option would compare options measured in different disk moods.

    tools/bench_variants.py {write|pwrite|read} [--runs 5] [--mib 1024] [--readers 1]
        [--workdir /var/tmp/snapfs-var]
        VARIANT...

A VARIANT is NAME or NAME:KEY=VALUE,KEY=VALUE: the environment of that `snapfs mount`
(e.g. `mw128k:SNAPFS_MAX_WRITE=131072`, `wb:SNAPFS_WRITEBACK_CACHE=1`), except the key `ra`,
which sets the mount's read_ahead_kb after mounting (e.g. `ra4m:ra=4096`), and the key `bin`,
which runs that variant with another snapfs binary (two builds in one run: `old:bin=/tmp/a
new:bin=/tmp/b`), and the key `args`, extra `snapfs mount` arguments with `+` between words
(`t8:args=--threads+8`). Per round: a warm-up
round first, then for each round native and every variant in turn. write: one file of --mib MiB
in 1 MiB writes + fsync (tools/bench_io.py write; fresh data each run), on a fresh store per run.
pwrite: the same bytes as 4 files from 2 concurrent writers, each file fsynced (bench_io.py
pwrite, bench.sh's p1-multi). read: the file is written once per variant, then read after dropping caches; the mount stays up
across rounds (remounted per variant each round, so that each read is of a cold mount).

Prints per-run rows, then per variant: the median of the per-round ratios variant/native, the
median MiB/s, and (write) the daemon's CPU-seconds per GiB to fsync's return.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 1 << 20


sys.path.insert(0, HERE)
from bench_snapshots import snapfs_bin  # noqa: E402  (SNAPFS_BIN or the cache's release build)


# Extra `snapfs mount` arguments of a variant (key `args`, `+` between words), carried in its
# environment dict under this name and taken out before the mount starts.
ARGS_KEY = "\0args"


def parse_variant(s):
    name, _, rest = s.partition(":")
    env, ra, bin_ = {}, None, None
    for kv in filter(None, rest.split(",")):
        k, eq, v = kv.partition("=")
        if not eq:
            sys.exit(f"bench_variants: {kv!r} in {s!r} is not KEY=VALUE")
        if k == "ra":
            ra = int(v)
        elif k == "args":
            env[ARGS_KEY] = v
        elif k == "bin":
            if not os.access(v, os.X_OK):
                sys.exit(f"bench_variants: {v} is not an executable")
            bin_ = v
        else:
            env[k] = v
    return name, env, ra, bin_


def mounted(mnt):
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == mnt for line in f)


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Mount:
    def __init__(self, bin_, store, mnt, env, ra, log):
        os.makedirs(mnt, exist_ok=True)
        self.bin, self.mnt = bin_, mnt
        env = dict(env)
        extra = [w for w in env.pop(ARGS_KEY, "").split("+") if w]
        self.p = subprocess.Popen([bin_, "mount", store, mnt, *extra], env={**os.environ, **env},
                                  stdout=log, stderr=log)
        t = time.time()
        while not mounted(mnt):
            if self.p.poll() is not None or time.time() - t > 60:
                sys.exit(f"bench_variants: mount of {mnt} failed (log {log.name})")
            time.sleep(0.02)
        if ra is not None:
            dev = subprocess.run(["mountpoint", "-d", mnt], capture_output=True, text=True,
                                 check=True).stdout.strip()
            with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
                f.write(str(ra))

    def close(self):
        subprocess.run([self.bin, "umount", self.mnt], check=True)
        self.p.wait(timeout=300)


def io(*args):
    r = subprocess.run([sys.executable, os.path.join(HERE, "bench_io.py"), *args],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"bench_variants: bench_io.py {args[0]} failed: {r.stderr.strip()}")


def timed(args, tsv):
    """Runs a bench_io.py subcommand that appends one row; returns its seconds."""
    io(*args, "--out", tsv, "--bench", "v", "--side", "x", "--run", "x")
    with open(tsv) as f:
        return float(f.read().splitlines()[-1].split("\t")[3])


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["write", "pwrite", "read"])
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--workdir", default="/var/tmp/snapfs-var")
    ap.add_argument("--readers", type=int, default=1, help="read: concurrent reader processes")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_variants: must run as root (drop_caches, read_ahead_kb)")
    if a.runs < 1 or a.mib < 1:
        sys.exit("bench_variants: --runs and --mib must be positive")
    variants = [parse_variant(v) for v in a.variants]
    names = [v[0] for v in variants]
    if len(set(names)) != len(names) or "native" in names:
        sys.exit("bench_variants: variant names must be unique and not 'native'")
    bin_ = snapfs_bin()
    work = os.path.abspath(a.workdir)
    os.makedirs(work, exist_ok=True)
    tsv = os.path.join(work, "rows.tsv")
    with open(tsv, "w") as f:
        f.write("bench\tside\trun\tseconds\tbytes\tfiles\n")
    logf = open(os.path.join(work, "snapfs.log"), "a")
    nonce = os.urandom(8).hex()
    native = os.path.join(work, "native")
    os.makedirs(native, exist_ok=True)
    print(f"snapfs: {bin_}\nmode {a.mode}, {a.mib} MiB, {a.runs} rounds + warm-up; "
          f"variants: {' '.join(a.variants)}", flush=True)
    res = {n: [] for n in ["native", *names]}   # (round, seconds, cpu_s_per_gib)
    if a.mode == "read":
        src = os.path.join(native, "f.bin")
        io("write", src, "--mib", str(a.mib), "--seed", f"{nonce}-native")
        for name, env, ra, vbin in variants:
            m = Mount(vbin or bin_, os.path.join(work, f"store-{name}"), os.path.join(work, f"mnt-{name}"),
                      env, ra, logf)
            io("write", os.path.join(m.mnt, "f.bin"), "--mib", str(a.mib), "--seed",
               f"{nonce}-{name}")
            m.close()
    for rnd in ["warmup", *map(str, range(1, a.runs + 1))]:
        for name, env, ra, vbin in [("native", {}, None, None), *variants]:
            seed = f"{nonce}-{name}-{rnd}"
            if name == "native":
                path = os.path.join(native, "f.bin")
                if a.mode == "write":
                    subprocess.run(["sync"], check=True)
                    s = timed(["write", path, "--mib", str(a.mib), "--seed", seed], tsv)
                    os.unlink(path)
                elif a.mode == "pwrite":
                    subprocess.run(["sync"], check=True)
                    d = os.path.join(native, "multi")
                    os.makedirs(d)
                    s = timed(["pwrite", d, "--mib", str(a.mib), "--seed", seed], tsv)
                    subprocess.run(["rm", "-rf", d], check=True)
                else:
                    drop_caches()
                    s = timed(["read", path, "--expect-mib", str(a.mib),
                               "--readers", str(a.readers)], tsv)
                res[name].append((rnd, s, None))
                print(f"  {rnd:>6} {name:<10} {s:7.3f} s {a.mib / s:8.1f} MiB/s", flush=True)
                continue
            store = os.path.join(work, f"store-{name}")
            if a.mode != "read":
                subprocess.run(["rm", "-rf", store], check=True)
            m = Mount(vbin or bin_, store, os.path.join(work, f"mnt-{name}"), env, ra, logf)
            path = os.path.join(m.mnt, "f.bin")
            if a.mode != "read":
                subprocess.run(["sync"], check=True)
                c0 = cpu_seconds(m.p.pid)
                if a.mode == "write":
                    s = timed(["write", path, "--mib", str(a.mib), "--seed", seed], tsv)
                else:
                    s = timed(["pwrite", m.mnt, "--mib", str(a.mib), "--seed", seed], tsv)
                cpu = (cpu_seconds(m.p.pid) - c0) * 1024 / a.mib
            else:
                drop_caches()
                c0 = cpu_seconds(m.p.pid)
                s = timed(["read", path, "--expect-mib", str(a.mib),
                           "--readers", str(a.readers)], tsv)
                cpu = (cpu_seconds(m.p.pid) - c0) * 1024 / a.mib
            m.close()
            if a.mode != "read":
                subprocess.run(["rm", "-rf", store], check=True)
            res[name].append((rnd, s, cpu))
            print(f"  {rnd:>6} {name:<10} {s:7.3f} s {a.mib / s:8.1f} MiB/s  "
                  f"daemon {cpu:.2f} CPU-s/GiB", flush=True)
    print()
    nat = {r: s for r, s, _ in res["native"] if r != "warmup"}
    print(f"native: median {statistics.median(a.mib / s for s in nat.values()):.1f} MiB/s")
    for name in names:
        rows = [(r, s, c) for r, s, c in res[name] if r != "warmup"]
        ratios = [nat[r] / s for r, s, _ in rows]
        print(f"{name}: per-round ratio to native {', '.join(f'{x:.2f}' for x in ratios)}; "
              f"median ratio {statistics.median(ratios):.2f}, median "
              f"{statistics.median(a.mib / s for _, s, _ in rows):.1f} MiB/s, daemon CPU "
              f"median {statistics.median(c for _, _, c in rows):.2f} s/GiB")
    for name in names:
        subprocess.run(["rm", "-rf", os.path.join(work, f"store-{name}")], check=True)
    subprocess.run(["rm", "-rf", native], check=True)


if __name__ == "__main__":
    main()
