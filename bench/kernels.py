"""W4A16 kernel speed per 7B layer: quantflow's Triton kernels vs cuBLAS bf16 vs PyTorch's tinygemm, in one run.

For each decoder Linear of a 7B Llama (q/k/v fused as qkv, o, gate/up fused, down) and for the whole layer (the four
in a row), at 1, 4, 8, 16 and 32 rows and a 2,048-token prefill, times each method in a CUDA graph that runs
``--copies`` copies of the layer's weights one after another (so the weights come from memory, not the 50 MB L2),
medians over the replays. HBM fraction: the weight bytes each method must read (bf16 2 bytes a weight; int4 half a
byte plus its scales and offsets) over the time, against a device-to-device copy measured in the same run.

The decode kernel runs the blocks ``quantflow.kernels.w4a16.decode_config`` gives, as ``linear`` does. First it times
every unpack form that gives the plain unpack's numbers bit for bit; with ``--sweep`` it also times those blocks'
neighbours at 1, 16 and 32 rows (one sweep per product width), which is how ``decode_config`` was chosen.
``nvfp4`` rows time ``quantflow.kernels.fp4``'s decode product (1-16 rows) on random NVFP4 weights of the same shapes
(codes, E4M3 scale bytes and one global scale per row read as saved: 4.5 bytes per 8 weights).

    python3 bench/kernels.py --out $OUT/kernels.json [--sweep]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

LAYER = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}  # (out, in)
ROWS = (1, 4, 8, 16, 32, 2048)
GROUP = 128


def graph_time(run, replays: int) -> float:
    """Median µs of one replay of ``run`` captured in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a 4 GiB elementwise copy kernel (read + write), the ceiling the fractions use (a graph
    captures ``copy_`` as a copy-engine memcpy, which moved only ~2.8 TB/s)."""
    src = torch.empty(2**31, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / (graph_time(lambda: torch.add(src, 1, out=dst), 30) * 1e-6)


def make_weights(out: int, width: int, seed: int) -> dict:
    """One Linear's random weight in every method's form: bf16, tinygemm's packing and quantflow's layout."""
    from quantflow.evaluation.int4 import Int4Linear
    from quantflow.kernels.w4_pack import dequantize, repack

    generator = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randint(-8, 8, (out, width), generator=generator, device="cuda", dtype=torch.int8)
    scale = (torch.rand(out, width // GROUP, generator=generator, device="cuda") * 0.01 + 0.001).to(torch.bfloat16)
    zp = torch.randint(-8, 8, scale.shape, generator=generator, device="cuda", dtype=torch.int8)
    packed = repack(q, scale, zp, GROUP)
    tiny = Int4Linear.from_unsigned(q.int() + 8, scale.float(), -zp.float() * scale.float(), GROUP, None, "cuda")
    return {"packed": packed, "bf16": dequantize(packed), "tinygemm": tiny.pack("tinygemm"), "nvfp4": fp4(out, width)}


def fp4(out: int, width: int):
    """Random NVFP4 codes and FP8 scales of one Linear's shape, as ``quantflow.kernels.fp4`` takes them."""
    from quantflow.kernels.fp4 import from_compressed

    codes = torch.randint(0, 256, (out, width // 2), device="cuda", dtype=torch.uint8)
    scale = (torch.rand(out, width // 16, device="cuda") * 400 + 1).to(torch.float8_e4m3fn)
    return from_compressed(codes, scale, torch.tensor([7000.0], device="cuda"), "nvfp4-pack-quantized")


SWEEP_ROWS = (1, 16, 32)  # one sweep per product width (8, 16, 32): rows 1-8 take the first's blocks


def sweep(weights: list[dict], form: int, x: torch.Tensor) -> dict:
    """Per Linear and product width, the µs of the default decode configuration and a few neighbours (at one row:
    warps, split 0.75 and 1.5 times; at 16: warps; at 32: warps, block_n) on the given unpack form; prints the
    fastest."""
    from quantflow.kernels import w4a16

    tried = {}
    for rows in SWEEP_ROWS:
        for name, (out, width) in LAYER.items():
            tiles = width // 128
            default = w4a16.decode_config(out, width, 128, rows)
            candidates = [default, replace(default, warps=6 - default.warps)]
            if rows == 1:
                splits = {round(default.split_k * 0.75), round(default.split_k * 1.5)} - {default.split_k}
                candidates += [replace(default, split_k=s) for s in sorted(splits) if 1 <= s <= tiles]
            if rows == 32:
                candidates.append(replace(default, block_n=192 - default.block_n))
            flat = x[:rows, :width].contiguous()
            runs = [w[name]["packed"] for w in weights]
            results = {}
            for config in candidates:
                calls = [lambda p=p, config=config: w4a16.decode_launch(flat, p, config, form) for p in runs]
                try:
                    results[config] = graph_time(lambda calls=calls: [c() for c in calls], 20) / len(runs)
                except Exception as error:  # noqa: BLE001 - a configuration that does not build (shared memory)
                    print(f"{name} {config}: {type(error).__name__}")
            key = f"{name} {rows}"
            tried[key] = {str(c): t for c, t in results.items()}
            best = min(results, key=results.get)
            print(f"{key}: {best} {results[best]:.1f} µs (default {results.get(default, float('nan')):.1f})")
    return tried


def form_times(weights: list[dict], x: torch.Tensor) -> dict:
    """Per unpack form that gives the plain form's numbers on a 7B shape: layer µs at 1 row, default blocks."""
    from quantflow.kernels import w4a16

    times = {}
    for form in w4a16.FORMS:
        try:
            probe = weights[0]["o"]["packed"]
            flat = x[:3, :4096].contiguous()
            config = w4a16.decode_config(4096, 4096, 128)
            y, plain = (w4a16.decode_launch(flat, probe, config, f).float() for f in (form, w4a16.PLAIN))
            if not torch.equal(y, plain):  # the same operands in the same order: the same bits
                print(f"form {w4a16.FORMS[form]}: differs from plain")
                continue
        except Exception as error:  # noqa: BLE001 - a form that does not build here
            print(f"form {w4a16.FORMS[form]}: {type(error).__name__} {str(error)[:300]}")
            continue
        times[form] = {}
        calls = [
            (lambda w=w, name=name, flat=x[:1, :width].contiguous(), config=w4a16.decode_config(out, width, 128):
             w4a16.decode_launch(flat, w[name]["packed"], config, form))
            for w in weights for name, (out, width) in LAYER.items()
        ]  # fmt: skip
        times[form]["1"] = graph_time(lambda calls=calls: [c() for c in calls], 30) / len(weights)
        print(f"form {w4a16.FORMS[form]}: layer µs {times[form]}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=4, help="layer copies rotated through per replay")
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("bench/results/kernels-w4a16-h200.json"))
    parser.add_argument("--sweep", action="store_true", help="also time each Linear's blocks' neighbours")
    args = parser.parse_args()

    from quantflow.kernels import unpack_form, w4a16
    from quantflow.kernels.fp4 import DECODE_ROWS as FP4_ROWS
    from quantflow.kernels.fp4 import decode_linear as fp4_decode

    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True  # cuBLAS's default, stated
    form = unpack_form(torch.device("cuda"))
    if isinstance(form, str):
        raise SystemExit(f"no W4 kernel here: {form}")
    bandwidth = copy_bandwidth()
    weights = [{name: make_weights(*shape, seed=10 * copy + i) for i, (name, shape) in enumerate(LAYER.items())}
               for copy in range(args.copies)]  # fmt: skip
    x = torch.randn(max(ROWS), max(w for _, w in LAYER.values()), device="cuda").to(torch.bfloat16)
    forms = form_times(weights, x)
    tried = sweep(weights, form, x) if args.sweep else {}

    def method_call(method: str, name: str, rows: int):
        flat = x[:rows, : LAYER[name][1]].contiguous()
        if method == "bf16":
            return [lambda w=w: flat @ w[name]["bf16"].t() for w in weights]
        if method == "tinygemm":
            return [lambda w=w: w[name]["tinygemm"](flat) for w in weights]
        if method == "nvfp4":
            return [lambda w=w: fp4_decode(flat, w[name]["nvfp4"]) for w in weights]
        if rows <= 32:
            config = w4a16.decode_config(*LAYER[name], 128, rows, w4a16.multiprocessors(x.device))
            return [lambda w=w: w4a16.decode_launch(flat, w[name]["packed"], config, form) for w in weights]
        return [lambda w=w: flat @ w4a16.dequantize_launch(w[name]["packed"]).t() for w in weights]

    def weight_bytes(method: str, name: str) -> int:
        out, width = LAYER[name]
        if method == "nvfp4":
            return out * width // 2 + out * width // 16 + out * 4  # codes, E4M3 scale bytes, global scales
        return out * width * 2 if method == "bf16" else out * width // 2 + out * width // GROUP * 4

    table = []
    for rows in ROWS:
        replays = args.replays if rows <= 32 else 5
        for method in ("bf16", "tinygemm", "w4a16") + (("nvfp4",) if rows <= FP4_ROWS else ()):
            per = {}
            for name in LAYER:
                calls = method_call(method, name, rows)
                per[name] = graph_time(lambda calls=calls: [c() for c in calls], replays) / len(calls)
            calls = [c for name in LAYER for c in method_call(method, name, rows)]
            layer = graph_time(lambda calls=calls: [c() for c in calls], replays) / args.copies
            moved = sum(weight_bytes(method, name) for name in LAYER)
            table.append({"rows": rows, "method": method, "layer_us": layer, "per_linear_us": per,
                          "hbm_fraction": moved / (layer * 1e-6) / bandwidth})  # fmt: skip
            print(f"measured: {rows} rows {method} {layer:.1f} µs a layer, {per}", flush=True)  # in case of a kill
    for row in table:
        base = next(r["layer_us"] for r in table if r["rows"] == row["rows"] and r["method"] == "bf16")
        row["speedup_vs_bf16"] = base / row["layer_us"]
    result = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "copy_bandwidth_gbs": bandwidth / 1e9,
        "runtime_unpack": w4a16.FORMS[form],
        "unpack_forms_layer_us": {w4a16.FORMS[f]: t for f, t in forms.items()},
        "decode_configs": {
            f"{name} {rows}": str(w4a16.decode_config(o, i, 128, rows))
            for rows in SWEEP_ROWS
            for name, (o, i) in LAYER.items()
        },
        "decode_sweep_us": tried,
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{result['card']}, copy {result['copy_bandwidth_gbs']:.0f} GB/s, runtime unpack {result['runtime_unpack']}")
    print(f"decode blocks: {result['decode_configs']}")
    print(f"{'rows':>5} {'method':>9} {'layer µs':>9} {'x bf16':>7} {'HBM':>5}  " + " ".join(f"{n:>8}" for n in LAYER))
    for row in table:
        print(
            f"{row['rows']:>5} {row['method']:>9} {row['layer_us']:>9.1f} {row['speedup_vs_bf16']:>6.2f}x "
            f"{row['hbm_fraction']:>5.0%}  " + " ".join(f"{row['per_linear_us'][n]:>8.1f}" for n in LAYER)
        )


if __name__ == "__main__":
    main()
