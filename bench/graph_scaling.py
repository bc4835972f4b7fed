"""Time of qonnx against graph size (`bench/run.py --graph-scaling`): generated MatMul -> Add -> Relu chains.

Each size is a chain of ceil(n / 3) layers (x[1, 8] -> MatMul(8x8) -> Add(bias) -> Relu, repeated), so
1,000 / 3,000 / 10,000 nodes are 1,002 / 3,000 / 10,002. Each runs `w8a8-static` on 16 calibration rows in
its own process (bench/worker.py, as every other row), so its time and peak RSS are its own. A pass that is
quadratic in graph size shows as the time growing ~10x from 3k to 10k nodes instead of ~3.3x.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from jobs import run_job
from onnx import TensorProto, helper, numpy_helper

PIPELINE = "w8a8-static"
WIDTH = 8


def chain_model(nodes: int, width: int = WIDTH, seed: int = 0) -> onnx.ModelProto:
    """A MatMul/Add/Relu chain of about `nodes` nodes (3 a layer), batch 1, `width` features."""
    gen = np.random.default_rng(seed)
    graph_nodes, inits, x = [], [], "x"
    for i in range(math.ceil(nodes / 3)):
        inits += [numpy_helper.from_array((gen.standard_normal((width, width)) * 0.3).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array((gen.standard_normal(width) * 0.1).astype(np.float32), f"b{i}")]
        graph_nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
                        helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"),
                        helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    graph = helper.make_graph(graph_nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def graph_scaling(out_root: Path, sizes: tuple[int, ...], seed: int, cap: float) -> dict[str, Any]:
    """`PIPELINE` on a chain of each size; the per-size results (nodes, seconds, peak MB, seconds per pass)."""
    out = out_root / "graph_scaling"
    out.mkdir(parents=True, exist_ok=True)
    calib = out / "calib.npz"
    np.savez(calib, x=np.random.default_rng(seed).standard_normal((16, WIDTH)).astype(np.float32))
    runs = []
    for size in sizes:
        model = chain_model(size, seed=seed)
        path = out / f"chain_{size}.onnx"
        onnx.save(model, str(path))
        res = run_job("qonnx", f"chain-{size}", out, model=path, output=out / f"chain_{size}.q.onnx", calib=calib,
                      config={"pipeline": PIPELINE, "seed": seed, "holdout": 0}, mem_cap_mb=cap)
        runs.append({"nodes": len(model.graph.node), **{k: res.get(k) for k in (
            "ok", "error", "seconds", "peak_mb", "pass_seconds")}})
    return {"pipeline": PIPELINE, "width": WIDTH, "calibration_samples": 16, "runs": runs}
