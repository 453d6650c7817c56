#!/usr/bin/env python3
"""A tiny S3 client for tools/garage.sh selftest: AWS SigV4 with the standard library only.

Reads AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, SNAPFS_TEST_S3_ENDPOINT and
SNAPFS_TEST_S3_BUCKET (as written to DIR/env by `tools/garage.sh start DIR`). Path-style
requests only, to a plain http:// endpoint that must be on loopback.

  s3probe.py put KEY FILE        upload FILE as KEY
  s3probe.py get KEY FILE        download KEY into FILE (exit 3 if it does not exist)
  s3probe.py list PREFIX         print the keys under PREFIX, one per line
  s3probe.py delete KEY          delete KEY
  s3probe.py anon                an unsigned GET of the bucket; prints the HTTP status
  s3probe.py listeners PID       print the TCP addresses PID listens on; exit 1 if any is
                                 not on 127.0.0.0/8 or ::1, or if there is none
"""
import datetime
import hashlib
import hmac
import http.client
import ipaddress
import os
import sys
import urllib.parse
import xml.etree.ElementTree as ET

TIMEOUT = 30  # seconds, for every request


def env(name):
    value = os.environ.get(name)
    if not value:
        sys.exit(f"s3probe: {name} is not set (source the env file from tools/garage.sh start)")
    return value


def endpoint():
    url = urllib.parse.urlsplit(env("SNAPFS_TEST_S3_ENDPOINT"))
    if url.scheme != "http" or not url.hostname or not url.port:
        sys.exit("s3probe: SNAPFS_TEST_S3_ENDPOINT must look like http://127.0.0.1:PORT")
    if not ipaddress.ip_address(url.hostname).is_loopback:
        sys.exit(f"s3probe: refusing a non-loopback endpoint {url.hostname}")
    return url.hostname, url.port


def quote(s, safe="-_.~"):
    return urllib.parse.quote(s, safe=safe)


def request(method, key="", query=None, body=b"", sign=True):
    """One request; returns (status, headers, body bytes)."""
    host, port = endpoint()
    bucket = env("SNAPFS_TEST_S3_BUCKET")
    path = "/" + quote(bucket) + ("/" + quote(key, safe="-_.~/") if key else "")
    query = query or {}
    canonical_query = "&".join(
        f"{quote(k)}={quote(v)}" for k, v in sorted(query.items()))
    headers = {"host": f"{host}:{port}"}
    if sign:
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "garage"
        access, secret = env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")
        now = datetime.datetime.now(datetime.timezone.utc)
        amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        payload_hash = hashlib.sha256(body).hexdigest()
        headers["x-amz-date"] = amz_date
        headers["x-amz-content-sha256"] = payload_hash
        signed = sorted(headers)
        canonical = "\n".join([
            method, path, canonical_query,
            "".join(f"{h}:{headers[h].strip()}\n" for h in signed),
            ";".join(signed), payload_hash])
        scope = f"{day}/{region}/s3/aws4_request"
        to_sign = "\n".join([
            "AWS4-HMAC-SHA256", amz_date, scope,
            hashlib.sha256(canonical.encode()).hexdigest()])
        k = ("AWS4" + secret).encode()
        for part in (day, region, "s3", "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={access}/{scope}, "
            f"SignedHeaders={';'.join(signed)}, Signature={signature}")
    if body or method == "PUT":
        headers["content-length"] = str(len(body))
    # http.client never consults *_proxy variables, so this goes straight to loopback.
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        conn.request(method, path + ("?" + canonical_query if canonical_query else ""),
                     body=body or None, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def fail(what, status, body):
    sys.exit(f"s3probe: {what}: HTTP {status}: {body[:500].decode(errors='replace')}")


def listeners(pid):
    """TCP sockets in LISTEN state that belong to pid, from /proc (no ss/netstat needed)."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A = LISTEN
                continue
            addr_hex, port_hex = f[1].split(":")
            raw = bytes.fromhex(addr_hex)
            # /proc prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, width, 4))
            found.append((ipaddress.ip_address(raw), int(port_hex, 16)))
    return found


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "put" and len(args) == 2:
        with open(args[1], "rb") as f:
            data = f.read()
        status, _, body = request("PUT", args[0], body=data)
        if status != 200:
            fail("put", status, body)
    elif cmd == "get" and len(args) == 2:
        status, _, body = request("GET", args[0])
        if status == 404:
            print(f"s3probe: get: {args[0]} does not exist", file=sys.stderr)
            return 3
        if status != 200:
            fail("get", status, body)
        with open(args[1], "wb") as f:
            f.write(body)
    elif cmd == "list" and len(args) == 1:
        token = None
        while True:
            query = {"list-type": "2", "prefix": args[0]}
            if token:
                query["continuation-token"] = token
            status, _, body = request("GET", query=query)
            if status != 200:
                fail("list", status, body)
            root = ET.fromstring(body)
            ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            for key in root.iter(ns + "Key"):
                print(key.text)
            token = root.findtext(ns + "NextContinuationToken")
            if root.findtext(ns + "IsTruncated") != "true" or not token:
                break
    elif cmd == "delete" and len(args) == 1:
        status, _, body = request("DELETE", args[0])
        if status not in (200, 204):
            fail("delete", status, body)
    elif cmd == "anon" and not args:
        status, _, _ = request("GET", sign=False)
        print(status)
    elif cmd == "listeners" and len(args) == 1:
        bad, found = 0, listeners(args[0])
        if not found:
            print(f"s3probe: pid {args[0]} listens on no TCP port", file=sys.stderr)
            return 1
        for addr, port in found:
            ok = addr.is_loopback
            bad += not ok
            print(f"{addr}:{port}{'' if ok else '  NOT LOOPBACK'}")
        return 1 if bad else 0
    else:
        sys.exit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
