#!/usr/bin/env python3
"""P3 and restore benchmarks for snapfs (stdlib only; run as root).

P3: snapshot-create latency (p50, p99, max over >= 100 snapshots) while a writer streams
data, with 1 GiB and then 10 GiB stored; the 10 GiB / 1 GiB ratio of p99; and the writer's
throughput with a snapshot every --every seconds (default 1; P4 asks for 1 and 10: use
--every 1,10 with --tput-seconds 30 or more) against none (rotating runs, medians).

Restore: `snapfs restore` of a 1 GiB snapshot to a directory on ext4 against `cp -a` of the
same tree from ext4 to ext4, both followed by `sync`, caches dropped before each run.

    tools/bench_snapshots.py [--workdir /var/tmp/snapfs-p3] [--snapshots 100] [--big-gib 10]
                             [--runs 5] [--tput-seconds 15] [--every 1,10] [--out results.json]
                             [--sections latency,throughput,restore]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import multiprocessing
import time

MIB = 1 << 20


def snapfs_bin():
    b = os.environ.get("SNAPFS_BIN") or os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/snapfs/target")),
        "release", "snapfs")
    if not os.access(b, os.X_OK):
        sys.exit(f"snapfs binary not found at {b}: build it first (tools/run.sh or cargo build --release)")
    return b


BIN = None


def mounted(mnt):
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == mnt for line in f)


def mount(store, mnt, log):
    os.makedirs(mnt, exist_ok=True)
    p = subprocess.Popen([BIN, "mount", store, mnt], stdout=log, stderr=log)
    t = time.time()
    while not mounted(mnt):
        if p.poll() is not None or time.time() - t > 60:
            sys.exit(f"mount failed, see {log.name}")
        time.sleep(0.02)
    return p


def umount(mnt, p):
    subprocess.run([BIN, "umount", mnt], check=True)
    p.wait(timeout=300)


def cli(*args):
    r = subprocess.run([BIN, *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"snapfs {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


class Data:
    """Unique, incompressible 1 MiB blocks: a random base stamped with a counter."""

    def __init__(self):
        self.base = bytearray(os.urandom(MIB))
        self.n = int.from_bytes(os.urandom(6), "little") << 16

    def block(self):
        self.n += 1
        self.base[:8] = self.n.to_bytes(8, "little")
        return self.base


def fill(path, gib, data):
    with open(path, "wb") as f:
        for _ in range(gib * 1024):
            f.write(data.block())
        f.flush()
        os.fsync(f.fileno())


def _stream(path, stop, acked):
    data = Data()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    off = 0
    while not stop.is_set():
        os.pwrite(fd, data.block(), off)
        with acked.get_lock():
            acked.value += MIB
        off = (off + MIB) % (256 * MIB)
    os.close(fd)


class Writer:
    """Rewrites a 256 MiB file in 1 MiB writes, in a loop, counting bytes acknowledged.

    It runs in its own process. As a thread of this one it made every timed fork+exec wait:
    /bin/true took 103 ms (p50) to run from this process while its writer thread streamed
    into the mount, 3 ms from a process without one, so the CLI wall-clock figures timed the
    harness, not snapfs (docs/benchmarks.md, "Snapshots without a flush")."""

    def __init__(self, path):
        ctx = multiprocessing.get_context("fork")
        self._stop, self._acked = ctx.Event(), ctx.Value("Q", 0)
        self._p = ctx.Process(target=_stream, args=(path, self._stop, self._acked), daemon=True)

    def start(self):
        self._p.start()

    @property
    def bytes(self):
        return self._acked.value

    @property
    def stop(self):
        return self._stop.is_set()

    @stop.setter
    def stop(self, v):
        if v:
            self._stop.set()

    def join(self):
        self._p.join()
        if self._p.exitcode != 0:
            sys.exit(f"the writer process failed (exit {self._p.exitcode})")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def latency_run(mnt, n, label):
    w = Writer(os.path.join(mnt, "stream.bin"))
    w.start()
    time.sleep(1)
    wall, daemon = [], []
    for i in range(n):
        t = time.perf_counter()
        out = cli("snapshot", "create", mnt, f"{label}-{i}")
        wall.append((time.perf_counter() - t) * 1000)
        # "created snapshot NAME (id N) in X ms"
        daemon.append(float(out.rsplit(" in ", 1)[1].split()[0]))
        time.sleep(0.05)
    w.stop = True
    w.join()
    t = time.perf_counter()
    for i in range(n):
        cli("snapshot", "delete", mnt, f"{label}-{i}")
    delete_s = time.perf_counter() - t
    res = {}
    for name, xs in (("daemon_ms", daemon), ("cli_wall_ms", wall)):
        res[name] = {"p50": pct(xs, 50), "p99": pct(xs, 99), "max": max(xs), "n": len(xs)}
    res["delete_all_s"] = delete_s
    return res


def throughput_run(mnt, seconds, snap_every):
    """The writer's MiB/s over `seconds`, with a snapshot created at every multiple of
    `snap_every` seconds from the start (a fixed schedule: a slow snapshot does not stretch
    the interval to the next one), or none."""
    w = Writer(os.path.join(mnt, "tput.bin"))
    w.start()
    time.sleep(1)
    start_b, t0 = w.bytes, time.time()
    names = []
    while True:
        now = time.time() - t0
        if now >= seconds:
            break
        if snap_every:
            due = (len(names) + 1) * snap_every
            if due >= seconds:
                time.sleep(seconds - now)
                continue
            if due > now:
                time.sleep(due - now)
            name = f"tp-{len(names)}-{int(t0)}"
            cli("snapshot", "create", mnt, name)
            names.append(name)
        else:
            time.sleep(min(0.2, seconds - now))
    mib_s = (w.bytes - start_b) / MIB / (time.time() - t0)
    w.stop = True
    w.join()
    for n in names:
        cli("snapshot", "delete", mnt, n)
    return mib_s


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def make_tree(root, data, files=16, mib_each=64):
    os.makedirs(root)
    for i in range(files):
        d = os.path.join(root, f"shard{i % 4}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"part{i}.bin"), "wb") as f:
            for _ in range(mib_each):
                f.write(data.block())
        os.chmod(os.path.join(d, f"part{i}.bin"), 0o640)
    with open(os.path.join(root, "meta.json"), "w") as f:
        f.write('{"step": 1000}\n')
    os.symlink("meta.json", os.path.join(root, "latest"))


def restore_bench(work, mnt, runs, data):
    native = os.path.join(work, "native-tree")
    make_tree(native, data)
    shutil.copytree(native, os.path.join(mnt, "tree"), symlinks=True)
    cli("snapshot", "create", mnt, "restore-src")
    rows = []
    for r in range(runs + 1):
        for side in ("cp", "snapfs"):
            dest = os.path.join(work, f"dest-{side}")
            shutil.rmtree(dest, ignore_errors=True)
            drop_caches()
            t = time.perf_counter()
            if side == "cp":
                subprocess.run(["cp", "-a", native, dest], check=True)
            else:
                cli("restore", mnt, "restore-src", dest, "--path", "tree")
            subprocess.run(["sync"], check=True)
            el = time.perf_counter() - t
            if r > 0:
                rows.append((side, el))
            shutil.rmtree(dest)
    cli("snapshot", "delete", mnt, "restore-src")
    shutil.rmtree(native)
    cp = statistics.median([e for s, e in rows if s == "cp"])
    sn = statistics.median([e for s, e in rows if s == "snapfs"])
    return {"runs": rows, "cp_median_s": cp, "snapfs_median_s": sn,
            "throughput_ratio_snapfs_over_cp": cp / sn}


def main():
    global BIN
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/var/tmp/snapfs-p3")
    ap.add_argument("--snapshots", type=int, default=100)
    ap.add_argument("--big-gib", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tput-seconds", type=int, default=15)
    ap.add_argument("--every", default="1",
                    help="throughput: snapshot cadences in seconds, comma-separated (P4: 1,10)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--sections", default="latency,throughput,restore",
                    help="comma-separated subset of latency,throughput,restore")
    a = ap.parse_args()
    sections = set(a.sections.split(","))
    if not sections <= {"latency", "throughput", "restore"}:
        sys.exit(f"unknown section in {a.sections!r}")
    BIN = snapfs_bin()
    if os.geteuid() != 0:
        sys.exit("run as root (mounts, drop_caches)")
    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir)
    free = shutil.disk_usage(a.workdir).free
    if free < (a.big_gib + 8) * (1 << 30):
        sys.exit(f"need {a.big_gib + 8} GiB free in {a.workdir}, have {free >> 30} GiB")
    store, mnt = os.path.join(a.workdir, "store"), os.path.join(a.workdir, "mnt")
    log = open(os.path.join(a.workdir, "snapfs.log"), "a")
    p = mount(store, mnt, log)
    data = Data()
    out = {"command": " ".join(sys.argv), "uname": os.uname().release}
    try:
        fill(os.path.join(mnt, "base-1g.bin"), 1, data)
        if "latency" in sections:
            out["latency_1gib"] = latency_run(mnt, a.snapshots, "l1")
            print("1 GiB stored:", json.dumps(out["latency_1gib"]), flush=True)
            fill(os.path.join(mnt, "base-more.bin"), a.big_gib - 1, data)
            out["latency_big"] = latency_run(mnt, a.snapshots, "l10")
            out["big_gib"] = a.big_gib
            print(f"{a.big_gib} GiB stored:", json.dumps(out["latency_big"]), flush=True)
            for k in ("daemon_ms", "cli_wall_ms"):
                out[f"p99_ratio_{k}"] = out["latency_big"][k]["p99"] / out["latency_1gib"][k]["p99"]
        if "throughput" in sections:
            every = [float(x) for x in a.every.split(",")]
            tput = {"none": []}
            tput.update({f"every_{e:g}s": [] for e in every})
            throughput_run(mnt, 3, None)  # warm-up
            for r in range(a.runs):
                # Sides in rotating order, so that none always runs first or last.
                sides = [("none", None)] + [(f"every_{e:g}s", e) for e in every]
                k = r % len(sides)
                for key, e in sides[k:] + sides[:k]:
                    tput[key].append(throughput_run(mnt, a.tput_seconds, e))
            out["tput_seconds"] = a.tput_seconds
            out["writer_mib_s"] = tput
            for key, xs in tput.items():
                if key != "none":
                    out[f"writer_ratio_{key}"] = statistics.median(xs) / statistics.median(
                        tput["none"])
            print("writer MiB/s:", json.dumps(tput), "ratios:",
                  {k: round(v, 3) for k, v in out.items() if k.startswith("writer_ratio_")},
                  flush=True)
        if "restore" in sections:
            if os.path.exists(os.path.join(mnt, "base-more.bin")):
                os.unlink(os.path.join(mnt, "base-more.bin"))
            out["restore"] = restore_bench(a.workdir, mnt, a.runs, data)
            print("restore:", json.dumps(out["restore"]), flush=True)
    finally:
        umount(mnt, p)
    print(json.dumps(out, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=2)
    shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
