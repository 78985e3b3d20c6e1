#!/usr/bin/env python3
"""Writes the committed seed corpora (fuzz/seeds/<target>/): a handful of well-formed inputs per
target, so the fuzzer starts from the shapes real clients and operators send. Run it from any
directory; it rewrites the files it owns (names starting with `seed-`) and leaves the others
(`regression-*`: inputs that found a bug in batchd; `corner-*`: corner cases the fuzzer found
that the targets' properties first got wrong) alone."""

import hashlib
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


# --- protobuf, by hand (batchd.v1) ---------------------------------------------------------------

def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(num, value):
    if isinstance(value, int):
        return varint(num << 3) + varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, str):
        value = value.encode()
    return varint(num << 3 | 2) + varint(len(value)) + value


def duration(seconds, nanos=0):
    return (field(1, seconds) if seconds else b"") + (field(2, nanos) if nanos else b"")


def job(id, handler, payload=b"", params=(), timeout=None):
    out = field(1, id) + field(2, handler) + (field(3, payload) if payload else b"")
    for k, v in params:
        out += field(4, field(1, k) + field(2, v))
    if timeout is not None:
        out += field(5, timeout)
    return out


def batch(batch_id, *jobs):
    return field(1, field(1, batch_id) + b"".join(field(2, j) for j in jobs))


def cancel(batch_id, *ids):
    return field(2, field(1, batch_id) + b"".join(field(2, i) for i in ids))


def frame(msg, flag=0, length=None):
    return bytes([flag]) + struct.pack(">I", len(msg) if length is None else length) + msg


# request: [principal: 0 anonymous, 1 alice, 2/3 bob] [cut: 0 whole, n: (n % 64) + 1] body
write("request", "echo", bytes([0, 0]) + frame(batch("b1", job("1", "echo", b"hi"))))
write("request", "resize-alice", bytes([1, 7]) + frame(batch(
    "b2",
    job("r1", "resize", params=[("input", "cat.png"), ("size", "64x64"), ("output", "out/cat.jpg")],
        timeout=duration(5)),
    job("r2", "resize", params=[("input", "x.png"), ("size", "1x1; rm -rf /"), ("output", "o.png")]),
    job("", "echo", b"no id"),
    job("g", "grep", b"not allowed for alice", params=[("pattern", "x")]),
)))
write("request", "bob-two-messages", bytes([2, 1]) + frame(batch(
    "b3",
    job("g1", "grep", b"line\n", params=[("pattern", "a b $(id) `id` \"q\" \n")]),
    job("s1", "sleep", params=[("ms", "10")], timeout=duration(0, 500_000_000)),
    job("s2", "sleep", params=[("ms", "99999999999")]),
    job("h", "sha256", b"x" * 40, timeout=duration(-1)),
    job("z", "spin", params=[("ms", "1"), ("extra", "1")], timeout=duration(0)),
)) + frame(cancel("b3", "s1")) + frame(cancel("b3")))
write("request", "too-large", bytes([3, 0]) + frame(b"", length=4096))
write("request", "empty-and-compressed", bytes([0, 3]) + frame(b"") + frame(b"\x0a\x00", flag=1))
write("request", "unknown-handler", bytes([2, 0]) + frame(batch(
    "b4", job("u", "no-such-handler"), job("u", "echo"), job("u", "echo"))))

# --- config --------------------------------------------------------------------------------------

with open(os.path.join(HERE, "..", "..", "deploy", "batchd.toml")) as f:
    write("config", "deploy.toml", f.read())
write("config", "small.toml", 'listen = "[::1]:7000"\nworkers = 4\nsession_bytes = "64KiB"\n'
      'default_job_timeout = "1m 30s"\nlog = "batchd=debug,info"\nlog_format = "json"\n')
token = hashlib.sha256(b"t").hexdigest()
write("config", "exec-and-principals.toml", f"""
max_output = "1MiB"

[[exec]]
name = "thumbnail"
description = "Makes a thumbnail."
command = ["convert", "-", "-thumbnail", "{{size}}", "{{{{size}}}}", "png:-"]
params = {{ size = '[0-9]{{1,4}}x[0-9]{{1,4}}' }}
timeout = "30s"
max_output = "512KiB"
concurrency = 4
env = {{ LANG = "C" }}
cwd = "/tmp"
kill_grace = "500ms"
isolation = "process-group"

[[exec]]
name = "wc"
command = ["wc", "-c"]
memory_max = "64MiB"
pids_max = 16

[[principal]]
name = "thumbnailer"
token_sha256 = "{token}"
handlers = ["thumbnail", "sha256"]
max_calls = 100
max_running = 64
weight = 2

[[principal]]
name = "ops"
client_cert = "DNS:ops.example.com"
token_sha256 = ["{token.upper()}", "{hashlib.sha256(b"u").hexdigest()}"]
""")
write("config", "bad-principal.toml", '[[principal]]\nname = "_x"\nclient_cert = "IP:::1"\nweight = 0\n')

# --- exec_template: command \xFF rules \xFF params (items split by \xFE) -------------------------

def template(command, rules, params):
    enc = lambda items: b"\xfe".join(i.encode() for i in items)
    return (enc(command) + b"\xff" + enc(f"{k}={v}" for k, v in rules) + b"\xff"
            + enc(f"{k}={v}" for k, v in params))


write("exec_template", "resize", template(
    ["convert", "{input}", "-resize", "{size}", "{{size}}", "x{size}", "{output}"],
    [("input", r"[a-z]+\.png"), ("size", "[0-9]{1,4}x[0-9]{1,4}"), ("output", ".*")],
    [("input", "cat.png"), ("size", "12x34"), ("output", "a b; rm -rf / $(id)\n")]))
write("exec_template", "anchors", template(
    ["grep", "-e", "{p}"], [("p", "^a|b$")], [("p", "ab")]))
write("exec_template", "flags", template(
    ["tool", "{q}"], [("q", "(?i)yes|no")], [("q", "YES")]))
write("exec_template", "unknown-param", template(
    ["tool", "{q}"], [("q", "[0-9]+")], [("q", "1"), ("r", "2")]))
write("exec_template", "program-placeholder", template(
    ["{q}", "x"], [("q", ".*")], [("q", "/bin/sh")]))

# --- jobline: [defaults 0-2] [line limit - 1] [read size] input ----------------------------------

write("jobline", "jobs", bytes([0, 200, 5]) + b"\n".join([
    b'{"id":"a","handler":"sleep","payload":"hi","params":{"ms":5},"timeout_ms":100,"batch":"x"}',
    b'{"id":7,"handler":"echo","payload_b64":"AAEC/w=="}',
    b'   ',
    b'{"handler":"echo","params":{"a":true,"b":1.5e3,"c":"s"}}\r',
    b'{"nope',
]) + b"\n")
write("jobline", "defaults", bytes([1, 60, 1]) + b'{"payload":"x"}\n{}\n[1,2]\n{"colour":"red"}')
write("jobline", "too-long", bytes([2, 8, 3]) + b'{"id":"0123456789"}\r\n{}\r\n')

# --- auth: [flags] [len] authorization [len] batchctl token, certificate -------------------------

def auth(flags, authorization, token, cert=b""):
    return bytes([flags, len(authorization)]) + authorization + bytes([len(token)]) + token + cert


write("auth", "alice", auth(0b0000_0101, b"", b"s3cr3t/+=\n"))
write("auth", "bob-rotated-padded", auth(0b1011_1100, b"", b" tok "))
write("auth", "raw-bearer", auth(0b0000_0001, b"Bearer alice-secret-token", b"x"))
write("auth", "bad-scheme", auth(0b0000_0001, b"Basic YWxpY2U6c2VjcmV0", b""))
write("auth", "cert-only", auth(0b0000_0010, b"", b"", bytes.fromhex("3082010a02820101")))
