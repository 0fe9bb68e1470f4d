#!/usr/bin/env python3
"""Writes the committed seed corpus of each fuzz target (corpus/<target>/seed-*)
from the golden vectors in docs/protocol.md and docs/storage.md and the demo
policy in docs/http.md. Run from fuzz/: python3 seeds.py"""
import os, re, zlib

DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs")
read = lambda name: open(os.path.join(DOCS, name)).read()

def put(target, name, data):
    d = os.path.join("corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)

proto = read("protocol.md")
frames = re.findall(r"^(\w+)\s+header ([0-9a-f]+)(?: payload ([0-9a-f]+))?$", proto, re.M)
assert len(frames) >= 30, len(frames)
for name, header, payload in frames:
    h, p = bytes.fromhex(header), bytes.fromhex(payload or "")
    put("frame", name, h + p)
    put("message", name, bytes([h[3]]) + p)
put("frame", "pipelined", b"".join(bytes.fromhex(h + (p or "")) for _, h, p in frames[:3]))
# The connection target: caller 0 (admin, whose Hello goes first), no cut,
# then the frame.
for name, header, payload in frames:
    put("connection", name, b"\x00\x00" + bytes.fromhex(header) + bytes.fromhex(payload or ""))
# And an HTTP request where Hello would be (no caller: no Hello is sent),
# which the server answers in HTTP.
put("connection", "http", b"\xff\xff" + b"GET /v1/health HTTP/1.1\r\nHost: vault\r\n\r\n")

storage = read("storage.md")
vec = dict(re.findall(r"^([A-Z0-9_]+) ([0-9a-f]+)$", storage, re.M))
for k in ("ENTRY_RS_GOLDEN", "ENTRY6", "ENTRY7"):
    put("entry", k.lower(), bytes.fromhex(vec[k]))
chunk = bytes.fromhex(vec["CHUNK"])
assert zlib.crc32(chunk[:-4]) == int.from_bytes(chunk[-4:], "big")
# The chunk target appends the CRC itself.
put("chunk", "golden", chunk[:-4])
put("receipt", "golden", bytes.fromhex(vec["RECEIPT"]))
put("receipt", "head", bytes.fromhex(vec["HEAD"]))
put("receipt", "endorsement", bytes.fromhex(vec["ENDORSEMENT"]))
put("wal", "golden", bytes.fromhex(vec["WAL_SEGMENT"]))
# The keys target's first byte chooses the format.
put("keys", "sealed_passphrase", b"\x00" + bytes.fromhex(vec["SEALED_MASTER_PASSPHRASE"]))
put("keys", "sealed_key_file", b"\x00" + bytes.fromhex(vec["SEALED_MASTER_KEY_FILE"]))
put("keys", "pending", b"\x01" + bytes.fromhex(vec["PENDING_MARKER"]))
put("keys", "shredding", b"\x02" + bytes.fromhex(vec["PENDING_MARKER"]))
verified = re.search(r"verified::tests::golden_vector.*?```text\n(.*?)```", storage, re.S).group(1)
put("keys", "verified", b"\x03" + bytes.fromhex("".join(verified.split())))
put("export", "golden", bytes.fromhex(re.search(r"^(46564558504f5254[0-9a-f]+)$", storage, re.M).group(1)))

# The payload target: kind byte, flags (bit 0: seq 1, not seq 0; bit 1:
# the subject cust-42), then each schema of section 3 with its placeholders
# filled in, so that each seed is an entry the checks accept.
kinds_table = storage[storage.index("### Kinds"):storage.index("Payload schemas")]
kind_byte = {name: int(b) for b, name in re.findall(r"^\| (\d+) \| `([a-z_]+)` \|", kinds_table, re.M)}
assert len(kind_byte) == 14, kind_byte
def filled(schema):
    for hole, fill in (('"subject":"\u2026"', '"subject":"cust-42"'), ('"version":<u32>', '"version":2'),
                       ("<64 hex>", "ab" * 32), ("<32 hex>", "cd" * 16), ("<128 hex>", "ef" * 64),
                       ("<hex of a key name>", "6d61736b"), ("<u32>", "1"), ("<u64>", "1"),
                       (",\u2026]", "]"), ("\u2026", "x")):
        schema = schema.replace(hole, fill)
    return schema.encode()
schemas = re.findall(r"^\| `([a-z_]+)`(?: \(([^)]*)\))? \| `(\{.*?\})`", storage, re.M)
assert len(schemas) == 11, schemas
for kind, variant, schema in schemas:
    name = kind + ("-" + variant.replace(" ", "_").replace("-", "") if variant else "")
    # Key rotations other than a subject key's have no subject.
    flags = 0 if kind == "genesis" else 1 if kind == "key_rotated" and variant != "subject key" else 3
    put("payload", name, bytes([kind_byte[kind], flags]) + filled(schema))

http = read("http.md")
toml = re.search(r"```toml\n(.*?)```", http, re.S).group(1)
put("policies_toml", "demo", toml.encode())
put("policy_json", "demo", b'{"purposes":{"credit_check":{"fields":{"name":"partial",'
    b'"iban":"tokenize","dob":"generalize","income":"generalize"}}},'
    b'"max_token_ttl_secs":300,"rate_limit_per_minute":60,'
    b'"source_ips":["10.0.0.0/8","::1"],"allowed_hours_utc":[22,6]}')
put("policy_json", "inactive", b'{"active":false,"purposes":{}}')

SEP = b"\xff"
put("mask", "record", SEP.join([b"demo-lender", bytes([0, 7, 14, 21, 28, 35]),
    b"name", b"Ada Lovelace", b"iban", b"GB82 WEST 1234 5698 7654 32",
    b"dob", b"1815-12-10", b"income", b"52,300.00", b"email", "ada@ex\u00e9mple.org".encode()]))
put("mask", "dup", SEP.join([b"p", bytes([5, 5]), b"a", b"1", b"a", b"2"]))

# The PROXY protocol headers of protocol.md, "Behind a TCP proxy": each
# line ending in ':' names the next vector, whose hex may run over lines.
block = proto[proto.index("Test vectors (checked by `server::proxied::header`"):]
block = block[block.index("```text\n") + 8:block.index("```", block.index("```text\n") + 8)]
headers = []
for line in block.splitlines():
    if line.endswith(":"):
        headers.append(b"")
    else:
        headers[-1] += bytes.fromhex("".join(line.split()))
assert len(headers) == 5, headers
for i, h in enumerate(headers):
    put("proxy_header", "vector%d" % i, h)

# The forwarding headers of http.md, "Behind a reverse proxy": a header
# line, then its client or 400. The forwarded target's first byte chooses
# the header (0: X-Forwarded-For, 1: Forwarded), the rest is the value.
http_doc = read("http.md")
block = http_doc[http_doc.index("Test vectors (checked by `server::proxied::forwarded`"):]
block = block[block.index("```text\n") + 8:block.index("```", block.index("```text\n") + 8)]
lines = block.splitlines()
assert len(lines) == 12, lines
for i, line in enumerate(lines):
    name, rest = line.split(": ", 1)
    value = rest.rsplit("  ", 1)[0].strip()
    put("forwarded", "vector%d" % i, bytes([name == "Forwarded"]) + value.encode())
