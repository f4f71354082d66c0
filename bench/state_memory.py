#!/usr/bin/env python3
"""Optimizer-state bytes at the LLaMA presets (GaLore's shapes: vocabulary 32000, untied
embedding and head, the demo's presets' ranks), per configuration, from each method's published
layout. Prints the markdown table of docs/memory.md ("8-bit moments"). No dependencies.

Layouts (bytes of optimizer state only; weights and gradients excluded):
  AdamW              8 per parameter (m, v in float32)
  this library, 8-bit moments (state = int8_blockwise, block B): 2 per element + 2 float absmax
                     per block of B (both moments); every parameter, the norm gains included
  GaLore             projected matrices (attention q, k, v, o; MLP gate, up, down): basis
                     r*min(m, n) + moments 2*r*max(m, n) in float32; everything else dense AdamW
  GaLore-8bit        galore-torch's GaLoreAdamW8bit: bitsandbytes' 8-bit blockwise moments (block
                     256 here; the 8-bit optimizers paper used 2048) for the projected gradient and
                     the dense parameters, except tensors under 4096 elements (bitsandbytes'
                     min_8bit_size: the norm gains stay float32); the basis in float32
  Q-GaLore           as GaLore-8bit with the basis in INT4 (0.5 byte per element; its per-group
                     scales are not counted)
  this library, quantised basis (basis = int8 | int4, block B): each of the r basis rows of
                     length min(m, n) in len (int8) or ceil(len/2) (int4) bytes + a float scale per
                     block of B within the row; with 8-bit moments as above
  APOLLO             Adam moments of the rank-r random projection, 2*r*max(m, n), and the
                     projection matrix r*min(m, n), float32; everything else dense AdamW
  APOLLO-Mini        APOLLO at rank 1
Check: at LLaMA-60M this gives AdamW 443.1 MiB, GaLore (r=128) 312.3 MiB, APOLLO (r=256) 374.6 MiB
and APOLLO-Mini 250.5 MiB, the counts of the PyPI packages' optimizer.state quoted in issue 24
(443, 312, 375, 251 MiB).
"""
import math

PRESETS = [  # name, d_model, layers, SwiGLU width, rank (the demo's presets, from GaLore's scripts)
    ("LLaMA-60M", 512, 8, 1376, 128),
    ("LLaMA-130M", 768, 12, 2048, 256),
    ("LLaMA-1B", 2048, 24, 5461, 1024),
    ("LLaMA-7B", 4096, 32, 11008, 1024),
]
VOCAB = 32000
BLOCK = 256
MIB = 1024.0 * 1024.0


def shapes(d, layers, ffn):
    projected = []
    for _ in range(layers):
        projected += [(d, d)] * 4 + [(ffn, d)] * 2 + [(d, ffn)]
    dense = [(VOCAB, d), (VOCAB, d)] + [(1, d)] * (2 * layers + 1)
    return projected, dense


def q8(n, block=BLOCK):           # 8-bit blockwise moments of n elements: bytes
    return 2 * n + 2 * 4 * math.ceil(n / block)


def bnb8(n):                      # bitsandbytes: float32 under min_8bit_size
    return 8 * n if n < 4096 else q8(n)


def low_rank(m, n, r, basis_bytes, moments):
    r = min(r, m, n)
    return basis_bytes * r * min(m, n) + moments(r * max(m, n))


def low_rank_quantised(m, n, r, bits, moments, block=BLOCK):   # this library's int8/int4 basis
    r = min(r, m, n)
    length = min(m, n)
    row = (length if bits == 8 else math.ceil(length / 2)) + 4 * math.ceil(length / block)
    return r * row + moments(r * max(m, n))


def table():
    rows = []
    for name, d, layers, ffn, rank in PRESETS:
        projected, dense = shapes(d, layers, ffn)
        params = sum(m * n for m, n in projected + dense)
        dense_f = sum(8 * m * n for m, n in dense)
        f32 = lambda count: 8 * count  # two float32 moments of `count` elements  # noqa: E731
        conf = {
            "AdamW (float32)": 8 * params,
            "AdamW, 8-bit moments (this library)": sum(q8(m * n) for m, n in projected + dense),
            "GaLore, rank r (float32; this library's galore)": dense_f + sum(low_rank(m, n, rank, 4, f32) for m, n in projected),
            "GaLore, rank r, 8-bit moments (this library)": sum(q8(m * n) for m, n in dense) + sum(low_rank(m, n, rank, 4, q8) for m, n in projected),
            "GaLore-8bit, rank r (galore-torch)": sum(bnb8(m * n) for m, n in dense) + sum(low_rank(m, n, rank, 4, q8) for m, n in projected),
            "GaLore, rank r, int8 basis + 8-bit moments (this library)": sum(q8(m * n) for m, n in dense) + sum(low_rank_quantised(m, n, rank, 8, q8) for m, n in projected),
            "GaLore, rank r, int4 basis + 8-bit moments (this library)": sum(q8(m * n) for m, n in dense) + sum(low_rank_quantised(m, n, rank, 4, q8) for m, n in projected),
            "Q-GaLore, rank r (INT4 basis)": sum(bnb8(m * n) for m, n in dense) + sum(low_rank(m, n, rank, 0.5, q8) for m, n in projected),
            "APOLLO, rank r": dense_f + sum(low_rank(m, n, rank, 4, f32) for m, n in projected),
            "APOLLO-Mini (r=1)": dense_f + sum(low_rank(m, n, 1, 4, f32) for m, n in projected),
        }
        if name == "LLaMA-60M":
            conf["APOLLO, r = 256 (issue 24's count)"] = dense_f + sum(low_rank(m, n, 256, 4, f32) for m, n in projected)
        rows.append((name, params, conf))
    return rows


def main():
    rows = table()
    names = list(rows[0][2].keys())
    print("| configuration | " + " | ".join(f"{n} ({p / 1e6:.1f}M params)" for n, p, _ in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    print("| rank r (the preset's) | " + " | ".join(str(p[4]) for p in PRESETS) + " |")
    for c in names:
        cells = []
        for _, _, conf in rows:
            cells.append(f"{conf[c] / MIB:,.1f}" if c in conf else "")
        print(f"| {c} | " + " | ".join(cells) + " |")
    print(f"\nMiB of optimizer state; 8-bit and basis blocks of {BLOCK}.")


def weights_table():
    """--weights: the weights' own bytes at the presets: float32, bf16 with a float32 master copy
    (mixed precision), and bf16 alone (low_rank_adamw's bf16 steps) with the float workspace those
    steps share: one float copy of the largest parameter (the 32000 x d embedding or head)."""
    rows = []
    for name, d, layers, ffn, _ in PRESETS:
        projected, dense = shapes(d, layers, ffn)
        params = sum(m * n for m, n in projected + dense)
        largest = max(m * n for m, n in projected + dense)
        rows.append((name, params, {
            "float32 weights (4 B/param)": 4 * params,
            "bf16 + float32 master copy (6 B/param)": 6 * params,
            "bf16 only (2 B/param)": 2 * params,
            "  + bf16 steps' float workspace (4 B x largest parameter)": 4 * largest,
            "bf16 only, with the workspace": 2 * params + 4 * largest,
        }))
    print("| weights | " + " | ".join(f"{n} ({p / 1e6:.1f}M params)" for n, p, _ in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for c in rows[0][2]:
        print(f"| {c} | " + " | ".join(f"{conf[c] / MIB:,.1f}" for _, _, conf in rows) + " |")
    print("\nMiB of weights (no optimizer state, gradients or activations).")


if __name__ == "__main__":
    import sys
    weights_table() if sys.argv[1:] == ["--weights"] else main()
