"""Experiment: the paged decode kernel with keys as the rows of its products (MMA operand placement).

The production kernel (`llm_service/layers/triton_decode.py`) computes scores as `q [16, D] @ K^T` and
the output as `p [16, N] @ V`: 16-row tiles (one real query row for an MHA model), which Triton runs
on warp-level MMAs with K and V as the second operand. Over an fp8 cache it reads half the bytes of a
bf16 cache but is no faster (results/decode_kernel_tuning_fp8_tiles256_h200.json). This kernel swaps
the roles: `scores^T = K [N, D] @ q^T [D, 16]`, so the key tile (upcast in registers) is the first
operand and the products have `N` (>= 64) rows, the shape Hopper's warpgroup MMA needs; the output is
`p^T`-weighted either as `p [16, N] @ V` ("keys_as_rows") or as `V^T [D, N] @ p^T [N, 16]`
("keys_and_values_as_rows"). MHA (one query head per KV head), one split per sequence (batch x heads
>= 2 programs per SM): the layouts where the fp8 question arises.

Each variant is checked against the production kernel and timed as a CUDA graph of 10 calls, over a
bf16 and an fp8 cache, at the given layouts.

    python benchmarks/decode_operand_experiment.py --out /tmp/out --layouts b256_ctx192,b256_ctx1024
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl
from tune_decode_kernel import LAYOUTS, _graph_ms

from llm_service.layers.triton_decode import DecodeKernelConfig, paged_decode_attention


@triton.jit
def _keys_as_rows_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, seq_lens_ptr, out_ptr,
    scale,
    stride_qs, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ts, stride_os, stride_oh,
    PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
    NUM_STAGES: tl.constexpr, VALUES_AS_ROWS: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    head = tl.program_id(1)  # MHA: the KV head is the query head
    r = tl.arange(0, ROWS)
    d = tl.arange(0, HEAD_DIM)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    q = tl.load(q_ptr + seq * stride_qs + head * stride_qh + (r * 0)[:, None] + d[None, :])  # [R, D], rows equal
    q_t = tl.trans(q)  # [D, R]
    m_i = tl.zeros([ROWS], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    if VALUES_AS_ROWS:
        acc = tl.zeros([HEAD_DIM, ROWS], dtype=tl.float32)
    else:
        acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    for n0 in tl.range(0, seq_len, BLOCK, num_stages=NUM_STAGES):
        pos = n0 + tl.arange(0, BLOCK)  # [N]
        valid = pos < seq_len
        block = tl.load(tables_ptr + seq * stride_ts + pos // PAGE, mask=valid, other=0).to(tl.int64)
        offset = (pos % PAGE).to(tl.int64)
        k_at = block * stride_kb + offset * stride_kt + head * stride_kh
        k = tl.load(k_ptr + k_at[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(q.dtype)  # [N, D]
        s = tl.dot(k, q_t) * scale  # [N, R] fp32
        s = tl.where(valid[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))  # [R]
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[None, :])  # [N, R]
        l_i = l_i * alpha + tl.sum(p, axis=0)
        v_at = block * stride_vb + offset * stride_vt + head * stride_vh
        v = tl.load(v_ptr + v_at[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(q.dtype)  # [N, D]
        if VALUES_AS_ROWS:
            acc = acc * alpha[None, :] + tl.dot(tl.trans(v), p.to(q.dtype))  # [D, R]
        else:
            acc = acc * alpha[:, None] + tl.dot(tl.trans(p.to(q.dtype)), v)  # [R, D]
        m_i = m_new
    if VALUES_AS_ROWS:
        out = acc / l_i[None, :]  # [D, R]
        ptrs = out_ptr + seq * stride_os + head * stride_oh + d[:, None] + (r * 0)[None, :]
        tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=(r == 0)[None, :])
    else:
        out = acc / l_i[:, None]  # [R, D]
        ptrs = out_ptr + seq * stride_os + head * stride_oh + (r * 0)[:, None] + d[None, :]
        tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=(r == 0)[:, None])


def keys_as_rows_attention(query, k_cache, v_cache, tables, seq_lens, scale, config, values_as_rows):
    num_seqs, num_heads, head_dim = query.shape
    assert k_cache.shape[2] == num_heads, "the experiment kernel is MHA only (one query head per KV head)"
    out = torch.empty_like(query)
    _keys_as_rows_kernel[(num_seqs, num_heads)](
        query, k_cache, v_cache, tables, seq_lens, out, scale,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        tables.stride(0), out.stride(0), out.stride(1),
        PAGE=k_cache.shape[1], HEAD_DIM=head_dim, ROWS=16, BLOCK=config.block_n,
        NUM_STAGES=config.num_stages, VALUES_AS_ROWS=values_as_rows, num_warps=config.num_warps,
    )  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layouts", default="b256_ctx192,b256_ctx1024")
    parser.add_argument("--kv-dtypes", default="bf16,fp8")
    args = parser.parse_args(argv)
    device, dtype, heads, head_dim, page = torch.device("cuda"), torch.bfloat16, 32, 128, 16
    configs = [
        DecodeKernelConfig(block_n=b, num_warps=w, num_stages=s)
        for b in (64, 128) for w in (4, 8) for s in (1, 2, 3)
    ]  # fmt: skip
    results: dict = {"device": torch.cuda.get_device_name(), "points": []}
    for kv_name in args.kv_dtypes.split(","):
        cache_dtype = {"bf16": dtype, "fp8": torch.float8_e4m3fn}[kv_name]
        for layout in args.layouts.split(","):
            batch, context = LAYOUTS[layout]
            blocks_per_seq = -(-context // page)
            num_blocks = batch * blocks_per_seq + 1
            gen = torch.Generator(device="cpu").manual_seed(0)
            shape = (num_blocks, page, heads, head_dim)
            k_cache = torch.randn(shape, generator=gen).to(device, cache_dtype)
            v_cache = torch.randn(shape, generator=gen).to(device, cache_dtype)
            tables = torch.randperm(num_blocks - 1, generator=gen)[: batch * blocks_per_seq].view(batch, -1)
            tables = tables.to(device)
            lens = torch.full((batch,), context, device=device)
            query = torch.randn(batch, heads, head_dim, generator=gen).to(device, dtype)
            scale = head_dim**-0.5
            kv_bytes = 2 * batch * context * heads * head_dim * k_cache.element_size()
            expected = paged_decode_attention(query, k_cache, v_cache, tables, lens, scale).float()
            inputs = (query, k_cache, v_cache, tables, lens, scale)
            ms = _graph_ms(functools.partial(paged_decode_attention, *inputs))
            point = {"kv_dtype": kv_name, "layout": layout, "production_default_us": ms * 1000,
                     "production_default_gb_s": kv_bytes / ms / 1e6, "variants": []}  # fmt: skip
            for values_as_rows in (False, True):
                for config in configs:
                    name = "keys_and_values_as_rows" if values_as_rows else "keys_as_rows"
                    row = {"variant": name, "config": vars(config)}
                    run = functools.partial(keys_as_rows_attention, *inputs, config, values_as_rows)
                    try:
                        row["max_abs_err"] = float((run().float() - expected).abs().max())
                        ms = _graph_ms(run)
                        row.update(us=ms * 1000, gb_s=kv_bytes / ms / 1e6)
                    except Exception as exc:  # a shape that does not compile or fit
                        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    point["variants"].append(row)
            timed = [v for v in point["variants"] if "us" in v and v["max_abs_err"] < 0.05]
            best = min(timed, key=lambda v: v["us"]) if timed else None
            point["best"] = best
            print(f"{kv_name} {layout}: production {point['production_default_us']:.1f} us; best "
                  f"{best and round(best['us'], 1)} us {best and (best['variant'], best['config'])}",
                  flush=True)  # fmt: skip
            results["points"].append(point)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_operand_experiment.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
