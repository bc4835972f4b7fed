"""ONNX Runtime helpers: sessions from in-memory bytes, batched runs, latency.

Nothing is written to disk here: calibration exposes intermediate tensors by
adding graph outputs to an in-memory copy of the model.
"""

from __future__ import annotations

import logging
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx
import onnxruntime as ort

log = logging.getLogger(__name__)


def quiet_ort_logging() -> None:
    """Only errors from ORT's process-wide default logger (an application's choice: the CLI calls it).

    Sessions made here set their own severity; this covers what ORT logs outside a session.
    """
    ort.set_default_logger_severity(3)


def session_options(threads: int | None = None, level: str = "all", optimized_path: str | None = None,
                    spinning: bool = True, quiet: bool = False) -> ort.SessionOptions:
    """`quiet`: ORT logs nothing itself (callers that report ORT's failures as one line of their own)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 4 if quiet else 3
    if not spinning:  # idle ORT threads must not spin while numpy works between runs
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    return opts


def make_session(model: bytes | str | os.PathLike[str] | onnx.ModelProto, threads: int | None = None,
                 level: str = "all", spinning: bool = True, quiet: bool = False) -> ort.InferenceSession:
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    if isinstance(model, os.PathLike):
        model = str(model)
    return ort.InferenceSession(model, session_options(threads, level, spinning=spinning, quiet=quiet),
                                providers=["CPUExecutionProvider"])


def latency_session(model: bytes | str | os.PathLike[str] | onnx.ModelProto,
                    threads: int | None = None) -> ort.InferenceSession:
    """A session for `measure_latency`: all optimisations, and worker threads that sleep when idle.

    Why no spinning: ORT's idle workers spin for a while after each run, so when sessions take turns
    the spinning workers of the ones just measured take the cores from the one being measured. On
    2 cores that made every 2-thread median 2-3x its value measured alone (MiniLM FP32: 41 ms
    interleaved vs 12 ms alone), and not by the same factor for every model.
    """
    return make_session(model, threads=threads, spinning=False)


def optimized_graph(model: bytes | onnx.ModelProto, threads: int = 1) -> onnx.ModelProto:
    """The graph ORT actually runs (after its fusions), read back from ORT itself."""
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    with tempfile.TemporaryDirectory(prefix="qonnx-ort-") as tmp:
        path = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(model, session_options(threads, "all", path), providers=["CPUExecutionProvider"])
        return onnx.load(path)


def with_outputs(proto: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of the model that also returns the named intermediate float tensors."""
    fresh = onnx.ModelProto()
    fresh.CopyFrom(proto)
    existing = {o.name for o in fresh.graph.output}
    for name in names:
        if name not in existing:
            fresh.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            existing.add(name)
    return fresh


def truncated(proto: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy computing only the named float tensors (as its outputs) and the nodes they need."""
    names = list(dict.fromkeys(names))
    graph_inputs = {i.name for i in proto.graph.input}
    needed = set(names)
    keep = []
    for node in reversed(proto.graph.node):
        if not needed.intersection(node.output):
            continue
        keep.append(node)
        needed.update(node.input)
        for attr in node.attribute:  # subgraphs may read outer tensors: keep whatever they name
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                for inner in g.node:
                    needed.update(inner.input)
    fresh = onnx.ModelProto()
    fresh.CopyFrom(proto)
    del fresh.graph.node[:]
    fresh.graph.node.extend(reversed(keep))
    kept_inits = [i for i in proto.graph.initializer if i.name in needed]
    del fresh.graph.initializer[:]
    fresh.graph.initializer.extend(kept_inits)
    del fresh.graph.output[:]
    fresh.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names if n not in graph_inputs)
    return fresh  # every graph input stays, so the same feeds work


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_heap_bounded = False


def bound_heap_growth() -> None:
    """Fix glibc's mmap threshold at 1 MiB (once per process, glibc only).

    glibc raises the threshold after large blocks are freed, so the per-batch activation buffers of a long
    streaming run end up in fragmented heap arenas: Lite0 calibration peaked at 1135 MB with 100 samples and
    1399 MB with 1000. With a fixed threshold large buffers are mapped and unmapped whole: 1062 and 1038 MB.
    This is process-wide (mallopt has no narrower scope), so the library never calls it on its own: the CLI and
    the bench worker do, once. It changes no result, only where memory comes from.
    """
    global _heap_bounded
    if _heap_bounded:
        return
    _heap_bounded = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def stream_tensors(proto: onnx.ModelProto, names: Iterable[str], batches: Iterable[dict[str, np.ndarray]],
                   threads: int | None = None) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Yield (feed, {name: value}) per batch for the named tensors: graph inputs come from the
    feed, intermediate tensors are the outputs of an in-memory session that runs only the nodes they need.

    Each yielded dict is emptied when the next batch is asked for: a caller that still held the
    previous batch's outputs would keep two batches alive during the run, and ORT's arena grows to fit
    both (Lite0 calibration: 1112 MB peak with 100 samples, 1392 MB with 1000; emptied, 841 and 832 MB).
    Arrays the caller keeps a reference to stay valid: only the dict lets go of them.
    """
    names = list(names)
    graph_inputs = {i.name for i in proto.graph.input}
    wanted = sorted({n for n in names if n not in graph_inputs})
    session = (make_session(truncated(proto, wanted).SerializeToString(), threads=threads, spinning=False)
               if wanted else None)
    for feed in batches:
        values = dict(zip(wanted, session.run(wanted, feed))) if session is not None else {}  # None iff not wanted
        values.update({n: feed[n] for n in names if n in graph_inputs})
        yield feed, values
        values.clear()  # see the docstring: one batch of outputs alive at a time


def run_batches(session: ort.InferenceSession, batches: Iterable[dict[str, np.ndarray]],
                outputs: list[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    names = outputs or [o.name for o in session.get_outputs()]
    for feed in batches:
        yield dict(zip(names, session.run(names, feed)))


@dataclass
class Latency:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    @property
    def spread(self) -> float:
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms else 0.0


def measure_latency(sessions: list[ort.InferenceSession], feed: dict[str, np.ndarray], *, warmup: int = 5,
                    runs: int = 50, min_seconds: float = 0.0) -> list[Latency]:
    """Median latency of each session, runs interleaved so machine noise hits all alike.

    Each round runs the sessions in a fresh (seeded) order. A model's time depends on the one run just
    before it, which has filled the caches with its own weights; with a fixed cyclic order each model
    always followed the same neighbour, and on Fashion-MNIST (25-45 us per run) the float model after
    an int8 one measured 2-4 % slower than the identical float model after a float one.
    Make the sessions with `latency_session`: with spinning workers, interleaving measures contention.
    """
    if not sessions:
        return []
    for sess in sessions:
        for _ in range(warmup):
            sess.run(None, feed)
    samples: list[list[float]] = [[] for _ in sessions]
    shuffler = random.Random(0)
    start = time.perf_counter()
    done = 0
    while done < runs or time.perf_counter() - start < min_seconds:
        order = list(range(len(sessions)))
        shuffler.shuffle(order)
        for i in order:
            t0 = time.perf_counter()
            sessions[i].run(None, feed)
            samples[i].append((time.perf_counter() - t0) * 1000.0)
        done += 1
        if done >= 10 * runs:
            break
    result = []
    for s in samples:
        q = statistics.quantiles(s, n=10) if len(s) >= 2 else [s[0]] * 9
        result.append(Latency(statistics.median(s), q[0], q[-1], len(s)))
    return result
