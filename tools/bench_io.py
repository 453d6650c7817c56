#!/usr/bin/env python3
"""I/O workers and report generator for tools/bench.sh (stdlib only).

Timed subcommands (each appends one row to --out TSV and prints a line):
  write PATH --mib N --seed S          one file in 1 MiB write() calls + fsync
  pwrite DIR --mib N --seed S          N MiB as --files files from --writers
                                       concurrent processes, each file fsynced
  read PATH [--readers N]              read a file in 1 MiB reads (N processes: 1/N each)
  smallfiles DIR --count N --seed S    N files of --size bytes (no fsync)
Other subcommands:
  stored-bytes JSON_FILE               print stored_bytes, logical_bytes and
                                       unique_bytes of `snapfs stat --json`
  summarize TSV [--bench B] [--json F] markdown tables: per-run, medians, ratio

Data is generated *before* the timer starts from random.Random(seed), so it is
incompressible (or checkpoint-like with BENCH_DATA=bf16, see gen), unique per seed (bench.sh puts a per-invocation nonce, the
benchmark, side and run number in the seed) and reproducible for the dedup
test (same seed -> same bytes). Timings include open() and close().
"""
import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import time

MIB = 1 << 20
TSV_HEADER = "bench\tside\trun\tseconds\tbytes\tfiles\n"


def _bf16_table():
    """Maps a random byte to the high byte of a bf16 weight: a random sign and an exponent
    drawn from a narrow discretized Gaussian, as in a trained model's weights."""
    rng = random.Random(1)
    out = []
    for i in range(256):
        e = max(-60, min(60, int(round(rng.gauss(0, 3)))))
        out.append(((0x3C + e) & 0x7F) | (0x80 if i & 1 else 0))
    return bytes(out)


def gen(seed, nbytes):
    """Pseudo-random bytes, deterministic in `seed`: incompressible, or with BENCH_DATA=bf16
    checkpoint-like (the high byte of every 16-bit value skewed like a bf16 exponent; zstd -1
    saves about 12% on it)."""
    rng = random.Random(seed)
    buf = bytearray(nbytes)
    for off in range(0, nbytes, MIB):
        n = min(MIB, nbytes - off)
        buf[off:off + n] = rng.randbytes(n)
    if os.environ.get("BENCH_DATA") == "bf16":
        buf[1::2] = bytes(buf[1::2]).translate(_bf16_table())
    return buf


def write_all(fd, data, block):
    mv = memoryview(data)
    for off in range(0, len(mv), block):
        chunk = mv[off:off + block]
        while chunk:
            chunk = chunk[os.write(fd, chunk):]


def write_file(path, data, block):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, data, block)
        os.fsync(fd)
    finally:
        os.close(fd)


def record(args, seconds, nbytes, files=0):
    """Append a result row and print a human-readable line."""
    if args.out:
        new = not os.path.exists(args.out)
        with open(args.out, "a") as f:
            if new:
                f.write(TSV_HEADER)
            f.write(f"{args.bench}\t{args.side}\t{args.run}\t{seconds:.6f}"
                    f"\t{nbytes}\t{files}\n")
    rate = f"{files / seconds:10.0f} files/s" if files else \
        f"{nbytes / MIB / seconds:10.1f} MiB/s"
    print(f"  {args.bench:<10} {args.side:<7} run {args.run:<7}"
          f"{seconds:9.3f} s {rate}", flush=True)


def cmd_write(args):
    data = gen(args.seed, args.mib * MIB)
    t0 = time.perf_counter()
    write_file(args.path, data, args.block_kib * 1024)
    record(args, time.perf_counter() - t0, len(data))


def _writer(paths, seeds, nbytes, block, barrier):
    bufs = [gen(s, nbytes) for s in seeds]      # generate before the barrier
    barrier.wait()
    for path, buf in zip(paths, bufs):
        write_file(path, buf, block)


def cmd_pwrite(args):
    if args.files % args.writers:
        sys.exit("pwrite: --files must be a multiple of --writers")
    per_file = args.mib * MIB // args.files
    per_writer = args.files // args.writers
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(args.writers + 1)
    procs = []
    for w in range(args.writers):
        idx = range(w * per_writer, (w + 1) * per_writer)
        paths = [os.path.join(args.dir, f"part{i}.bin") for i in idx]
        seeds = [f"{args.seed}-f{i}" for i in idx]
        p = ctx.Process(target=_writer,
                        args=(paths, seeds, per_file, args.block_kib * 1024, barrier))
        p.start()
        procs.append(p)
    barrier.wait()                  # all writers have their data ready
    t0 = time.perf_counter()
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - t0
    if any(p.exitcode != 0 for p in procs):
        sys.exit("pwrite: a writer process failed")
    record(args, elapsed, per_file * args.files)


def _read_range(path, start, length, block, barrier, q):
    buf = bytearray(block)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        barrier.wait()
        total, pos, end = 0, start, start + length
        while pos < end:
            n = os.preadv(fd, [view[:min(block, end - pos)]], pos)
            if not n:
                break
            total += n
            pos += n
    finally:
        os.close(fd)
    q.put(total)


def cmd_read(args):
    if args.readers > 1:
        # N processes, each reading its own contiguous 1/N of the file (a parallel load of
        # one checkpoint), started together; timed until the last one is done.
        size = os.stat(args.path).st_size
        per = -(-size // args.readers)
        ctx = mp.get_context("fork")
        barrier = ctx.Barrier(args.readers + 1)
        q = ctx.Queue()
        procs = [ctx.Process(target=_read_range,
                             args=(args.path, i * per, max(0, min(per, size - i * per)),
                                   args.block_kib * 1024, barrier, q))
                 for i in range(args.readers)]
        for p in procs:
            p.start()
        barrier.wait()
        t0 = time.perf_counter()
        total = sum(q.get() for _ in procs)
        for p in procs:
            p.join()
        elapsed = time.perf_counter() - t0
        if any(p.exitcode != 0 for p in procs):
            sys.exit("read: a reader process failed")
    else:
        buf = bytearray(args.block_kib * 1024)
        total = 0
        t0 = time.perf_counter()
        with open(args.path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                total += n
        elapsed = time.perf_counter() - t0
    if args.expect_mib and total != args.expect_mib * MIB:
        sys.exit(f"read: got {total} bytes, expected {args.expect_mib} MiB")
    record(args, elapsed, total)


def cmd_smallfiles(args):
    data = memoryview(gen(args.seed, args.count * args.size))
    os.makedirs(args.dir, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    t0 = time.perf_counter()
    for i in range(args.count):
        fd = os.open(os.path.join(args.dir, f"f{i:06d}"), flags, 0o644)
        write_all(fd, data[i * args.size:(i + 1) * args.size], args.size)
        os.close(fd)
    record(args, time.perf_counter() - t0, args.count * args.size, args.count)


STAT_FIELDS = ("stored_bytes", "logical_bytes", "unique_bytes")


def cmd_stored_bytes(args):
    """Print stored_bytes, logical_bytes and unique_bytes of `snapfs stat
    --json` (exact field names; NA for a missing one)."""
    with open(args.json_file) as f:
        st = json.load(f)
    vals = [st.get(k) if isinstance(st, dict) else None for k in STAT_FIELDS]
    print(" ".join(str(int(v)) if isinstance(v, (int, float)) else "NA" for v in vals))


def _rate(row):
    s = row["seconds"]
    return row["files"] / s if row["files"] else row["bytes"] / MIB / s


def summarize(rows, bench):
    """Markdown table for one benchmark + dict of medians."""
    rows = [r for r in rows if r["bench"] == bench]
    unit = "files/s" if any(r["files"] for r in rows) else "MiB/s"
    prec = 0 if unit == "files/s" else 1
    sides = list(dict.fromkeys(r["side"] for r in rows))
    if "native" in sides:
        sides = ["native"] + [s for s in sides if s != "native"]
    runs = list(dict.fromkeys(r["run"] for r in rows))
    by = {(r["side"], r["run"]): r for r in rows}
    head = "| run | " + " | ".join(f"{s} s | {s} {unit}" for s in sides) + " |"
    out = [f"### {bench}", "", head, "|---" * (1 + 2 * len(sides)) + "|"]
    for run in runs:
        cells = []
        for s in sides:
            r = by.get((s, run))
            cells += [f"{r['seconds']:.3f}", f"{_rate(r):.{prec}f}"] if r else ["", ""]
        out.append(f"| {run} | " + " | ".join(cells) + " |")
    med = {}
    for s in sides:
        timed = [r for r in rows if r["side"] == s and r["run"] != "warmup"]
        if timed:
            med[s] = {"runs": len(timed),
                      "median_seconds": statistics.median(r["seconds"] for r in timed),
                      "median_rate": statistics.median(_rate(r) for r in timed),
                      "unit": unit}
    cells = []
    for s in sides:
        m = med.get(s)
        cells += [f"**{m['median_seconds']:.3f}**", f"**{m['median_rate']:.{prec}f}**"] \
            if m else ["", ""]
    out.append("| median | " + " | ".join(cells) + " |")
    for s in sides:
        if s == "native" or "native" not in med or s not in med:
            continue
        key = "ratio_snapfs_over_native" if s == "snapfs" else f"ratio_{s}_over_native"
        med[key] = med[s]["median_rate"] / med["native"]["median_rate"]
        # Each run's ratio against the native run just before it (the same disk mood, mostly).
        paired = [_rate(by[(s, run)]) / _rate(by[("native", run)]) for run in runs
                  if run != "warmup" and (s, run) in by and ("native", run) in by]
        line = (f"Throughput ratio {s}/native (of medians): **{med[key]:.2f}** "
                f"(>1 = {s} faster)")
        if paired:
            med[f"paired_{s}_over_native"] = sorted(paired)
            line += (f"; per-run ratios {', '.join(f'{p:.2f}' for p in paired)}, "
                     f"median **{statistics.median(paired):.2f}**")
        out += ["", line]
    out += ["", "warmup runs are excluded from the medians.", ""]
    return "\n".join(out), med


def cmd_summarize(args):
    with open(args.tsv) as f:
        lines = f.read().splitlines()
    keys = lines[0].split("\t")
    rows = []
    for line in lines[1:]:
        r = dict(zip(keys, line.split("\t")))
        r["seconds"] = float(r["seconds"])
        r["bytes"], r["files"] = int(r["bytes"]), int(r["files"])
        rows.append(r)
    benches = [args.bench] if args.bench else list(dict.fromkeys(r["bench"] for r in rows))
    summary = {}
    for b in benches:
        text, summary[b] = summarize(rows, b)
        print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def timed(name, func):
        p = sub.add_parser(name)
        p.add_argument("--out", help="append a result row to this TSV")
        p.add_argument("--bench", default=name)
        p.add_argument("--side", default="-")
        p.add_argument("--run", default="-")
        p.add_argument("--block-kib", type=int, default=1024)
        p.set_defaults(func=func)
        return p

    p = timed("write", cmd_write)
    p.add_argument("path")
    p.add_argument("--mib", type=int, required=True)
    p.add_argument("--seed", required=True)
    p = timed("pwrite", cmd_pwrite)
    p.add_argument("dir")
    p.add_argument("--mib", type=int, required=True, help="total over all files")
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--writers", type=int, default=2)
    p.add_argument("--seed", required=True)
    p = timed("read", cmd_read)
    p.add_argument("path")
    p.add_argument("--expect-mib", type=int, default=0)
    p.add_argument("--readers", type=int, default=1,
                   help="processes reading one contiguous 1/N of the file each")
    p = timed("smallfiles", cmd_smallfiles)
    p.add_argument("dir")
    p.add_argument("--count", type=int, default=10000)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--seed", required=True)
    p = sub.add_parser("stored-bytes")
    p.add_argument("json_file")
    p.set_defaults(func=cmd_stored_bytes)
    p = sub.add_parser("summarize")
    p.add_argument("tsv")
    p.add_argument("--bench")
    p.add_argument("--json", help="also write medians/ratios as JSON here")
    p.set_defaults(func=cmd_summarize)

    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
