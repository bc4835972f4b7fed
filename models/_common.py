"""Shared plumbing for the model recipes: paths, atomic writes, package/Debian file lookup, ORT runs.

Everything here is deliberately light (numpy, onnxruntime, stdlib): heavy libraries (torch,
transformers) are imported only inside the recipe that needs them, so evaluating a prepared task
never pays for them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SessionFactory = Callable[[Path], Any]


def cache_dir() -> Path:
    """Root of prepared tasks: `$QONNX_MODELS_DIR`, else `<repo>/models/.cache` (gitignored)."""
    env = os.environ.get("QONNX_MODELS_DIR")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / "models" / ".cache"


# ----------------------------------------------------------------------------------------------
# Atomic writes: a crash or Ctrl-C never leaves a half-written file that a later run would trust.
# ----------------------------------------------------------------------------------------------
def _tmp_near(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the cache unreadable to other users
    return Path(tmp)


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success it replaces `path` in one rename."""
    tmp = _tmp_near(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def save_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode())


def save_npz_atomic(path: Path, arrays: Mapping[str, np.ndarray], compress: bool = False) -> None:
    """Write an .npz atomically (np.savez appends `.npz` to names, so write through a file object)."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        (np.savez_compressed if compress else np.savez)(f, **dict(arrays))


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def copy_atomic(src: Path, dst: Path) -> None:
    with atomic_output(dst) as tmp:
        shutil.copyfile(src, tmp)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def needs(out_dir: Path, force: bool, *names: str) -> bool:
    """True when the files `names` in `out_dir` must be (re)built: --force, or any is missing."""
    return force or not all((out_dir / n).exists() for n in names)


# ----------------------------------------------------------------------------------------------
# Files shipped inside installed packages, found without importing the package (foolbox, skimage,
# matplotlib and rapidocr import heavy or unavailable dependencies at import time).
# ----------------------------------------------------------------------------------------------
def package_dir(name: str, pip_name: str | None = None) -> Path:
    spec = importlib.util.find_spec(name)  # top-level find_spec never executes the package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {name!r} is not installed; run `bash models/setup.sh` "
            f"(it installs {pip_name or name} with --no-deps)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(name: str, *parts: str, pip_name: str | None = None) -> Path:
    path = package_dir(name, pip_name).joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} missing from package {pip_name or name}: wrong version?")
    return path


# ----------------------------------------------------------------------------------------------
# Debian data packages: `apt-get download` + extract only the wanted members into the cache.
# ----------------------------------------------------------------------------------------------
def debian_files(package: str, prefix: str, required: tuple[str, ...] = ()) -> Path:
    """Return `<root>/<prefix>` holding the files of Debian `package` under `prefix`.

    Uses the system copy when the package is installed; else downloads the .deb into the cache
    (running `apt-get update` once if the package lists are missing) and extracts only `prefix`.
    `required` names files that must be there (a system folder may come from a sibling package).
    """
    system = Path("/") / prefix
    if system.is_dir() and any(system.iterdir()) and all((system / r).exists() for r in required):
        return system
    root = cache_dir() / "_debian" / package
    if (root / ".complete").exists():
        return root / prefix
    with tempfile.TemporaryDirectory(prefix=f"deb-{package}-") as tmp:
        deb = _apt_download(package, Path(tmp))
        staging = Path(tmp) / "root"
        staging.mkdir()
        want = "./" + prefix.strip("/") + "/"
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if member.name.startswith(want) and (member.isfile() or member.isdir()):
                    tar.extract(member, staging, filter="data")
        if proc.wait() != 0:
            raise RuntimeError(f"dpkg-deb failed on {deb}")
        if not (staging / prefix).is_dir():
            raise FileNotFoundError(f"Debian package {package} has no {prefix}")
        (staging / ".complete").write_text(deb.name + "\n")
        if root.exists():
            shutil.rmtree(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), root)
    log.info("extracted Debian %s:%s into %s", package, prefix, root)
    return root / prefix


def _apt_download(package: str, where: Path) -> Path:
    def attempt() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["apt-get", "download", "-q", package], cwd=where, capture_output=True, text=True
        )

    if shutil.which("apt-get") is None:
        raise RuntimeError(f"need Debian package {package!r} but apt-get is not available")
    res = attempt()
    if res.returncode != 0:
        log.info("apt-get download %s failed; running apt-get update once", package)
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
        res = attempt()
    debs = sorted(where.glob(f"{package}_*.deb"))
    if res.returncode != 0 or not debs:
        raise RuntimeError(
            f"could not download Debian package {package!r} (needs root or the package lists): "
            f"{res.stderr.strip()[-500:]}\nInstall it by hand (`apt-get install -y {package}`) and retry."
        )
    return debs[0]


# ----------------------------------------------------------------------------------------------
# ONNX Runtime helpers.
# ----------------------------------------------------------------------------------------------
def default_session(model_path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # Spinning worker threads made runs up to 2x slower and erratic on the 2-vCPU CI machines.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model_path), sess_options=so, providers=["CPUExecutionProvider"])


def run_batched(
    session: Any,
    inputs: Mapping[str, np.ndarray],
    batch_size: int,
    output_names: list[str] | None = None,
) -> Iterator[tuple[slice, list[np.ndarray]]]:
    """Feed `inputs` (leading axis = samples) through `session` batch by batch."""
    n = len(next(iter(inputs.values())))
    want = {i.name for i in session.get_inputs()}
    for start in range(0, n, batch_size):
        sl = slice(start, min(n, start + batch_size))
        feed = {k: np.ascontiguousarray(v[sl]) for k, v in inputs.items() if k in want}
        yield sl, session.run(output_names, feed)


def run_first_output(session: Any, inputs: Mapping[str, np.ndarray], batch_size: int) -> np.ndarray:
    """Concatenate the first model output over all batches (eval sets are small)."""
    name = session.get_outputs()[0].name
    return np.concatenate([outs[0] for _, outs in run_batched(session, inputs, batch_size, [name])])


def take(arrays: Mapping[str, np.ndarray], max_samples: int | None) -> dict[str, np.ndarray]:
    return {k: (v if max_samples is None else v[:max_samples]) for k, v in arrays.items()}


def reference_outputs(
    task_dir: Path, compute: Callable[[Any], dict[str, np.ndarray]], data_file: str = "eval.npz"
) -> dict[str, np.ndarray]:
    """FP32 outputs on the full eval set, cached in `fp32_eval_outputs.npz`.

    `compute(session)` runs the FP32 `model.onnx` and returns what the metrics need. The cache
    records the model's sha256 and the data file's size/mtime, so rebuilding either invalidates it.
    """
    model, data = task_dir / "model.onnx", task_dir / data_file
    cache = task_dir / "fp32_eval_outputs.npz"
    stamp = data.stat() if data.exists() else None
    digest = sha256_file(model) + (f":{stamp.st_size}:{stamp.st_mtime_ns}" if stamp else "")
    if cache.exists():
        data = load_npz(cache)
        if str(data.pop("__model_sha256", "")) == digest:
            return data
    log.info("computing FP32 reference outputs for %s", task_dir.name)
    data = compute(default_session(model))
    save_npz_atomic(cache, {**data, "__model_sha256": np.array(digest)})
    return data


# ----------------------------------------------------------------------------------------------
# Metrics shared by several tasks.
# ----------------------------------------------------------------------------------------------
def evaluate_classifier(
    model_path: Path,
    task_dir: Path,
    *,
    reference_key: str,
    session_factory: Any = None,
    batch_size: int = 64,
    max_samples: int | None = None,
) -> dict[str, float]:
    """Accuracy against `eval_labels.npy` and top-1 agreement with the cached FP32 outputs."""
    data = load_npz(task_dir / "eval.npz")
    labels = np.load(task_dir / "eval_labels.npy")[:max_samples]
    ref = reference_outputs(task_dir, lambda s: {reference_key: run_first_output(s, data, batch_size)})[reference_key]
    scores = run_first_output((session_factory or default_session)(model_path), take(data, max_samples), batch_size)
    pred = scores.argmax(-1)
    return {
        "accuracy": float(np.mean(pred == labels)),
        "top1_agreement": float(np.mean(pred == ref[:max_samples].argmax(-1))),
        "samples": float(len(pred)),
    }


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def classification_fidelity(ref_logits: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """top-1 agreement, mean KL(ref || model) of the softmaxes, and SQNR (dB) of the logits."""
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))
    return {
        "top1_agreement": float(np.mean(ref_logits.argmax(-1) == logits.argmax(-1))),
        "kl": kl,
        "sqnr_db": sqnr_db(ref_logits, logits),
    }


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    noise = float(np.sum((ref - out.astype(np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    return float("inf") if noise == 0.0 else 10.0 * float(np.log10(signal / noise))
