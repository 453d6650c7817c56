#!/usr/bin/env python3
"""Replication benchmarks for snapfs (issue 8; python3 stdlib only; run as root).

Sections (each alternates its sides run by run, one warm-up run first, not counted):

  window   backup window: a fresh store mounted with --replicate dir:BACKEND; a writer
           writes a fresh 1 GiB file into MNT/ckpt/ (1 MiB writes + fsync); then
           `snapshot create` and `snapshot wait`; the window is from `create` returning to
           `wait` returning (time.monotonic around the `wait` subprocess), also the
           window_seconds of `status --json`. Baseline: `restic backup` of the same file in a
           plain directory to a fresh local restic repository (`restic init` not timed).
  garage   the same window against a real Garage on 127.0.0.1 (s3://BUCKET/PREFIX); restic
           to a local repository is the baseline; restic's s3 backend to the same Garage is
           tried as well and reported if it works.
  p8       replication throughput: a fresh store (no backend) holding a fresh 1 GiB file;
           `backend add MNT b dir:BACKEND`, timed until `status --json` shows pending_chunks 0
           and uploaded_bytes >= 1 GiB (polled every 20 ms). Baseline: `cp` of the same
           source file to a directory on the same disk followed by `sync`.
  small    10,000 fresh 4 KiB files written into a fresh store (no backend), then
           `backend add`, timed until pending_chunks 0: objects per second; objects under
           BACKEND counted (chunks/ and meta/), then `snapshot create` + `snapshot wait` and
           counted again.
  window-drained, garage-drained (diagnostics, not in the default set): the window sections
           with the backlog read right after the fsync and drained before `create`, so the
           window is the metadata part alone.
  p4       writer throughput with replication ON (--replicate dir:BACKEND) and OFF: fresh
           store, a fresh 1 GiB file written (1 MiB writes) + fsync, timed.

Daemon CPU: utime+stime of the daemon from /proc/PID/stat before and after (all threads).
Every run uses a new source file of os.urandom bytes (64 MiB pieces), generated before the
timed part. Everything (stores, mountpoints, dir: backends, restic repositories, Garage's
data, sources) lives under --workdir, which must be on the real disk.

    python3 tools/bench_replication.py [--bin /tmp/bench/snapfs] [--runs 5]
        [--sections window,garage,p8,small,p4] [--perf-p8] [--out results.json]

Prints a summary table; writes every raw number to --out (default WORKDIR/results.json).
"""
import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

MIB = 1 << 20
GIB = 1 << 30
PIECE = 64 * MIB
HERE = os.path.dirname(os.path.abspath(__file__))
CLK_TCK = os.sysconf("SC_CLK_TCK")

ARGS = None
BIN = None
DAEMONS = []          # live Daemon objects, for cleanup
GARAGE_DIRS = []      # started Garage dirs, for cleanup
NONCE = os.urandom(4).hex()


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ helpers ----

def run(cmd, env=None, check=True, timeout=900):
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): "
                           f"{r.stderr.strip()[-800:]}")
    return r


def cli(*args, env=None, check=True, timeout=900):
    return run([BIN, *args], env=env, check=check, timeout=timeout)


def mounted(mnt):
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == mnt for line in f)


def rmtree(path):
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)


def sync():
    os.sync()


def median(xs):
    return statistics.median(xs) if xs else None


def stats(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"n": 0, "median": None, "min": None, "max": None}
    return {"n": len(xs), "median": statistics.median(xs), "min": min(xs), "max": max(xs)}


class Daemon:
    """`snapfs mount STORE MNT [extra]` in the background."""

    def __init__(self, store, mnt, extra, logname, env=None):
        rmtree(store)
        os.makedirs(mnt, exist_ok=True)
        if mounted(mnt):
            raise RuntimeError(f"{mnt} is already a mountpoint")
        self.mnt = mnt
        self.store = store
        self.logpath = os.path.join(ARGS.logdir, logname + ".log")
        self.logf = open(self.logpath, "w")
        self.p = subprocess.Popen([BIN, "mount", store, mnt, *extra], stdout=self.logf,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        DAEMONS.append(self)
        t = time.monotonic()
        while not mounted(mnt):
            if self.p.poll() is not None:
                raise RuntimeError(f"snapfs mount exited {self.p.returncode}; see {self.logpath}")
            if time.monotonic() - t > 60:
                raise RuntimeError(f"{mnt} not mounted after 60 s; see {self.logpath}")
            time.sleep(0.01)

    def cpu(self):
        """utime + stime of the daemon (all its threads), in seconds."""
        with open(f"/proc/{self.p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def thread_cpu(self):
        """{thread name: utime+stime seconds}, summed over threads of the same name."""
        out = {}
        base = f"/proc/{self.p.pid}/task"
        for tid in os.listdir(base):
            try:
                with open(f"{base}/{tid}/stat") as f:
                    raw = f.read()
            except FileNotFoundError:
                continue
            name = raw[raw.index("(") + 1:raw.rindex(")")]
            fields = raw.rsplit(")", 1)[1].split()
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
        return out

    def stop(self):
        if self.p.poll() is None:
            for _ in range(5):
                if not mounted(self.mnt):
                    break
                r = cli("umount", self.mnt, check=False, timeout=120)
                if r.returncode == 0 or not mounted(self.mnt):
                    break
                time.sleep(1)
            try:
                self.p.wait(timeout=180)
            except subprocess.TimeoutExpired:
                log(f"WARNING: daemon {self.p.pid} still running 180 s after umount; SIGTERM")
                self.p.send_signal(signal.SIGTERM)
                try:
                    self.p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.p.kill()
                    self.p.wait()
        if mounted(self.mnt):
            run(["umount", "-l", self.mnt], check=False)
        self.logf.close()
        if self in DAEMONS:
            DAEMONS.remove(self)
        return self.p.returncode


def status(mnt, name=None):
    out = json.loads(cli("status", mnt, "--json").stdout)
    bks = out.get("backends", [])
    if name is None:
        return bks[0] if bks else None
    for b in bks:
        if b.get("name") == name:
            return b
    return None


def snap_status(bk, snap):
    for s in (bk or {}).get("snapshots", []):
        if s.get("name") == snap:
            return s
    return None


def wait_drained(mnt, name, min_bytes=0, min_chunks=0, poll=0.02, timeout=600):
    """Poll `status --json` until pending_chunks == 0 and the upload counters reach the
    minimums. Returns (seconds since call, last backend status, number of polls)."""
    t0 = time.monotonic()
    polls = 0
    while True:
        b = status(mnt, name)
        polls += 1
        if (b is not None and b.get("pending_chunks") == 0
                and (b.get("uploaded_bytes") or 0) >= min_bytes
                and (b.get("uploaded_chunks") or 0) >= min_chunks):
            return time.monotonic() - t0, b, polls
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"backend {name} of {mnt} not drained after {timeout} s: {b}")
        time.sleep(poll)


def count_objects(root):
    """Files under each top-level directory of a dir: backend (temporaries excluded)."""
    counts = {}
    for top in sorted(os.listdir(root)):
        p = os.path.join(root, top)
        if os.path.isdir(p):
            n = 0
            for _d, _s, files in os.walk(p):
                n += sum(1 for f in files if not f.startswith(".tmp."))
            counts[top] = n
        elif not top.startswith(".tmp."):
            counts.setdefault("(top-level files)", 0)
            counts["(top-level files)"] += 1
    return counts


# ------------------------------------------------------------------ sources ----

def gen_sources(tag, n, size):
    """n fresh files of os.urandom bytes under WORK/src, written in 64 MiB pieces, synced."""
    d = os.path.join(ARGS.workdir, "src")
    os.makedirs(d, exist_ok=True)
    paths = []
    t = time.monotonic()
    for i in range(n):
        p = os.path.join(d, f"bench-src-{tag}-{i}")
        with open(p, "wb") as f:
            left = size
            while left:
                k = min(PIECE, left)
                f.write(os.urandom(k))
                left -= k
        paths.append(p)
    sync()
    log(f"generated {n} source file(s) of {size / MIB:.0f} MiB for {tag} "
        f"in {time.monotonic() - t:.1f} s")
    return paths


def drop_sources(paths):
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def load(src):
    with open(src, "rb") as f:
        return bytearray(f.read())


def write_fsync(path, buf, block=MIB):
    """open, 1 MiB writes, fsync, close. Returns seconds."""
    mv = memoryview(buf)
    t = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, len(mv), block):
            chunk = mv[off:off + block]
            while chunk:
                chunk = chunk[os.write(fd, chunk):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.monotonic() - t


def copy_fsync(src, dst):
    buf = load(src)
    write_fsync(dst, buf)
    del buf


# ------------------------------------------------------------------- restic ----

def restic_env(extra=None):
    env = dict(os.environ)
    env["RESTIC_PASSWORD"] = "snapfs-bench"
    env["NO_PROXY"] = "127.0.0.1,localhost"
    env["no_proxy"] = "127.0.0.1,localhost"
    if extra:
        env.update(extra)
    return env


def restic_run(repo, src, tag, env_extra=None, repo_opts=()):
    """restic init (not timed), then timed `restic backup DIR` of a directory holding a
    copy of src. Returns a record."""
    W = ARGS.workdir
    d = os.path.join(W, f"restic-data-{tag}")
    rmtree(d)
    os.makedirs(d)
    copy_fsync(src, os.path.join(d, "x"))
    env = restic_env(env_extra)
    if not repo.startswith("s3:"):
        rmtree(repo)
    run(["restic", "-r", repo, *repo_opts, "init"], env=env)
    sync()
    t = time.monotonic()
    r = run(["restic", "-r", repo, *repo_opts, "backup", "--quiet", d], env=env)
    secs = time.monotonic() - t
    rec = {"seconds": secs, "stdout_tail": r.stdout.strip()[-300:]}
    rmtree(d)
    if not repo.startswith("s3:"):
        rmtree(repo)
    return rec


# -------------------------------------------------------------- snapfs sides ----

def snapfs_window(src, tag, replicate, env=None, drain_first=False):
    """Fresh store with --replicate; write src into MNT/ckpt/x + fsync; create; wait.
    drain_first (diagnostic): after the fsync, read the backlog once and wait until the
    queue is empty before `create`, so the window is the metadata part alone."""
    W = ARGS.workdir
    store, mnt = os.path.join(W, "w-store"), os.path.join(W, "w-mnt")
    buf = load(src)
    sync()
    d = Daemon(store, mnt, replicate, f"window-{tag}", env=env)
    rec = {}
    try:
        os.makedirs(os.path.join(mnt, "ckpt"))
        c0 = d.cpu()
        rec["write_seconds"] = write_fsync(os.path.join(mnt, "ckpt", "x"), buf)
        c1 = d.cpu()
        del buf
        if drain_first:
            b0 = status(mnt) or {}
            rec["pending_chunks_after_fsync"] = b0.get("pending_chunks")
            rec["pending_bytes_after_fsync"] = b0.get("pending_bytes")
            rec["drain_seconds"], _, _ = wait_drained(mnt, None)
            c1 = d.cpu()
        snap = f"ckpt-{tag}"
        t = time.monotonic()
        cli("snapshot", "create", mnt, snap)
        t1 = time.monotonic()
        r = cli("snapshot", "wait", mnt, snap, "--timeout", "300s", check=False, timeout=400)
        t2 = time.monotonic()
        c2 = d.cpu()
        rec.update(create_seconds=t1 - t, window_seconds=t2 - t1, wait_rc=r.returncode,
                   wait_output=(r.stdout + r.stderr).strip()[-300:],
                   cpu_write=c1 - c0, cpu_window=c2 - c1)
        b = status(mnt)
        s = snap_status(b, snap) or {}
        rec["status_window_seconds"] = s.get("window_seconds")
        rec["status_snapshot"] = s
        rec["status"] = {k: v for k, v in (b or {}).items() if k != "snapshots"}
        if r.returncode != 0:
            log(f"WARNING: snapshot wait failed: {rec['wait_output']}")
    finally:
        d.stop()
        rmtree(store)
    return rec


# ---------------------------------------------------------------- sections ----

def section_window(results, kind, drained=False):
    """kind: 'dir' or 'garage'; drained: the diagnostic variant (see snapfs_window)."""
    W = ARGS.workdir
    n = ARGS.runs + 1
    srcs = gen_sources(f"{kind}-window", n, ARGS.size)
    runs = []
    env = None
    restic_s3 = None
    garage_dir = None
    try:
        if kind == "garage":
            garage_dir = os.path.join(W, "garage")
            rmtree(garage_dir)
            env, port = start_garage(garage_dir)
            bucket = env["SNAPFS_TEST_S3_BUCKET"]
            endpoint = env["SNAPFS_TEST_S3_ENDPOINT"]
            # restic's s3 backend against the same Garage: optional; probe once.
            restic_s3 = probe_restic_s3(env, endpoint, bucket)
        for i, src in enumerate(srcs):
            tag = f"{kind}{i}"
            sides = ["snapfs", "restic"]
            if restic_s3 and restic_s3.get("ok"):
                sides.append("restic-s3")
            if i % 2:
                sides.reverse()
            rec = {"run": i, "warmup": i == 0, "order": sides}
            for side in sides:
                sync()
                if side == "snapfs":
                    if kind == "dir":
                        bk = os.path.join(W, f"w-bk-{i}")
                        rmtree(bk)
                        os.makedirs(bk)
                        rec["snapfs"] = snapfs_window(src, tag, ["--replicate", f"dir:{bk}"],
                                                      drain_first=drained)
                        rec["snapfs"]["backend_objects"] = count_objects(bk)
                        rmtree(bk)
                    else:
                        spec = f"s3://{bucket}/bench-{NONCE}-w{i}"
                        rec["snapfs"] = snapfs_window(
                            src, tag, ["--replicate", spec, "--endpoint", endpoint,
                                       "--region", "garage"], env=env, drain_first=drained)
                        rec["snapfs"]["spec"] = spec
                elif side == "restic":
                    rec["restic"] = restic_run(os.path.join(W, f"restic-repo-{i}"), src, tag)
                else:
                    repo = f"s3:{endpoint}/{bucket}/restic-{NONCE}-{i}"
                    try:
                        rec["restic_s3"] = restic_run(repo, src, tag + "s3",
                                                      env_extra=garage_env_for_restic(env),
                                                      repo_opts=restic_s3["opts"])
                    except Exception as e:  # optional figure: record and go on
                        rec["restic_s3"] = {"error": str(e)[-500:]}
                        log(f"restic s3 run {i} failed: {str(e)[-200:]}")
            s = rec["snapfs"]
            line = (f"{kind} run {i}{' (warm-up)' if i == 0 else ''}: snapfs write "
                    f"{s['write_seconds']:.3f} s, create {s['create_seconds'] * 1000:.1f} ms, "
                    f"window {s['window_seconds'] * 1000:.1f} ms (status "
                    f"{s['status_window_seconds']}), restic {rec['restic']['seconds']:.3f} s")
            if "restic_s3" in rec and "seconds" in rec["restic_s3"]:
                line += f", restic-s3 {rec['restic_s3']['seconds']:.3f} s"
            if drained:
                line += (f"; backlog after fsync {s['pending_chunks_after_fsync']} chunks, "
                         f"drained in {s['drain_seconds']:.3f} s")
            log(line)
            runs.append(rec)
            drop_sources([src])
    finally:
        drop_sources(srcs)
        if garage_dir:
            stop_garage(garage_dir)
            rmtree(garage_dir)
    meas = [r for r in runs if not r["warmup"]]
    win = [r["snapfs"]["window_seconds"] for r in meas]
    swin = [r["snapfs"]["status_window_seconds"] for r in meas]
    res = [r["restic"]["seconds"] for r in meas]
    out = {
        "runs": runs,
        "window_seconds": stats(win),
        "status_window_seconds": stats(swin),
        "create_seconds": stats([r["snapfs"]["create_seconds"] for r in meas]),
        "writer_seconds": stats([r["snapfs"]["write_seconds"] for r in meas]),
        "restic_seconds": stats(res),
        "ratio_restic_over_window": (median(res) / median(win)) if win and median(win) else None,
        "ratio_per_run": stats([a / b for a, b in zip(res, win) if b]),
        "all_waits_ok": all(r["snapfs"]["wait_rc"] == 0 for r in runs),
        "cpu_window": stats([r["snapfs"]["cpu_window"] for r in meas]),
        "cpu_write": stats([r["snapfs"]["cpu_write"] for r in meas]),
    }
    if drained:
        out["pending_chunks_after_fsync"] = stats(
            [r["snapfs"]["pending_chunks_after_fsync"] for r in meas])
        out["drain_seconds"] = stats([r["snapfs"]["drain_seconds"] for r in meas])
    if restic_s3 is not None:
        out["restic_s3_probe"] = restic_s3
        r3 = [r["restic_s3"]["seconds"] for r in meas
              if "restic_s3" in r and "seconds" in r["restic_s3"]]
        out["restic_s3_seconds"] = stats(r3)
        if r3 and win and len(r3) == len(meas):
            out["ratio_restic_s3_over_window"] = median(r3) / median(win)
    results[f"window_{kind}{'_drained' if drained else ''}"] = out


def garage_env_for_restic(env):
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION")
    return {k: env[k] for k in keys if k in env}


def probe_restic_s3(env, endpoint, bucket):
    """Try `restic init` on Garage, with and without -o s3.region=garage."""
    tries = []
    for opts in (["-o", "s3.region=garage"], []):
        repo = f"s3:{endpoint}/{bucket}/restic-probe-{NONCE}-{len(tries)}"
        r = run(["restic", "-r", repo, *opts, "init"], check=False,
                env=restic_env(garage_env_for_restic(env)), timeout=120)
        tries.append({"opts": opts, "rc": r.returncode, "stderr": r.stderr.strip()[-400:]})
        if r.returncode == 0:
            log(f"restic s3 backend to Garage works (options {opts})")
            return {"ok": True, "opts": opts, "tries": tries}
    log(f"restic s3 backend to Garage did not work: {tries[-1]['stderr'][-200:]}")
    return {"ok": False, "opts": [], "tries": tries}


def start_garage(d):
    r = run([os.path.join(HERE, "garage.sh"), "start", d], timeout=180)
    GARAGE_DIRS.append(d)
    env = dict(os.environ)
    with open(os.path.join(d, "env")) as f:
        for line in f:
            line = line.strip()
            if line.startswith("export ") and "=" in line:
                k, v = line[len("export "):].split("=", 1)
                env[k] = v.strip("'\"")
    env["NO_PROXY"] = "127.0.0.1,localhost"
    port = env["SNAPFS_TEST_S3_ENDPOINT"].rsplit(":", 1)[1]
    log(f"Garage started: {env['SNAPFS_TEST_S3_ENDPOINT']} bucket {env['SNAPFS_TEST_S3_BUCKET']}"
        f" ({r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''})")
    return env, port


def stop_garage(d):
    run([os.path.join(HERE, "garage.sh"), "stop", d], check=False, timeout=120)
    if d in GARAGE_DIRS:
        GARAGE_DIRS.remove(d)


def p8_snapfs(src, tag, perf=None):
    """perf: None, "record" (perf record -g of the daemon) or "trace" (perf trace -s)."""
    W = ARGS.workdir
    store, mnt = os.path.join(W, "p8-store"), os.path.join(W, "p8-mnt")
    bk = os.path.join(W, "p8-bk")
    rmtree(bk)
    buf = load(src)
    d = Daemon(store, mnt, [], f"p8-{tag}")
    rec = {}
    try:
        os.makedirs(os.path.join(mnt, "ckpt"))
        rec["write_seconds"] = write_fsync(os.path.join(mnt, "ckpt", "x"), buf)
        del buf
        sync()
        time.sleep(0.5)
        perfp = None
        if perf == "record":
            perfp = subprocess.Popen(
                ["perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-p", str(d.p.pid),
                 "-o", os.path.join(W, "perf-p8.data")],
                stdout=subprocess.DEVNULL, stderr=open(os.path.join(ARGS.logdir, "perf.log"), "w"))
            time.sleep(1.0)
        elif perf == "trace":
            perfp = subprocess.Popen(
                ["perf", "trace", "-s", "-a",
                 "-o", os.path.join(ARGS.logdir, "perf-trace-p8.txt")],
                stdout=subprocess.DEVNULL,
                stderr=open(os.path.join(ARGS.logdir, "perf-trace.log"), "w"))
            time.sleep(1.0)
        th0 = d.thread_cpu()
        c0 = d.cpu()
        t0 = time.monotonic()
        cli("backend", "add", mnt, "b", f"dir:{bk}")
        t1 = time.monotonic()
        secs, b, polls = wait_drained(mnt, "b", min_bytes=ARGS.size)
        t2 = time.monotonic()
        c1 = d.cpu()
        th1 = d.thread_cpu()
        rec["thread_cpu"] = {k: round(v - th0.get(k, 0.0), 2) for k, v in sorted(th1.items())
                             if v - th0.get(k, 0.0) > 0}
        if perfp:
            perfp.send_signal(signal.SIGINT)
            perfp.wait(timeout=120)
        rec.update(seconds=t2 - t0, backend_add_seconds=t1 - t0, polls=polls,
                   cpu=c1 - c0, status={k: v for k, v in b.items() if k != "snapshots"})
        rec["backend_objects"] = count_objects(bk)
    finally:
        d.stop()
        rmtree(store)
        rmtree(bk)
    return rec


def p8_cp(src):
    W = ARGS.workdir
    dst = os.path.join(W, "cp-dst")
    rmtree(dst)
    os.makedirs(dst)
    sync()
    t0 = time.monotonic()
    run(["cp", src, os.path.join(dst, "x")])
    run(["sync"])
    secs = time.monotonic() - t0
    rmtree(dst)
    return {"seconds": secs}


def section_p8(results):
    n = ARGS.runs + 1
    srcs = gen_sources("p8", n, ARGS.size)
    runs = []
    try:
        for i, src in enumerate(srcs):
            sides = ["snapfs", "cp"] if i % 2 == 0 else ["cp", "snapfs"]
            rec = {"run": i, "warmup": i == 0, "order": sides}
            for side in sides:
                sync()
                rec[side] = p8_snapfs(src, f"r{i}") if side == "snapfs" else p8_cp(src)
            s = rec["snapfs"]
            log(f"p8 run {i}{' (warm-up)' if i == 0 else ''}: snapfs upload {s['seconds']:.3f} s "
                f"({ARGS.size / MIB / s['seconds']:.0f} MiB/s, {s['cpu']:.2f} CPU-s, "
                f"{s['polls']} polls), cp+sync {rec['cp']['seconds']:.3f} s")
            runs.append(rec)
            drop_sources([src])
    finally:
        drop_sources(srcs)
    meas = [r for r in runs if not r["warmup"]]
    st = [r["snapfs"]["seconds"] for r in meas]
    ct = [r["cp"]["seconds"] for r in meas]
    gib = ARGS.size / GIB
    results["p8"] = {
        "runs": runs,
        "snapfs_seconds": stats(st),
        "cp_seconds": stats(ct),
        "snapfs_mib_s": stats([ARGS.size / MIB / x for x in st]),
        "cp_mib_s": stats([ARGS.size / MIB / x for x in ct]),
        "ratio": median(ct) / median(st),
        "ratio_per_run": stats([c / s for c, s in zip(ct, st)]),
        "cpu_s_per_gib": stats([r["snapfs"]["cpu"] / gib for r in meas]),
    }
    if ARGS.perf_p8:
        src = gen_sources("p8perf", 1, ARGS.size)
        try:
            rec = p8_snapfs(src[0], "perf", perf="record")
            results["p8"]["perf_run"] = rec
            log(f"p8 perf record run: {rec['seconds']:.3f} s, {rec['cpu']:.2f} CPU-s")
            results["p8"]["perf_report"] = perf_report()
        except Exception as e:
            results["p8"]["perf_error"] = str(e)[-500:]
            log(f"perf run failed: {e}")
        try:
            rec = p8_snapfs(src[0], "trace", perf="trace")
            results["p8"]["perf_trace_run"] = rec
            results["p8"]["perf_trace_file"] = os.path.join(ARGS.logdir, "perf-trace-p8.txt")
            log(f"p8 perf trace run: {rec['seconds']:.3f} s, {rec['cpu']:.2f} CPU-s")
        except Exception as e:
            results["p8"]["perf_trace_error"] = str(e)[-500:]
            log(f"perf trace run failed: {e}")
        finally:
            drop_sources(src)


def perf_report():
    data = os.path.join(ARGS.workdir, "perf-p8.data")
    out = {}
    for name, sort in (("by_comm_symbol", "comm,symbol"), ("by_symbol", "symbol"),
                       ("by_comm", "comm"), ("by_dso", "dso")):
        r = run(["perf", "report", "-i", data, "--no-children", "-g", "none", "--percent-limit",
                 "0.5", "--sort", sort, "--stdio"],
                check=False, timeout=600)
        path = os.path.join(ARGS.logdir, f"perf-p8-{name}.txt")
        with open(path, "w") as f:
            f.write(r.stdout)
            f.write(r.stderr)
        top = [ln.rstrip() for ln in r.stdout.splitlines()
               if ln.strip() and not ln.startswith("#") and ln.split()[0].endswith("%")][:40]
        out[name] = {"file": path, "top": top}
    return out


def section_small(results):
    W = ARGS.workdir
    n = ARGS.runs + 1
    runs = []
    for i in range(n):
        blobs = [os.urandom(4096) for _ in range(ARGS.files)]
        store, mnt = os.path.join(W, "sm-store"), os.path.join(W, "sm-mnt")
        bk = os.path.join(W, "sm-bk")
        rmtree(bk)
        sync()
        d = Daemon(store, mnt, [], f"small-{i}")
        rec = {"run": i, "warmup": i == 0}
        try:
            top = os.path.join(mnt, "small")
            os.makedirs(top)
            t = time.monotonic()
            for k, blob in enumerate(blobs):
                fd = os.open(os.path.join(top, f"f{k:05d}"), os.O_WRONLY | os.O_CREAT, 0o644)
                os.write(fd, blob)
                os.close(fd)
            rec["write_seconds"] = time.monotonic() - t
            del blobs
            sync()
            st = json.loads(cli("stat", mnt, "--json").stdout)
            rec["store_chunks"] = st.get("chunks")
            c0 = d.cpu()
            t0 = time.monotonic()
            cli("backend", "add", mnt, "b", f"dir:{bk}")
            t1 = time.monotonic()
            _, b, polls = wait_drained(mnt, "b", min_chunks=rec["store_chunks"] or 0)
            t2 = time.monotonic()
            c1 = d.cpu()
            rec.update(seconds=t2 - t0, backend_add_seconds=t1 - t0, polls=polls, cpu=c1 - c0,
                       status={k: v for k, v in b.items() if k != "snapshots"})
            rec["objects_before_snapshot"] = count_objects(bk)
            snap = f"small-{i}"
            t = time.monotonic()
            cli("snapshot", "create", mnt, snap)
            t1 = time.monotonic()
            r = cli("snapshot", "wait", mnt, snap, "--timeout", "300s", check=False, timeout=400)
            t2 = time.monotonic()
            rec.update(snapshot_create_seconds=t1 - t, snapshot_window_seconds=t2 - t1,
                       wait_rc=r.returncode)
            b = status(mnt, "b")
            rec["status_snapshot"] = snap_status(b, snap)
            rec["objects_after_snapshot"] = count_objects(bk)
        finally:
            d.stop()
            rmtree(store)
            rmtree(bk)
        ob = rec["objects_before_snapshot"]
        up = ob.get("chunks", 0) + ob.get("meta", 0)
        rec["objects_per_second"] = up / rec["seconds"]
        log(f"small run {i}{' (warm-up)' if i == 0 else ''}: write {rec['write_seconds']:.2f} s, "
            f"{rec['store_chunks']} chunks, upload {rec['seconds']:.3f} s "
            f"({rec['objects_per_second']:.0f} objects/s), objects {ob} -> "
            f"{rec['objects_after_snapshot']} after snapshot (window "
            f"{rec['snapshot_window_seconds'] * 1000:.0f} ms)")
        runs.append(rec)
    meas = [r for r in runs if not r["warmup"]]
    results["small"] = {
        "runs": runs,
        "seconds": stats([r["seconds"] for r in meas]),
        "objects_per_second": stats([r["objects_per_second"] for r in meas]),
        "chunk_objects_per_second": stats(
            [r["objects_before_snapshot"].get("chunks", 0) / r["seconds"] for r in meas]),
        "cpu_s": stats([r["cpu"] for r in meas]),
        "snapshot_window_seconds": stats([r["snapshot_window_seconds"] for r in meas]),
        "meta_objects_per_second": stats(
            [(r["objects_after_snapshot"].get("meta", 0) - r["objects_before_snapshot"].get("meta", 0))
             / r["snapshot_window_seconds"] for r in meas]),
    }


def p4_side(src, tag, on):
    W = ARGS.workdir
    store, mnt = os.path.join(W, "p4-store"), os.path.join(W, "p4-mnt")
    bk = os.path.join(W, "p4-bk")
    rmtree(bk)
    buf = load(src)
    extra = []
    if on:
        os.makedirs(bk)
        extra = ["--replicate", f"dir:{bk}"]
    sync()
    d = Daemon(store, mnt, extra, f"p4-{tag}-{'on' if on else 'off'}")
    rec = {}
    try:
        os.makedirs(os.path.join(mnt, "ckpt"))
        sync()
        c0 = d.cpu()
        rec["seconds"] = write_fsync(os.path.join(mnt, "ckpt", "x"), buf)
        c1 = d.cpu()
        rec["cpu"] = c1 - c0
        del buf
        if on:
            drain, b, _ = wait_drained(mnt, None, min_bytes=ARGS.size, poll=0.05)
            c2 = d.cpu()
            rec.update(drain_seconds_after_fsync=drain, cpu_until_drained=c2 - c0,
                       status={k: v for k, v in b.items() if k != "snapshots"})
    finally:
        d.stop()
        rmtree(store)
        rmtree(bk)
    return rec


def section_p4(results):
    n = ARGS.runs + 1
    srcs = gen_sources("p4", 2 * n, ARGS.size)
    runs = []
    try:
        for i in range(n):
            sides = ["on", "off"] if i % 2 == 0 else ["off", "on"]
            rec = {"run": i, "warmup": i == 0, "order": sides}
            for j, side in enumerate(sides):
                src = srcs[2 * i + j]
                sync()
                rec[side] = p4_side(src, f"r{i}", side == "on")
                drop_sources([src])
            on, off = rec["on"], rec["off"]
            log(f"p4 run {i}{' (warm-up)' if i == 0 else ''}: ON {on['seconds']:.3f} s "
                f"({on['cpu']:.2f} CPU-s during write, {on['cpu_until_drained']:.2f} until drained, "
                f"drained {on['drain_seconds_after_fsync']:.2f} s after fsync), OFF "
                f"{off['seconds']:.3f} s ({off['cpu']:.2f} CPU-s)")
            runs.append(rec)
    finally:
        drop_sources(srcs)
    meas = [r for r in runs if not r["warmup"]]
    on = [r["on"]["seconds"] for r in meas]
    off = [r["off"]["seconds"] for r in meas]
    gib = ARGS.size / GIB
    results["p4"] = {
        "runs": runs,
        "on_seconds": stats(on),
        "off_seconds": stats(off),
        "on_mib_s": stats([ARGS.size / MIB / x for x in on]),
        "off_mib_s": stats([ARGS.size / MIB / x for x in off]),
        "ratio": median(off) / median(on),
        "ratio_per_run": stats([b / a for a, b in zip(on, off)]),
        "on_cpu_s_per_gib_write": stats([r["on"]["cpu"] / gib for r in meas]),
        "on_cpu_s_per_gib_until_drained": stats([r["on"]["cpu_until_drained"] / gib for r in meas]),
        "off_cpu_s_per_gib": stats([r["off"]["cpu"] / gib for r in meas]),
        "on_drain_seconds_after_fsync": stats(
            [r["on"]["drain_seconds_after_fsync"] for r in meas]),
    }


# ----------------------------------------------------------------- summary ----

def fmt(s, unit="", scale=1.0, nd=3):
    if not s or s.get("median") is None:
        return "n/a"
    return (f"{s['median'] * scale:.{nd}f}{unit} ({s['min'] * scale:.{nd}f}-"
            f"{s['max'] * scale:.{nd}f})")


def summary(results):
    rows = []
    SZ = f"{ARGS.size / GIB:g} GiB" if ARGS.size >= GIB else f"{ARGS.size // MIB} MiB"
    for kind in ("dir", "garage", "dir_drained", "garage_drained"):
        w = results.get(f"window_{kind}")
        if not w:
            continue
        if "drain_seconds" in w:
            rows.append((f"window {kind}: backlog after fsync (chunks)",
                         fmt(w["pending_chunks_after_fsync"], "", 1, 0), "", ""))
            rows.append((f"window {kind}: drain time before create", fmt(w["drain_seconds"], " s"),
                         "", ""))
        ratio = w["ratio_restic_over_window"]
        met = w["window_seconds"]["median"] is not None and w["window_seconds"]["median"] < 0.1
        verdict = "met" if met else "MISSED"
        if "drain_seconds" in w:
            verdict = "(diagnostic: queue drained first)"
        rows.append((f"window {kind}: snapfs window (wait)", fmt(w["window_seconds"], " ms", 1000, 1),
                     "< 100 ms", verdict))
        rows.append((f"window {kind}: status window_seconds", fmt(w["status_window_seconds"], " ms", 1000, 1),
                     "", ""))
        rows.append((f"window {kind}: snapshot create", fmt(w["create_seconds"], " ms", 1000, 1), "", ""))
        rows.append((f"window {kind}: writer {SZ} + fsync", fmt(w["writer_seconds"], " s"), "", ""))
        rows.append((f"window {kind}: restic backup (local repo)", fmt(w["restic_seconds"], " s"), "", ""))
        rows.append((f"window {kind}: ratio restic / window", f"{ratio:.1f}x" if ratio else "n/a",
                     "", ""))
        if "restic_s3_seconds" in w:
            r3 = w.get("ratio_restic_s3_over_window")
            rows.append((f"window {kind}: restic backup to Garage s3", fmt(w["restic_s3_seconds"], " s"),
                         "", "" if w["restic_s3_seconds"]["n"] else "did not work"))
            if r3:
                rows.append((f"window {kind}: ratio restic-s3 / window", f"{r3:.1f}x", "", ""))
        if not w["all_waits_ok"]:
            rows.append((f"window {kind}: a snapshot wait FAILED", "", "", "see JSON"))
    p8 = results.get("p8")
    if p8:
        rows.append((f"P8 snapfs upload {SZ} to dir:", fmt(p8["snapfs_seconds"], " s"), "", ""))
        rows.append(("P8 snapfs MiB/s", fmt(p8["snapfs_mib_s"], "", 1, 0), "", ""))
        rows.append(("P8 cp + sync", fmt(p8["cp_seconds"], " s"), "", ""))
        rows.append(("P8 cp MiB/s", fmt(p8["cp_mib_s"], "", 1, 0), "", ""))
        rows.append(("P8 ratio snapfs/cp throughput", f"{p8['ratio']:.2f}", ">= 0.8",
                     "met" if p8["ratio"] >= 0.8 else "MISSED"))
        rows.append(("P8 daemon CPU-s per GiB uploaded", fmt(p8["cpu_s_per_gib"], ""), "", ""))
    sm = results.get("small")
    if sm:
        rows.append((f"small: {ARGS.files} x 4 KiB upload", fmt(sm["seconds"], " s"), "", ""))
        rows.append(("small: objects/s", fmt(sm["objects_per_second"], "", 1, 0), "", ""))
        last = sm["runs"][-1]
        rows.append(("small: objects (last run) before snapshot",
                     json.dumps(last["objects_before_snapshot"]), "", ""))
        rows.append(("small: objects (last run) after snapshot",
                     json.dumps(last["objects_after_snapshot"]), "", ""))
        rows.append(("small: snapshot window after backfill", fmt(sm["snapshot_window_seconds"], " ms", 1000, 1),
                     "", ""))
        rows.append(("small: meta objects/s in that window", fmt(sm["meta_objects_per_second"], "", 1, 0),
                     "", ""))
    p4 = results.get("p4")
    if p4:
        rows.append((f"P4 write {SZ} + fsync, replication ON", fmt(p4["on_seconds"], " s"), "", ""))
        rows.append((f"P4 write {SZ} + fsync, replication OFF", fmt(p4["off_seconds"], " s"), "", ""))
        rows.append(("P4 ON MiB/s", fmt(p4["on_mib_s"], "", 1, 0), "", ""))
        rows.append(("P4 OFF MiB/s", fmt(p4["off_mib_s"], "", 1, 0), "", ""))
        rows.append(("P4 ratio ON/OFF throughput", f"{p4['ratio']:.2f}", ">= 0.95",
                     "met" if p4["ratio"] >= 0.95 else "MISSED"))
        rows.append(("P4 CPU-s/GiB ON (during write)", fmt(p4["on_cpu_s_per_gib_write"], ""), "", ""))
        rows.append(("P4 CPU-s/GiB ON (until drained)", fmt(p4["on_cpu_s_per_gib_until_drained"], ""), "", ""))
        rows.append(("P4 CPU-s/GiB OFF", fmt(p4["off_cpu_s_per_gib"], ""), "", ""))
        rows.append(("P4 ON: drained after fsync", fmt(p4["on_drain_seconds_after_fsync"], " s"), "", ""))
    w0 = max(len(r[0]) for r in rows) if rows else 10
    w1 = max(len(r[1]) for r in rows) if rows else 10
    print()
    print(f"{'figure':<{w0}}  {'median (min-max)':<{w1}}  {'target':<8}  result")
    print("-" * (w0 + w1 + 26))
    for r in rows:
        print(f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]:<8}  {r[3]}")
    print(flush=True)
    return rows


def machine():
    def sh(cmd):
        r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
        return (r.stdout + r.stderr).strip()
    with open(BIN, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "nproc": sh("nproc"), "free_h": sh("free -h"), "df_h": sh(f"df -h {ARGS.workdir}"),
        "df_T": sh(f"df -T {ARGS.workdir}"), "uname_r": sh("uname -r"),
        "cpu": sh("lscpu | grep -E 'Model name|Hypervisor vendor'"),
        "disk": sh("lsblk -d -o NAME,SIZE,ROTA,MODEL 2>/dev/null; "
                   "findmnt -no SOURCE,FSTYPE,OPTIONS --target " + ARGS.workdir),
        "loadavg": sh("cat /proc/loadavg"),
        "snapfs_bin": BIN, "snapfs_sha256": sha, "snapfs_version": sh(f"{BIN} --version"),
        "snapfs_mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(os.stat(BIN).st_mtime)),
        "restic_version": sh("restic version"),
        "python": sys.version.split()[0],
        "git_head": sh(f"git -C {HERE}/.. rev-parse --short HEAD"),
    }


def cleanup():
    for d in list(DAEMONS):
        try:
            d.stop()
        except Exception as e:
            print(f"cleanup: {e}", file=sys.stderr)
    for g in list(GARAGE_DIRS):
        stop_garage(g)


def main():
    global ARGS, BIN
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default=os.environ.get("SNAPFS_BIN", "/tmp/bench/snapfs"))
    ap.add_argument("--workdir", default="/var/tmp/snapfs-bench")
    ap.add_argument("--runs", type=int, default=5, help="measured runs per figure (+1 warm-up)")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--sections", default="window,garage,p8,small,p4")
    ap.add_argument("--perf-p8", action="store_true",
                    help="after P8, two extra (uncounted) P8 uploads: one under `perf record -g`"
                         " of the daemon, one under `perf trace -s` (syscall times)")
    ap.add_argument("--out", default=None)
    ARGS = ap.parse_args()
    ARGS.size = ARGS.size_mib * MIB
    ARGS.workdir = os.path.abspath(ARGS.workdir)
    BIN = os.path.abspath(ARGS.bin)
    if os.geteuid() != 0:
        sys.exit("run as root")
    if not os.access(BIN, os.X_OK):
        sys.exit(f"no snapfs binary at {BIN}")
    os.makedirs(ARGS.workdir, exist_ok=True)
    fstype = subprocess.run(["df", "--output=fstype", ARGS.workdir], capture_output=True,
                            text=True).stdout.split()[-1]
    if fstype in ("tmpfs", "ramfs"):
        sys.exit(f"{ARGS.workdir} is on {fstype}; use the real disk")
    free = shutil.disk_usage(ARGS.workdir).free
    if free < 20 * GIB:
        sys.exit(f"only {free / GIB:.1f} GiB free on {ARGS.workdir}; need 20")
    ARGS.out = ARGS.out or os.path.join(ARGS.workdir, "results.json")
    ARGS.logdir = os.path.join(ARGS.workdir, "logs-" + time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(ARGS.logdir)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    results = {"command": " ".join(sys.argv), "nonce": NONCE, "machine": machine(),
               "args": {k: v for k, v in vars(ARGS).items()}, "section_seconds": {},
               "errors": {}}
    log(f"snapfs {BIN} sha256 {results['machine']['snapfs_sha256'][:16]}…; workdir {ARGS.workdir}; "
        f"logs {ARGS.logdir}")
    t_all = time.monotonic()
    sections = {"window": lambda: section_window(results, "dir"),
                "garage": lambda: section_window(results, "garage"),
                "window-drained": lambda: section_window(results, "dir", drained=True),
                "garage-drained": lambda: section_window(results, "garage", drained=True),
                "p8": lambda: section_p8(results), "small": lambda: section_small(results),
                "p4": lambda: section_p4(results)}
    try:
        for name in ARGS.sections.split(","):
            t = time.monotonic()
            log(f"=== section {name}")
            try:
                sections[name]()
            except Exception as e:
                import traceback
                traceback.print_exc()
                results["errors"][name] = str(e)[-1000:]
                log(f"section {name} FAILED: {e}")
                cleanup()
            results["section_seconds"][name] = time.monotonic() - t
            with open(ARGS.out, "w") as f:
                json.dump(results, f, indent=1, default=str)
    finally:
        cleanup()
        results["total_seconds"] = time.monotonic() - t_all
        results["loadavg_end"] = open("/proc/loadavg").read().strip()
        try:
            results["summary_rows"] = summary(results)
        except Exception as e:
            results["errors"]["summary"] = str(e)
            print(f"summary failed: {e}", file=sys.stderr)
        with open(ARGS.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
        log(f"total {results['total_seconds']:.0f} s; results in {ARGS.out}")
        if results["errors"]:
            log(f"ERRORS: {results['errors']}")
            sys.exit(1)


if __name__ == "__main__":
    main()
