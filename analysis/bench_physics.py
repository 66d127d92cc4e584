"""Benchmark of the physics core: energy + gradient, and the reference solver.

    .venv/bin/python analysis/bench_physics.py                    # 32^3, 64^3, 128^3
    .venv/bin/python analysis/bench_physics.py --sizes 32 64      # a subset
    .venv/bin/python analysis/bench_physics.py --no-reference     # energy only

Energy + gradient: ``fem.energy(u, nu).sum().backward()`` on a (batch, 1, n, n, n) float32
batch (default batch 4), nu from the default KL family (m = 6, eta = 0.5, seed 0). Time is the
median of ``--repeats`` calls after one warm-up call.

Peak memory, and why it is measured this way: torch allocates tensor storage with the C
allocator on CPU, so Python's tracemalloc never sees it. Each size runs in fresh
subprocesses. After the inputs exist, the process's peak-RSS counter is reset (writing "5"
to /proc/self/clear_refs resets VmHWM; fallback getrusage ru_maxrss) and the first
energy + backward call runs; the *extra* peak is VmHWM - VmRSS(before): every byte the call
touched beyond its inputs, the gradient output included. It is measured twice:

- "live": in a worker started with MALLOC_MMAP_THRESHOLD_=131072, so glibc serves every
  field-sized buffer by mmap and returns it on free; RSS then tracks the bytes of live
  tensors (at 64^3 this agreed with torch.profiler(profile_memory=True)'s allocation
  trace to 3%). This is the algorithm's footprint, and the number extrapolated to 512^3.
- "RSS": in the timing worker with the default allocator, which keeps freed heap memory;
  what a plain process actually costs.

On CUDA (``--device cuda``) both are torch.cuda.max_memory_allocated() - memory_allocated().
"Fields" divides a peak by one float32 field of the batch (batch * n^3 * 4 bytes).

Reference solve: one sample per size and method (``--methods``, default amg and gmg),
``reference.solve_with_stats(nu, method=...)`` with rtol 1e-10, float64, reporting assembly,
preconditioner setup (AMG hierarchy / V-cycle levels and coarse factor) and preconditioned-CG
times, also in a fresh subprocess per size and method (its peak RSS is reported too). gmg runs
on ``--device``; amg always on the host.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MiB = 2.0**20
MARK = "BENCH_RESULT "


def _proc_status_kib(key: str) -> int:
    """A 'kB' line (VmRSS, VmHWM) of /proc/self/status, in KiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _nu(n: int, batch: int, dtype):
    import torch

    from pdeds.physics import kl

    coeffs = torch.from_numpy(kl.sample_coefficients(batch, 6, seed=0))
    return kl.diffusivity(coeffs, n, dim=3).to(dtype)


def energy_worker(n: int, batch: int, repeats: int, device: str) -> dict:
    """Time and peak memory of energy + gradient at n^3, in this (fresh) process."""
    import torch

    from pdeds.physics import fem

    nu = _nu(n, batch, torch.float32).to(device)
    w = torch.rand(nu.shape, generator=torch.Generator().manual_seed(0)).to(device)
    u = fem.apply_dirichlet(w).detach().requires_grad_(True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step() -> None:
        u.grad = None
        fem.energy(u, nu).sum().backward()
        sync()

    if device == "cuda":
        sync()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        extra = torch.cuda.max_memory_allocated() - before
        method = "torch.cuda.max_memory_allocated"
    else:
        before = _proc_status_kib("VmRSS")
        if _reset_peak_rss():
            step()
            extra = (_proc_status_kib("VmHWM") - before) * 1024
            method = "VmHWM after clear_refs"
        else:
            step()
            extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
            method = "ru_maxrss"
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    field = batch * n**3 * 4
    return dict(
        n=n,
        batch=batch,
        time_s=statistics.median(times),
        extra_bytes=extra,
        fields=extra / field,
        method=method,
        threads=torch.get_num_threads(),
    )


def reference_worker(n: int, method: str, device: str) -> dict:
    """Timings of one reference solve at n^3 by ``method``, in this (fresh) process."""
    import torch

    from pdeds.physics import reference

    nu = _nu(n, 1, torch.float64)
    if method != "amg":
        nu = nu.to(device)
    t0 = time.perf_counter()
    _, stats = reference.solve_with_stats(nu, method=method)
    total = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if nu.is_cuda:
        peak = torch.cuda.max_memory_allocated()
    return dict(n=n, method=method, total_s=total, peak_rss_bytes=peak, **stats[0])


def _run_worker(args: list[str], env_extra: dict[str, str] | None = None) -> dict:
    env = dict(os.environ, **(env_extra or {}))
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    for line in out.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    raise RuntimeError(f"worker {args} failed:\n{out.stdout}\n{out.stderr}")


def energy_table(rows: list[dict]) -> str:
    lines = [
        "| grid | batch | energy+grad (s) | per sample (ms) | live peak (MiB) "
        "| live per sample (MiB) | live fields | RSS peak (MiB) | RSS fields |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']}^3 | {r['batch']} | {r['time_s']:.3f} | "
            f"{1e3 * r['time_s'] / r['batch']:.1f} | {r['extra_bytes'] / MiB:.1f} | "
            f"{r['extra_bytes'] / r['batch'] / MiB:.1f} | {r['fields']:.1f} | "
            f"{r['rss_bytes'] / MiB:.1f} | {r['rss_fields']:.1f} |"
        )
    return "\n".join(lines)


def reference_table(rows: list[dict]) -> str:
    lines = [
        "| grid | method | unknowns | assembly (s) | setup (s) | CG (s) | iterations "
        "| rel. residual | peak memory (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']}^3 | {r['method']} | {(r['n'] - 2) * r['n'] ** 2} | "
            f"{r['assembly_s']:.2f} | "
            f"{r['setup_s']:.2f} | {r['solve_s']:.2f} | {r['iterations']} | "
            f"{r['residual']:.1e} | {r['peak_rss_bytes'] / MiB:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference solves")
    parser.add_argument("--no-energy", action="store_true", help="skip the energy benchmark")
    parser.add_argument(
        "--methods", nargs="+", default=["amg", "gmg"], help="reference methods (amg gmg)"
    )
    parser.add_argument("--worker", choices=["energy", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "energy":
        result = energy_worker(args.sizes[0], args.batch, args.repeats, args.device)
        print(MARK + json.dumps(result), flush=True)
        return
    if args.worker == "reference":
        result = reference_worker(args.sizes[0], args.methods[0], args.device)
        print(MARK + json.dumps(result), flush=True)
        return

    if not args.no_energy:
        rows = []
        for n in args.sizes:
            worker = ["--worker", "energy", "--sizes", str(n), "--device", args.device]
            worker += ["--batch", str(args.batch)]
            timed = _run_worker([*worker, "--repeats", str(args.repeats)])
            live = _run_worker([*worker, "--repeats", "1"], {"MALLOC_MMAP_THRESHOLD_": "131072"})
            rows.append(
                dict(
                    timed,
                    rss_bytes=timed["extra_bytes"],
                    rss_fields=timed["fields"],
                    extra_bytes=live["extra_bytes"],
                    fields=live["fields"],
                )
            )
        print(
            f"## energy + gradient, float32, {args.device}, {rows[0]['threads']} torch threads, "
            f"peak memory by {rows[0]['method']}\n"
        )
        print(energy_table(rows))
        big = rows[-1]
        per_sample = big["extra_bytes"] / big["batch"]
        print(
            f"\npeak memory per sample at {big['n']}^3: {per_sample / MiB:.1f} MiB "
            f"live ({big['fields']:.1f} field-sized float32 buffers beyond the inputs u, nu); "
            f"{big['rss_bytes'] / big['batch'] / MiB:.1f} MiB RSS with the default allocator"
        )
        scale = (512 / big["n"]) ** 3
        print(
            f"extrapolated to 512^3 (x{scale:.0f}): {per_sample * scale / 2**30:.2f} GiB extra "
            f"per sample, plus {2 * 4 * 512**3 / 2**30:.1f} GiB for its u and nu\n"
        )
    if not args.no_reference:
        rows = []
        for n in args.sizes:
            for method in args.methods:
                worker = ["--worker", "reference", "--sizes", str(n), "--methods", method]
                rows.append(_run_worker([*worker, "--device", args.device]))
                done = rows[-1]["total_s"]
                print(f"reference {n}^3 {method} done in {done:.1f} s", file=sys.stderr)
        print("## reference solve (preconditioned CG, float64, rtol 1e-10, 1 sample)\n")
        print(reference_table(rows))


if __name__ == "__main__":
    main()
