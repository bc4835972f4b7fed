"""Run one quantization job (`bench/worker.py`) in a child process and measure it alone.

Peak memory is the child's own high-water mark, `VmHWM` of its address space after `exec`. Not
`ru_maxrss` (from `os.wait4`, RUSAGE_CHILDREN or `time -v`): Linux carries a process's maxrss
across fork+exec, so a child forked from this (large, data-holding) parent would report at least
the parent's RSS at fork time. The child reads its own VmHWM at the end of the job; the watchdog
here also samples it every 50 ms, which is the number kept when a child dies before reporting.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
WORKER = Path(__file__).resolve().parent / "worker.py"


def memory_cap_mb(fraction: float = 0.6, ceiling_mb: float = 16000.0) -> float:
    """A per-job RSS cap that keeps a shared machine out of the OOM killer: a fraction of MemAvailable."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return min(ceiling_mb, int(line.split()[1]) * 1024 / 1e6 * fraction)
    return ceiling_mb


def run_job(kind: str, name: str, workdir: Path, *, model: Path, output: Path, calib: Path | None = None,
            config: dict[str, Any] | None = None, batch_size: int = 8, timeout_s: float = 3600.0,
            mem_cap_mb: float | None = None) -> dict[str, Any]:
    """Run `kind` as `name` in `workdir`; returns the child's result plus `peak_mb`, `wall_s`, `ok`.

    The child's log goes to `workdir/name.log`; on failure the result carries its tail as `error`.
    A child whose RSS passes `mem_cap_mb` is killed (`over_memory_cap` in the result).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path, log_path = (workdir / f"{name}.{ext}" for ext in ("spec.json", "result.json", "log"))
    result_path.unlink(missing_ok=True)
    spec = {"kind": kind, "model": str(model), "output": str(output), "calib": str(calib) if calib else None,
            "config": config or {}, "batch_size": batch_size, "result": str(result_path)}
    spec_path.write_text(json.dumps(spec, indent=1))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(WORKER.parent.parent),
                                                                     os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([sys.executable, str(WORKER), str(spec_path)], cwd=workdir, env=env,
                                stdout=logf, stderr=subprocess.STDOUT)
        status, hwm_mb, over_cap = _wait(proc, timeout_s, mem_cap_mb)
    wall = time.perf_counter() - t0
    out: dict[str, Any] = {"kind": kind, "config": config or {}, "wall_s": round(wall, 3), "peak_mb": hwm_mb}
    code = os.waitstatus_to_exitcode(status) if status is not None else None
    if code == 0 and result_path.exists():
        out.update(json.loads(result_path.read_text()))
        out["peak_mb"] = round(out["vm_hwm_mb"], 1)
        out["ok"] = True
    else:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        if over_cap:
            reason = f"killed: RSS passed the {mem_cap_mb / 1000:.1f} GB memory cap"
        elif status is None:
            reason = f"timed out after {timeout_s:.0f} s"
        else:
            reason = f"exit code {code}" + (" (killed: out of memory?)" if code == -signal.SIGKILL else "")
            raised = [ln for ln in tail if ln[:1].isalpha() and ": " in ln and ln.split(":")[0].isidentifier()]
            if raised:
                reason += f": {raised[-1][:300]}"
        out.update(ok=False, error=reason, over_memory_cap=over_cap, log_tail=tail)
        log.warning("%s failed: %s (see %s)", name, reason, log_path)
    return out


def _memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a live process in MB; zeros once it is gone."""
    values = {"VmRSS": 0.0, "VmHWM": 0.0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in values:
                values[key] = int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return values["VmRSS"], values["VmHWM"]


def _wait(proc: subprocess.Popen, timeout_s: float, mem_cap_mb: float | None) -> tuple[int | None, float, bool]:
    """Wait for the child, polling so a timeout or the memory cap can kill it.

    Returns (wait status, or None when killed; the highest VmHWM sampled, MB; whether the cap was hit).
    """
    deadline = time.monotonic() + timeout_s
    hwm = 0.0
    while True:
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return status, round(hwm, 1), False
        rss, sampled = _memory_mb(proc.pid)
        hwm = max(hwm, sampled)
        over_cap = mem_cap_mb is not None and rss > mem_cap_mb
        if over_cap or time.monotonic() > deadline:
            proc.kill()
            os.waitpid(proc.pid, 0)
            proc.returncode = -signal.SIGKILL
            return None, round(hwm, 1), over_cap
        time.sleep(0.05)
