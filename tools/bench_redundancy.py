#!/usr/bin/env python3
"""Redundancy, encryption and scrub benchmarks for snapfs (issue 10; python3 stdlib only;
run as root). Reuses the helpers of tools/bench_replication.py.

Sections (sides alternate run by run, rotating their order; one warm-up run, not counted):

  layouts  replication throughput: a fresh store (no backend) holding a fresh file of
           --size random bytes (1 MiB writes + fsync); `backend add MNT b SPEC`, timed until
           `status --json` shows pending_chunks 0 and uploaded_bytes >= size. Sides:
             dir      dir:BK                                  (the baseline)
             mirror2  mirror:dir:BK0,dir:BK1
             ec42     ec:4+2:dir:BK0,...,dir:BK5
             enc      dir:BK --encrypt (key file)
           Reported: seconds, MiB/s, daemon CPU-seconds, bytes stored under the backend
           directories over the bytes uploaded (the stored-bytes overhead), and each side's
           throughput over dir's in the same run.
  scrub    a store replicated to dir:BK (size bytes), unmounted; `snapfs scrub STORE
           --backend b` (every backend object read, verified) against `b3sum` of the same
           files under BK, alternating.

    python3 tools/bench_redundancy.py [--bin PATH] [--runs 5] [--size 1GiB-in-bytes]
        [--sections layouts,scrub] [--workdir /var/tmp/snapfs-bench-red] [--out FILE]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_replication as br  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
SIDES = ["dir", "mirror2", "ec42", "enc"]


def du(paths):
    total = 0
    for root in paths:
        for d, _s, files in os.walk(root):
            for f in files:
                try:
                    total += os.lstat(os.path.join(d, f)).st_size
                except FileNotFoundError:
                    pass
    return total


def side_spec(side, W):
    """(spec, extra args, backend directories)."""
    if side == "dir":
        d = os.path.join(W, "bk")
        return f"dir:{d}", [], [d]
    if side == "enc":
        d = os.path.join(W, "bk")
        return f"dir:{d}", ["--encrypt", "--key-file", os.path.join(W, "keyfile")], [d]
    n = 2 if side == "mirror2" else 6
    dirs = [os.path.join(W, f"bk{i}") for i in range(n)]
    members = ",".join(f"dir:{d}" for d in dirs)
    spec = f"mirror:{members}" if side == "mirror2" else f"ec:4+2:{members}"
    return spec, [], dirs


def layout_run(src, side, tag):
    W = br.ARGS.workdir
    store, mnt = os.path.join(W, "red-store"), os.path.join(W, "red-mnt")
    spec, extra, dirs = side_spec(side, W)
    for d in dirs:
        br.rmtree(d)
    buf = br.load(src)
    d = br.Daemon(store, mnt, [], f"red-{side}-{tag}")
    rec = {}
    try:
        os.makedirs(os.path.join(mnt, "ckpt"))
        rec["write_seconds"] = br.write_fsync(os.path.join(mnt, "ckpt", "x"), buf)
        del buf
        br.sync()
        time.sleep(0.5)
        c0 = d.cpu()
        t0 = time.monotonic()
        br.cli("backend", "add", mnt, "b", spec, *extra)
        _secs, b, polls = br.wait_drained(mnt, "b", min_bytes=br.ARGS.size)
        t1 = time.monotonic()
        rec.update(seconds=t1 - t0, cpu=d.cpu() - c0, polls=polls,
                   uploaded_bytes=b.get("uploaded_bytes"),
                   stored_bytes=du(dirs))
        rec["overhead"] = rec["stored_bytes"] / max(1, rec["uploaded_bytes"] or 1)
    finally:
        d.stop()
        br.rmtree(store)
        for x in dirs:
            br.rmtree(x)
    return rec


def section_layouts(results):
    W = br.ARGS.workdir
    with open(os.path.join(W, "keyfile"), "wb") as f:
        f.write(os.urandom(32))
    n = br.ARGS.runs + 1
    srcs = br.gen_sources("red", n, br.ARGS.size)
    runs = []
    try:
        for i, src in enumerate(srcs):
            order = SIDES[i % len(SIDES):] + SIDES[:i % len(SIDES)]
            rec = {"run": i, "warmup": i == 0, "order": order}
            for side in order:
                br.sync()
                rec[side] = layout_run(src, side, f"r{i}")
            base = rec["dir"]["seconds"]
            br.log(f"layouts run {i}{' (warm-up)' if i == 0 else ''}: " + ", ".join(
                f"{s} {rec[s]['seconds']:.2f} s ({base / rec[s]['seconds']:.2f}x, "
                f"{rec[s]['overhead']:.2f}x stored, {rec[s]['cpu']:.1f} CPU-s)" for s in SIDES))
            runs.append(rec)
            br.drop_sources([src])
    finally:
        br.drop_sources(srcs)
    meas = [r for r in runs if not r["warmup"]]
    out = {"runs": runs}
    for s in SIDES:
        out[s] = {
            "seconds": br.stats([r[s]["seconds"] for r in meas]),
            "mib_s": br.stats([br.ARGS.size / MIB / r[s]["seconds"] for r in meas]),
            "cpu_s_per_gib": br.stats([r[s]["cpu"] / (br.ARGS.size / GIB) for r in meas]),
            "overhead": br.stats([r[s]["overhead"] for r in meas]),
            "ratio_vs_dir": br.stats([r["dir"]["seconds"] / r[s]["seconds"] for r in meas]),
        }
    results["layouts"] = out


def section_scrub(results):
    W = br.ARGS.workdir
    store, mnt, bk = (os.path.join(W, x) for x in ("scrub-store", "scrub-mnt", "scrub-bk"))
    br.rmtree(bk)
    src = br.gen_sources("scrub", 1, br.ARGS.size)[0]
    d = br.Daemon(store, mnt, ["--replicate", f"dir:{bk}"], "scrub-daemon")
    try:
        br.write_fsync(os.path.join(mnt, "x"), br.load(src))
        name = br.status(mnt)["name"]
        br.wait_drained(mnt, name, min_bytes=br.ARGS.size)
    finally:
        d.stop()
        br.drop_sources([src])
    files = []
    for dd, _s, fs in os.walk(bk):
        files += [os.path.join(dd, f) for f in fs]
    nbytes = du([bk])
    runs = []
    for i in range(br.ARGS.runs + 1):
        order = ["scrub", "b3sum"] if i % 2 == 0 else ["b3sum", "scrub"]
        rec = {"run": i, "warmup": i == 0, "order": order}
        for side in order:
            br.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=False)
            t0 = time.monotonic()
            if side == "scrub":
                r = br.cli("scrub", store, "--backend", name, "--json")
                rep = json.loads(r.stdout)
                rec["scrub_objects"] = rep["backends"][0]["objects"]["checked"]
            else:
                for k in range(0, len(files), 2000):
                    br.run(["b3sum", "--no-names", *files[k:k + 2000]])
            rec[side] = time.monotonic() - t0
        br.log(f"scrub run {i}{' (warm-up)' if i == 0 else ''}: scrub {rec['scrub']:.2f} s, "
               f"b3sum {rec['b3sum']:.2f} s of {nbytes / MIB:.0f} MiB in {len(files)} files")
        runs.append(rec)
    meas = [r for r in runs if not r["warmup"]]
    results["scrub"] = {
        "runs": runs, "bytes": nbytes, "files": len(files),
        "scrub_seconds": br.stats([r["scrub"] for r in meas]),
        "b3sum_seconds": br.stats([r["b3sum"] for r in meas]),
        "ratio": br.stats([r["b3sum"] / r["scrub"] for r in meas]),
    }
    br.rmtree(store)
    br.rmtree(bk)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", default=os.path.expanduser("~/.cache/snapfs/target/release/snapfs"))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--size", type=int, default=GIB)
    p.add_argument("--sections", default="layouts,scrub")
    p.add_argument("--workdir", default="/var/tmp/snapfs-bench-red")
    p.add_argument("--out")
    args = p.parse_args()
    args.logdir = os.path.join(args.workdir, "logs")
    os.makedirs(args.logdir, exist_ok=True)
    br.ARGS = args
    br.BIN = args.bin
    if "scrub" in args.sections and shutil.which("b3sum") is None:
        br.log("installing b3sum (Debian package) for the scrub baseline")
        br.run(["apt-get", "install", "-y", "-qq", "b3sum"], timeout=600)
    results = {"machine": br.machine(), "args": vars(args)}
    try:
        for s in args.sections.split(","):
            {"layouts": section_layouts, "scrub": section_scrub}[s](results)
    finally:
        for d in list(br.DAEMONS):
            d.stop()
        out = args.out or os.path.join(args.workdir, "results.json")
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
        br.log(f"results in {out}")
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=1,
                     default=str)[:6000])


if __name__ == "__main__":
    main()
