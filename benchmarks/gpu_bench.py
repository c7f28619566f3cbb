"""GPU throughput of the product's training steps, its evaluation, and a full-preset run's steps (issue 12, item 5).

    python benchmarks/gpu_bench.py                          # on a CUDA machine: 256 px, batches 1 / 8 / 32
    python benchmarks/gpu_bench.py --full-run RUN_DIR       # + evaluation seconds and the run's per-step wall time
    python benchmarks/gpu_bench.py --tiny --json out.json   # CPU smoke test: 32 px, tiny widths, batches 1 / 2

Everything is measured in one process, so the figures share one GPU, clock and driver:

* ``peak``: bf16 matmul TFLOP/s (a large square matmul, best of three timed blocks): the ceiling the
  training steps' achieved TFLOP/s are compared with.
* ``pix2pix`` / ``crgan``: img/s of ``Pix2Pix.train_step`` (full preset widths, 256 px) and ``CRGAN.train_step``
  (full preset widths, 256 px) at batch 1, 8, 32, under the product's bf16 autocast (CUDA) and in fp32 (the
  bench swaps the modules' ``autocast`` for a no-op; cuDNN's TF32 default for convolutions is left as is). Each
  step's FLOPs are counted once with ``torch.utils.flop_counter.FlopCounterMode``; achieved TFLOP/s = FLOPs /
  step time, and its fraction of the bf16 matmul peak. Steps are timed in blocks with one synchronisation per
  block (as fit runs them: no host sync per step), median of the blocks. CRGAN's img/s counts the stage images
  a step generates (its batch is of patients); the host-side batch building and the upload (``stage``), which
  fit runs in a prefetch thread, are timed apart.
* ``graphs``: Pix2Pix at batch 1 (bf16) with ``cuda_graphs`` on vs off; compile time reported apart.
* ``checkpoint``: each model's checkpoint (weights + optimiser state) at the config's size, in MB, and the
  seconds to write it: the cost ``checkpoint_every_s`` bounds (fit writes one after a validation).
* ``eval`` (with ``--full-run``): seconds of the product's ``evaluate_pix2pix`` and ``evaluate_crgan`` on that
  run's checkpoints and soul.h5, with the run's own config.
* ``flow`` (with ``--full-run``): the run's wall time per flow step (report.json ``timings_s`` and the step
  records in ``.steps/``), with training / evaluation / Frangi seconds of the two model steps.

Each section runs under its own time limit (``--section-timeout``); a section that fails or runs out of time
is recorded with its error and the rest still run. The JSON (``--json``, else ``$OUT/gpu_bench.json`` when
``$OUT`` is set) is rewritten after every section, so a killed run keeps what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import brvo_models.crgan as crgan_module
import brvo_models.pix2pix as pix2pix_module
from brvo_models.crgan import CRGAN
from brvo_models.crgan_data import N_STAGES, PatientSequence, make_train_batches
from brvo_models.pix2pix import Pix2Pix
from storage.report_schema import load_report
from storage.run_dir import RunPaths
from tasks.config import preset

SECTIONS = ("peak", "pix2pix", "crgan", "graphs", "checkpoint", "eval", "flow")


def log(msg: str) -> None:
    print(msg, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise SectionTimeout in the main thread after ``seconds`` (SIGALRM; checked between Python bytecodes,
    so a long CUDA call ends first). No limit where SIGALRM does not exist or ``seconds`` <= 0."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise SectionTimeout(f"section ran past its {seconds} s limit")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def precision(name: str):
    """'bf16': the product's own autocast (bf16 on CUDA, none on CPU); 'fp32': the models' autocast swapped for
    a no-op while the body runs (the step code itself is unchanged)."""
    if name == "bf16":
        yield
        return
    saved = pix2pix_module.autocast, crgan_module.autocast
    pix2pix_module.autocast = crgan_module.autocast = lambda device: contextlib.nullcontext()
    try:
        yield
    finally:
        pix2pix_module.autocast, crgan_module.autocast = saved


# ------------------------------------------------------------------------------------------------ timing


def count_flops(step: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def time_blocks(step: Callable[[], Any], device: torch.device, window_s: float, warmup: int = 3,
                blocks: int = 3) -> dict[str, float]:
    """Median seconds per step over ``blocks`` blocks of k steps, one synchronisation per block;
    k is sized from one synchronised step so a block lasts about window_s / blocks."""
    for _ in range(warmup):
        step()
    sync(device)
    t = time.perf_counter()
    step()
    sync(device)
    one = time.perf_counter() - t
    k = max(1, int(window_s / blocks / max(one, 1e-6)))
    per_step = []
    for _ in range(blocks):
        t = time.perf_counter()
        for _ in range(k):
            step()
        sync(device)
        per_step.append((time.perf_counter() - t) / k)
    return {"step_s": statistics.median(per_step), "steps_per_block": k, "blocks": blocks,
            "spread": (max(per_step) - min(per_step)) / statistics.median(per_step)}


def matmul_peak(device: torch.device, n: int, reps: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """TFLOP/s of an n x n @ n x n matmul in ``dtype`` (bf16: the peak), best of three blocks of ``reps``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return {"n": n, "reps": reps, "tflops": 2 * n**3 * reps / best / 1e12}


def measure(name: str, step: Callable[[], Any], items_per_step: int, device: torch.device, window_s: float,
            peak_tflops: float | None, warmup: int = 3) -> dict[str, Any]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    flops = count_flops(step)
    timing = time_blocks(step, device, window_s, warmup=warmup)
    tflops = flops / timing["step_s"] / 1e12
    row = {"name": name, **timing, "img_per_s": items_per_step / timing["step_s"], "flops_per_step": flops,
           "tflops": tflops, "fraction_of_bf16_peak": tflops / peak_tflops if peak_tflops else None}
    if device.type == "cuda":
        row["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


# ------------------------------------------------------------------------------------------------ models


def pix2pix_batch(batch_size: int, size: int, device: torch.device, seed: int = 0):
    """A synthetic (image, label) batch in [-1, 1], already on the device (fit's prefetch thread stages it)."""
    g = torch.Generator().manual_seed(seed)
    label = (torch.rand(batch_size, 1, size, size, generator=g) < 0.15).float()
    image = (label * 0.6 + 0.3 * torch.rand(batch_size, 1, size, size, generator=g)).clamp(0, 1)
    return (image * 2 - 1).to(device), (label * 2 - 1).to(device)


def synthetic_sequences(n_patients: int, size: int, seed: int = 0) -> list[PatientSequence]:
    """Training patients with SOUL-like stage coverage (stage 0 always, later ones often missing), 1-3 images each."""
    rng = np.random.default_rng(seed)
    seqs = []
    for i in range(n_patients):
        images: list[np.ndarray | None] = []
        for stage in range(N_STAGES):
            seen = stage == 0 or rng.random() < 0.6
            images.append(rng.integers(0, 256, (int(rng.integers(1, 4)), size, size), dtype=np.uint8) if seen
                          else None)
        seqs.append(PatientSequence(f"{i:03d}", "train", images, index=i))
    return seqs


def bench_pix2pix(args, device, peak, results: list, cuda_graphs_variants=(False,), precisions=None,
                  batches=None) -> None:
    config = args.config
    for bs in batches or args.batches:
        for prec in precisions or args.precisions:
            for graphs in cuda_graphs_variants:
                name = f"pix2pix b{bs} {prec}" + (f" cuda_graphs={'on' if graphs else 'off'}"
                                                  if len(cuda_graphs_variants) > 1 else "")
                row: dict[str, Any] = {"name": name, "model": "pix2pix", "batch": bs, "precision": prec,
                                       "cuda_graphs": graphs}
                try:
                    p = config.pix2pix.model_copy(update={"batch_size": bs, "cuda_graphs": graphs})
                    with precision(prec):
                        torch.manual_seed(0)
                        model = Pix2Pix(p, config.image_size, device)
                        batch = pix2pix_batch(bs, config.image_size, device)
                        row["compiled"] = model._train_G is not model.G
                        t = time.perf_counter()
                        model.train_step(batch)  # first step: allocations, cuDNN autotune, compilation
                        sync(device)
                        row["first_step_s"] = time.perf_counter() - t
                        step = (lambda: model.train_step(batch))
                        if row["compiled"]:  # FlopCounterMode does not see inside CUDA graph replays: count eagerly
                            flops = count_flops(lambda: _eager_pix2pix_step(p, config.image_size, device, batch))
                            timing = time_blocks(step, device, args.window, warmup=3)
                            tflops = flops / timing["step_s"] / 1e12
                            row.update(timing, img_per_s=bs / timing["step_s"], flops_per_step=flops, tflops=tflops,
                                       fraction_of_bf16_peak=tflops / peak if peak else None)
                        else:
                            row.update(measure(name, step, bs, device, args.window, peak))
                except Exception as exc:  # recorded, and the next configuration still runs
                    row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                    if isinstance(exc, SectionTimeout):
                        results.append(row)
                        raise
                finally:
                    model = batch = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                results.append(row)
                log(format_row(row))


def _eager_pix2pix_step(p, size, device, batch):
    Pix2Pix(p.model_copy(update={"cuda_graphs": False}), size, device).train_step(batch)


def bench_crgan(args, device, peak, results: list) -> None:
    config = args.config
    # 37 training patients as in the 53-patient phantom (the embedding table's size), more for larger batches
    seqs = synthetic_sequences(max(37, max(args.batches)), config.image_size)
    for bs in args.batches:
        for prec in args.precisions:
            name = f"crgan b{bs} {prec}"
            row: dict[str, Any] = {"name": name, "model": "crgan", "batch": bs, "precision": prec}
            try:
                c = config.crgan.model_copy(update={"batch_size": bs})
                t = time.perf_counter()
                (raw,) = make_train_batches(seqs[:bs], c, seed=0, epoch=0)  # one batch of bs patients
                row["build_batch_s"] = time.perf_counter() - t
                with precision(prec):
                    torch.manual_seed(0)
                    model = CRGAN(c, config.image_size, [s.patient_id for s in seqs], device)
                    t = time.perf_counter()
                    staged = model.stage(raw)
                    sync(device)
                    row["stage_s"] = time.perf_counter() - t
                    images = len(raw["sel_b"])
                    row["images_per_step"] = images
                    row.update(measure(name, lambda: model.train_step(staged), images, device, args.window, peak,
                                       warmup=2))
                    row["patients_per_s"] = bs / row["step_s"]
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                if isinstance(exc, SectionTimeout):
                    results.append(row)
                    raise
            finally:
                model = staged = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            results.append(row)
            log(format_row(row))


def bench_checkpoint(args, device, out: dict, repeats: int = 3) -> None:
    """Seconds to write each model's checkpoint (weights + optimiser state, as fit writes after a validation)
    at the config's size, beside the size in MB: the cost that ``checkpoint_every_s`` bounds."""
    import tempfile

    from storage.checkpoints import save_checkpoint

    config = args.config
    seqs = synthetic_sequences(37, config.image_size)
    makers = {
        "pix2pix": lambda: Pix2Pix(config.pix2pix.model_copy(update={"batch_size": 1, "cuda_graphs": False}),
                                   config.image_size, device),
        "crgan": lambda: CRGAN(config.crgan, config.image_size, [s.patient_id for s in seqs], device),
    }
    with tempfile.TemporaryDirectory(prefix="ckpt_bench_") as tmp:
        for name, make in makers.items():
            model = make()
            for opt in model.optimizers().values():  # Adam's moments exist after a step: fill them as one would
                for group in opt.param_groups:
                    for param in group["params"]:
                        param.grad = torch.zeros_like(param)
                opt.step()
            payload = {"modules": {k: m.state_dict() for k, m in model.modules().items()},
                       "optimizers": {k: o.state_dict() for k, o in model.optimizers().items()}}
            path = Path(tmp) / f"{name}.pt"
            seconds = []
            for _ in range(repeats):
                t = time.perf_counter()
                save_checkpoint(path, payload)
                seconds.append(time.perf_counter() - t)
            out[name] = {"mb": path.stat().st_size / 1e6, "write_s_min": min(seconds), "write_s_max": max(seconds),
                         "params_m": sum(p.numel() for m in model.modules().values() for p in m.parameters()) / 1e6}
            log(f"checkpoint {name}: {out[name]['params_m']:.1f} M params, {out[name]['mb']:.0f} MB, "
                f"write {min(seconds):.2f}-{max(seconds):.2f} s")
            model = payload = None


def bench_eval(run_dir: Path, out: dict) -> None:
    """The product's evaluate functions on a finished run, with its recorded config."""
    from tasks.engine.run_record import recorded_config
    from tasks.crgan import evaluate_crgan
    from tasks.pix2pix import evaluate_pix2pix

    config = recorded_config(run_dir)
    if config is None:
        raise RuntimeError(f"{run_dir}: no run.json config")
    for name, evaluate in (("pix2pix", evaluate_pix2pix), ("crgan", evaluate_crgan)):
        try:
            t = time.perf_counter()
            section = evaluate(run_dir, config, log=lambda m: log(f"  {m}"))
            out[name] = {"seconds": time.perf_counter() - t, "reported_seconds": section.get("seconds")}
            if name == "pix2pix":
                out[name]["frangi_seconds"] = section["frangi_params"]["seconds"]
                out[name]["test_dice"] = section["test"]["dice"]
            else:
                out[name]["heldout_ssim"] = section["heldout"]["model"]["ssim"]
        except SectionTimeout:
            raise
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
        log(f"eval {name}: {out[name]}")


def flow_timings(run_dir: Path) -> dict[str, Any]:
    """Per-step wall time of a run: report.json's timings_s, each step record's seconds, and the model steps'
    training / evaluation / Frangi seconds."""
    out: dict[str, Any] = {}
    report_path = RunPaths.of(run_dir).report_json
    if report_path.exists():
        report = load_report(report_path)
        out["timings_s"] = report.timings_s.model_dump(exclude_unset=True) if report.timings_s else None
        for model, section in (("pix2pix", report.pix2pix), ("crgan", report.crgan)):
            if section is None:
                continue
            training = section.training or {}
            frangi = getattr(section, "frangi_params", None) or {}
            out[f"{model}_detail"] = {
                "train_seconds": training.get("seconds"), "steps": training.get("steps"),
                "epochs": training.get("epochs"), "eval_seconds": section.seconds,
                "frangi_seconds": frangi.get("seconds"),
            }
    records = {}
    for path in sorted((run_dir / ".steps").glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if "step" in rec and "seconds" in rec:
            records[rec["step"]] = {"seconds": rec["seconds"], "finished_utc": rec.get("finished_utc")}
    out["step_records"] = records
    if not out.get("timings_s") and not records:
        raise RuntimeError(f"{run_dir}: neither report.json timings nor .steps records found")
    return out


# ------------------------------------------------------------------------------------------------ output


def format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['name']:<36} ERROR {row['error']}"
    frac = row.get("fraction_of_bf16_peak")
    extra = ""
    if "first_step_s" in row:
        extra += f"  first {row['first_step_s']:.2f} s"
    if "stage_s" in row:
        extra += f"  build {row['build_batch_s'] * 1e3:.0f} ms  stage {row['stage_s'] * 1e3:.0f} ms"
    if "max_memory_gib" in row:
        extra += f"  mem {row['max_memory_gib']:.1f} GiB"
    return (f"{row['name']:<36} {row['step_s'] * 1e3:9.2f} ms/step {row['img_per_s']:9.1f} img/s "
            f"{row['tflops']:8.3g} TFLOP/s  {'' if frac is None else f'{100 * frac:5.1f}% of bf16 peak'}{extra}")


def print_table(results: dict) -> None:
    log("\n==================== gpu_bench summary ====================")
    log(f"device: {results['env'].get('device_name')}  torch {results['env'].get('torch')}  "
        f"mode {'tiny' if results['env'].get('tiny') else 'full'}")
    peak = results.get("peak") or {}
    if "tflops" in peak:
        log(f"bf16 matmul peak (n={peak['n']}): {peak['tflops']:.4g} TFLOP/s")
    for key in ("pix2pix", "crgan", "graphs"):
        for row in results.get(key) or []:
            log(format_row(row))
    for name, ck in (results.get("checkpoint") or {}).items():
        log(f"checkpoint {name}: {ck['mb']:.0f} MB, write {ck['write_s_min']:.2f}-{ck['write_s_max']:.2f} s")
    for name, ev in (results.get("eval") or {}).items():
        log(f"eval {name}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in ev.items()))
    flow = results.get("flow") or {}
    if flow.get("timings_s"):
        log("flow step seconds (report.json): " + ", ".join(f"{k} {v}" for k, v in flow["timings_s"].items()))
    for model in ("pix2pix", "crgan"):
        if flow.get(f"{model}_detail"):
            log(f"  {model}: {flow[f'{model}_detail']}")
    for name, err in (results.get("errors") or {}).items():
        log(f"section {name} FAILED: {err}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: the tiny preset's widths at 32 px, "
                                                          "batches 1 and 2, short timing windows")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 8 32 (tiny: 1 2)")
    ap.add_argument("--sections", default=None,
                    help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; eval and flow only with "
                         "--full-run, which they need)")
    ap.add_argument("--full-run", type=Path, default=None,
                    help="a finished run directory: time the evaluate functions on it and read its step timings")
    ap.add_argument("--window", type=float, default=None, help="seconds of timed steps per configuration "
                                                                 "(default 2, tiny 0.2)")
    ap.add_argument("--section-timeout", type=int, default=120, help="seconds per section before it is cut off")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="turn on torch.backends.cudnn.benchmark (off in the product, and by default here)")
    ap.add_argument("--json", type=Path, default=None, help="results file (default $OUT/gpu_bench.json if $OUT)")
    args = ap.parse_args(argv)

    from brvo_models.runtime import select_device

    device = select_device(args.device)
    args.config = preset("tiny" if args.tiny else "full")
    args.batches = args.batches or ([1, 2] if args.tiny else [1, 8, 32])
    args.window = args.window or (0.2 if args.tiny else 2.0)
    # bf16 = the product's autocast, which is bf16 on CUDA only; on the CPU it would time fp32 twice
    args.precisions = ["bf16", "fp32"] if device.type == "cuda" else ["fp32"]
    if args.sections is None:
        sections = [s for s in SECTIONS if args.full_run is not None or s not in ("eval", "flow")]
    else:
        sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    json_path = args.json or (Path(os.environ["OUT"]) / "gpu_bench.json" if os.environ.get("OUT") else None)
    # the product leaves cuDNN's autotuner off; --cudnn-benchmark measures what turning it on would give
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)

    results: dict[str, Any] = {"env": {
        "tiny": args.tiny, "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cuda": torch.version.cuda, "image_size": args.config.image_size, "batches": args.batches,
        "precisions": args.precisions, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pix2pix_config": args.config.pix2pix.model_dump(), "crgan_config": args.config.crgan.model_dump(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "cudnn_benchmark": bool(args.cudnn_benchmark), "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }, "errors": {}, "section_seconds": {}}

    def save() -> None:
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(results, indent=2, default=str))

    log(f"gpu_bench on {results['env']['device_name']} ({device}), torch {torch.__version__}, "
        f"{args.config.image_size} px, batches {args.batches}, precisions {args.precisions}")

    def peak_tflops() -> float | None:
        return (results.get("peak") or {}).get("tflops")

    def run_peak():
        n, reps = (256, 5) if args.tiny or device.type != "cuda" else (8192, 50)
        results["peak"] = matmul_peak(device, n, reps)
        log(f"bf16 matmul: {results['peak']['tflops']:.2f} TFLOP/s (n={n})")

    def run_pix2pix():
        results["pix2pix"] = []
        bench_pix2pix(args, device, peak_tflops(), results["pix2pix"])

    def run_crgan():
        results["crgan"] = []
        bench_crgan(args, device, peak_tflops(), results["crgan"])

    def run_graphs():
        results["graphs"] = []
        if device.type != "cuda":
            log("graphs: cuda_graphs applies on CUDA only; timing both flags eagerly here (they must agree)")
        bench_pix2pix(args, device, peak_tflops(), results["graphs"], cuda_graphs_variants=(False, True),
                      precisions=[args.precisions[0]], batches=[1])

    def run_checkpoint():
        results["checkpoint"] = {}
        bench_checkpoint(args, device, results["checkpoint"])

    def run_eval():
        if args.full_run is None:
            raise RuntimeError("needs --full-run RUN_DIR")
        results["eval"] = {}
        bench_eval(args.full_run, results["eval"])

    def run_flow():
        if args.full_run is None:
            raise RuntimeError("needs --full-run RUN_DIR")
        results["flow"] = flow_timings(args.full_run)

    runners = {"peak": run_peak, "pix2pix": run_pix2pix, "crgan": run_crgan, "graphs": run_graphs,
               "checkpoint": run_checkpoint, "eval": run_eval, "flow": run_flow}
    for name in sections:
        log(f"--- section {name}")
        t = time.perf_counter()
        try:
            with time_limit(args.section_timeout):
                runners[name]()
        except Exception as exc:  # one section's failure must not lose the others' figures
            results["errors"][name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            log(f"section {name} failed: {results['errors'][name]}")
            traceback.print_exc(file=sys.stdout)
            sys.stdout.flush()
        results["section_seconds"][name] = round(time.perf_counter() - t, 2)
        save()
    print_table(results)
    if json_path is not None:
        log(f"wrote {json_path}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
