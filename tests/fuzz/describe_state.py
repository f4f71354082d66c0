#!/usr/bin/env python3
"""Prints the fields of a velora state blob (optimizer format version 1 to 4, compressor 1), to read
a fuzzer finding: `describe_state.py BLOB [SEED]` lists every field with its byte offset and,
given a second blob, marks the fields that differ from it (e.g. the seed it was mutated from).
With --repair the blob's envelope is first rewritten as the "_repair" harnesses do."""
import struct
import sys

OPT_KIND = b"adarank.low_rank_adamw"
COMP_KIND = b"velora.compressor"


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def repair(blob, kind):
    h = 4 + 4 + 4 + len(kind) + 4 + 8
    if len(blob) >= h + 8:
        payload = blob[h:len(blob) - 8]
    elif len(blob) > h:
        payload = blob[h:]
    else:
        payload = b""
    out = b"VLRS" + struct.pack("<II", 1, len(kind)) + kind + struct.pack("<IQ", 1, len(payload)) + payload
    return out + struct.pack("<Q", fnv1a64(out))


class Reader:
    def __init__(self, blob):
        self.b, self.pos, self.fields = blob, 0, []

    def get(self, name, fmt):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.b):
            raise EOFError(f"{name}: truncated at offset {self.pos}")
        (value,) = struct.unpack_from("<" + fmt, self.b, self.pos)
        self.fields.append((self.pos, name, value))
        self.pos += size
        return value

    def array(self, name, fmt):
        count = self.get(name + ".count", "Q")
        size = struct.calcsize("<" + fmt)
        if count * size > len(self.b) - self.pos:
            raise EOFError(f"{name}: {count} elements run past the end")
        values = list(struct.unpack_from(f"<{count}{fmt}", self.b, self.pos))
        self.fields.append((self.pos, name, values))
        self.pos += count * size
        return values


def envelope(r):
    r.fields.append((0, "magic", r.b[:4]))
    r.pos = 4
    r.get("container_version", "I")
    klen = r.get("kind_length", "I")
    kind = r.b[r.pos:r.pos + klen]
    r.fields.append((r.pos, "kind", kind))
    r.pos += klen
    r.version = r.get("kind_version", "I")
    r.get("payload_length", "Q")
    return kind


def config(r):
    for n in ("lr", "beta1", "beta2", "eps", "weight_decay"):
        r.get("config." + n, "d")
    if r.version >= 2:
        r.get("config.adam.convention", "B")
    r.get("config.scale", "d")
    r.get("config.side", "B")
    rank_type = r.get("config.rank.type", "B")
    r.get("config.rank.r_min", "q")
    r.get("config.rank.r_max", "q")
    r.get("config.rank.xi", "d")
    if rank_type == 2:  # the budget rule: its budget follows, and each parameter's spectrum its moments
        r.get("config.rank.budget_bytes", "Q")
    r.get("config.refresh.type", "B")
    r.get("config.refresh.threshold", "d")
    r.get("config.refresh.min_interval", "q")
    r.get("config.refresh.max_interval", "q")
    r.get("config.transport", "B")
    r.get("config.rsvd.oversampling", "q")
    r.get("config.rsvd.power_iterations", "i")
    r.get("config.rsvd.warm_power_iterations", "i")
    r.get("config.rsvd.warm_start", "B")
    r.get("config.rsvd.exact_fraction", "d")
    r.get("config.seed", "Q")
    r.state8 = False
    if r.version >= 3:
        r.state8 = r.get("config.state", "B") == 1
        r.get("config.state_block", "q")
    r.qbasis = False
    if r.version >= 4:
        r.qbasis = r.get("config.basis", "B") != 0
        r.get("config.basis_block", "q")
    return rank_type == 2


def optimizer(r):
    r.get("value_bytes", "B")
    budget = config(r)
    r.get("lr", "d")
    count = r.get("parameters", "Q")
    for i in range(min(count, 1000)):
        p = f"p{i}."
        r.get(p + "rows", "q")
        r.get(p + "cols", "q")
        low_rank = r.get(p + "low_rank", "B")
        r.get(p + "side", "B")
        r.get(p + "rank", "q")
        for n in ("t", "since", "refreshes", "counter"):
            r.get(p + n, "Q")
        r.get(p + "anchor2", "d")
        r.get(p + "projected_norm2", "d")
        r.get(p + "last.rank", "q")
        r.get(p + "last.sketch", "q")
        r.get(p + "last.power_iterations", "i")
        r.get(p + "last.exact", "B")
        r.get(p + "last.warm", "B")
        r.get(p + "last.energy", "d")
        r.get(p + "last.captured", "d")
        if r.qbasis and low_rank:   # a quantised basis: codes, then block scales
            r.array(p + "basis_codes", "B")
            r.array(p + "basis_scales", "f")
        else:
            r.array(p + "basis", "f")
        if r.state8:   # 8-bit moments: bytes of m and v, absmax of their blocks
            r.array(p + "m_bytes", "B")
            r.array(p + "v_bytes", "B")
            r.array(p + "m_absmax", "f")
            r.array(p + "v_absmax", "f")
        else:
            for n in ("m", "v"):
                r.array(p + n, "f")
        if budget:
            r.array(p + "spectrum", "d")


def compressor(r):
    r.get("value_bytes", "B")
    r.get("features", "q")
    r.get("groups", "q")
    r.get("v_mode", "B")
    r.get("ema_decay", "d")
    r.get("random_seed", "Q")
    r.get("z_storage", "B")
    r.get("scale", "d")
    r.get("initialised", "B")
    r.get("fallback", "B")
    r.get("updates", "Q")
    r.array("v", "f")


def parse(blob):
    r = Reader(blob)
    try:
        kind = envelope(r)
        if kind == OPT_KIND:
            optimizer(r)
        elif kind == COMP_KIND:
            compressor(r)
        r.get("checksum", "Q")
    except EOFError as e:
        r.fields.append((r.pos, "ERROR", str(e)))
    if r.pos != len(blob):
        r.fields.append((r.pos, "trailing_bytes", len(blob) - r.pos))
    return r.fields


def main():
    args = [a for a in sys.argv[1:] if a != "--repair"]
    if not args:
        print(__doc__)
        return 2
    blobs = [open(a, "rb").read() for a in args[:2]]
    if "--repair" in sys.argv:
        kind = OPT_KIND if OPT_KIND in blobs[0][:64] else COMP_KIND
        blobs[0] = repair(blobs[0], kind)
    fields = parse(blobs[0])
    ref = {name: value for _, name, value in parse(blobs[1])} if len(blobs) > 1 else None
    for pos, name, value in fields:
        mark = ""
        if ref is not None and ref.get(name) != value:
            mark = "   <-- differs (was " + (repr(ref.get(name))[:80] if name in ref else "absent") + ")"
        shown = repr(value)
        if len(shown) > 100:
            shown = shown[:100] + "..."
        if ref is None or mark or name in ("ERROR", "trailing_bytes"):
            print(f"{pos:6d}  {name:32s} {shown}{mark}")
        elif ref is not None and not mark:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
