"""A fast loop for generator changes: train ONLY the CRGAN on a prepared run's soul.h5 with a config overlay,
fill every missed (patient, stage) and judge the fill against a phantom's truth dir (images and course).

    brvo-augment phantom SOUL --patients 16 --images-per-visit 1-3 --seed 3 --truth-dir TRUTH
    brvo-augment ingest SOUL RUN && brvo-augment preprocess RUN --preset demo
    python benchmarks/fill_experiment.py RUN TRUTH --name suffix --set crgan.hide_suffix_prob=0.5 [--seed 0]

Training is the pipeline's own (:func:`tasks.crgan.train_crgan`: train split, best.pt chosen on the
val patients' held-out stages) in a scratch run directory holding a copy of RUN/soul.h5, so RUN is never
written. The fill is the pipeline's too (:func:`tasks.fill.missing_stages`, ``sample_seed``, K samples
per pair through :func:`brvo_models.crgan_sampling.generate`), plus the zero-noise estimate
(``generate_batch``, seed None). :mod:`brvo_models.fill_truth` judges each pair. Labels and KID need
Pix2Pix and are not measured here: the label inputs ``evaluate_pair`` asks for are filled with the nearest
stage's real label and its label and vessel-density outputs are dropped.

Prints one line per gap kind, and the run's own truth-free held-out check by gap kind (what a clinic's run
reports, to set beside the truth), and writes OUT/NAME.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from brvo_models.fill_truth import PairInputs, evaluate_pair, nearest_observed, summarise  # noqa: E402
from storage.errors import BrvoError  # noqa: E402


def parse_sets(items: list[str]) -> dict:
    """['crgan.lambda_l1=100', 'crgan.texture_fit=moments'] -> {'crgan.lambda_l1': 100, ...} (values read as JSON
    where they parse, else as strings)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BrvoError(f"--set {item!r}: expected FIELD=VALUE, e.g. crgan.lambda_l1=100")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def load_truth(truth_dir: Path, pairs: list[tuple[str, int]], size: int, label_resize: str):
    """{pair: (images (R, H, W), labels (R, H, W))}, the true scan first, resized as preprocess resizes."""
    from brvo_models.phantom.truth import read_truth
    from tasks.preprocess import load_pair

    truth = read_truth(truth_dir)
    out = {}
    for pid, stage in pairs:
        loaded = [load_pair(str(i), str(lab), size, label_resize) for i, lab in truth.scan_paths(pid, stage)]
        order = [truth.true_scan] + [k for k in range(len(loaded)) if k != truth.true_scan]
        out[(pid, stage)] = (np.stack([loaded[k][0] for k in order]), np.stack([loaded[k][1] for k in order]))
    return truth, out


def fmt(value, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.0f}%" if pct else f"{value:.3f}"


def summary_line(kind: str, s: dict, val_ssim: float) -> str:
    ss, gap = s["ssim"], s["gap_closed"]
    course = s["course"]["non_perfusion"]
    est, smp = course["zero_noise"], course["samples"]
    return (f"{kind:12s} n={s['n_pairs']:2d} SSIM est {fmt(ss['zero_noise'])} meanK {fmt(ss['mean_of_samples'])} "
            f"one {fmt(ss['one_sample'])} near {fmt(ss['nearest_copy'])} nbr {fmt(ss['neighbour_mean'])} "
            f"rep {fmt(ss['repeat_scan'])} orc {fmt(ss['oracle'])} | gap est {fmt(gap['zero_noise'], True)} "
            f"meanK {fmt(gap['mean_of_samples'], True)} | course est {fmt(est['slope_through_origin'], True)} "
            f"off {est['offset']:+.2f} samples {fmt(smp['slope_through_origin'], True)} off {smp['offset']:+.2f} "
            f"(true {course['true_change_mean']:+.2f}, quarter stage {course['true_change_per_stage'] / 4:.2f}) | "
            f"|one-rep| {abs(ss['one_sample'] - ss['repeat_scan']):.3f} | val {val_ssim:.4f}")


def truth_free_heldout(generator, soul: Path, device) -> dict:
    """What the run itself reports without truth: its val + test patients' observed stages hidden in turn, by gap
    kind (:func:`brvo_models.heldout_gaps.heldout_by_gap`), to set beside the truth."""
    from brvo_models.crgan_data import heldout_cases
    from brvo_models.crgan_sampling import predict_heldout, score_cases
    from brvo_models.heldout_gaps import heldout_by_gap
    from brvo_models.stage_baselines import baseline_predictions
    from tasks.crgan import load_sequences

    cases = heldout_cases(s for s in load_sequences(soul) if s.split in ("val", "test"))
    preds = predict_heldout(generator, cases, seeds=[None], device=device)[:, 0]
    reals = [seq.images[s] for seq, s in cases]
    scored = {"model": score_cases(list(preds), reals)}
    for name in ("nearest", "neighbour_mean"):
        scored[name] = score_cases([baseline_predictions(seq, s)[name] for seq, s in cases], reals)
    return heldout_by_gap(cases, preds, scored)


def _train(work: Path, config, out_dir: Path, name: str, resume: bool):
    """The pipeline's CRGAN training on WORK/soul.h5, its log in OUT/NAME.train.log."""
    from tasks.crgan import train_crgan

    with open(out_dir / f"{name}.train.log", "a" if resume else "w") as train_log:
        return train_crgan(work, config, log=lambda m: print(m, file=train_log, flush=True))


def run_experiment(run_dir: Path, truth_dir: Path, name: str, overrides: dict, seed: int, out_dir: Path,
                   log=print, resume: bool = False, checkpoint: Path | None = None) -> dict:
    from fill_truth import check_truth_matches  # benchmarks/fill_truth.py

    from brvo_models.crgan import load_generator
    from brvo_models.crgan_data import to_uint8
    from brvo_models.crgan_sampling import context_from_images, generate, generate_batch
    from storage.paired_format import read_arrays, read_meta
    from storage.run_dir import RunPaths
    from tasks.config import preset
    from tasks.fill import missing_stages, sample_seed
    from brvo_models.crgan_data import texture_amplitudes
    from tasks.crgan import load_sequences

    config = preset("demo").with_overrides(seed=seed, device="cpu", **overrides)
    soul = RunPaths.of(run_dir).soul_h5
    if not soul.is_file():
        raise BrvoError(f"{soul}: not found; run ingest and preprocess on {run_dir} first")
    work = out_dir / f"{name}.work"
    if not resume:
        shutil.rmtree(work, ignore_errors=True)  # a fresh training: nothing left from an earlier one
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy2(soul, RunPaths.of(work).soul_h5)  # a resume of another config is refused by train_crgan

    t0 = time.perf_counter()
    if checkpoint is not None:  # judge a model trained earlier (its own best.pt), no training
        from types import SimpleNamespace

        from storage.checkpoints import load_checkpoint

        state = load_checkpoint(checkpoint)
        best = state["history"][-1]
        result = SimpleNamespace(best_path=checkpoint, best_val_ssim=float(best["val_ssim"]), best_step=best["step"],
                                 steps=None, stopped_early=None)
    else:
        result = _train(work, config, out_dir, name, resume)
    train_s = time.perf_counter() - t0

    meta = read_meta(soul)
    images, labels = read_arrays(soul)
    size = config.image_size
    observed_images: dict[str, dict[int, np.ndarray]] = {}
    observed_labels: dict[str, dict[int, np.ndarray]] = {}
    for (pid, stage), rows in meta.groupby(["patient_id", "stage"]).groups.items():
        rows = np.asarray(rows)
        observed_images.setdefault(str(pid), {})[int(stage)] = images[rows]
        observed_labels.setdefault(str(pid), {})[int(stage)] = labels[rows]
    holes = {str(p): s for p, s in missing_stages(meta).items() if s}
    pairs = [(pid, stage) for pid in sorted(holes, key=lambda p: (len(p), p)) for stage in holes[pid]]
    truth, truth_scans = load_truth(truth_dir, pairs, size, config.label_resize)
    check_truth_matches(truth, {p: set(s) for p, s in observed_images.items()}, set(pairs))

    t1 = time.perf_counter()
    generator, patient_index, device = load_generator(result.best_path, "cpu", size)
    k = config.samples_per_missing
    contexts, counts = zip(*(context_from_images(observed_images[pid], size) for pid, _ in pairs))
    zero = generate_batch(generator, np.stack(contexts), np.stack(counts), [patient_index.get(p) for p, _ in pairs],
                          [[s] for _, s in pairs], [None] * len(pairs), device)
    zero = {pair: to_uint8(img[0]) for pair, img in zip(pairs, zero)}
    def judge() -> tuple[dict, list[dict]]:
        samples = {}
        for pid, stages in holes.items():
            seeds = [[sample_seed(config.seed, pid, s, j) for j in range(k)] for s in stages]
            made = generate(generator, observed_images[pid], patient_index.get(pid), stages, k, seeds, device)
            for si, stage in enumerate(stages):
                samples[(pid, stage)] = made[si]
        rows_out = []
        for pid, stage in pairs:
            t_images, t_labels = truth_scans[(pid, stage)]
            nearest = nearest_observed(set(observed_images[pid]), stage)
            placeholder = np.repeat(observed_labels[pid][nearest][:1], k, axis=0)  # labels are not judged here
            row = evaluate_pair(PairInputs(
                patient_id=pid, stage=stage, observed_images=observed_images[pid],
                observed_labels=observed_labels[pid], truth_images=t_images, truth_labels=t_labels,
                samples=samples[(pid, stage)], sample_labels=placeholder, zero_noise=zero[(pid, stage)],
                true_area=truth.true_area(pid, stage), nearest_true_area=truth.true_area(pid, nearest)))
            rows_out.append(row)
        summary = summarise(rows_out)
        for s in summary.values():  # label measures read the placeholder labels: not measured here
            s.pop("labels")
            s["course"].pop("vessel_density")
        for row in rows_out:
            row.pop("labels")
            row.pop("vessel_density")
        return summary, rows_out

    summary, rows_out = judge()
    heldout = truth_free_heldout(generator, soul, device)
    for kind, h in heldout.items():
        log(f"{name}: held-out {kind:12s} n={h['n']:2d} SSIM model {h['model']['ssim']:.3f} near "
            f"{h['nearest']['ssim']:.3f} nbr {h['neighbour_mean']['ssim']:.3f} | course carried "
            f"{fmt(h['course']['carried'], True)} off {h['course']['offset']:+.2f} (real {h['course']['real_change_mean']:+.2f})")
    texture = generator.texture["log_amp"].exp().tolist() if generator.texture is not None else None
    gen_s = time.perf_counter() - t1
    out = {"name": name, "run_dir": str(run_dir), "truth_dir": str(truth_dir), "seed": seed, "overrides": overrides,
           "crgan": config.crgan.model_dump(mode="json"), "best_val_ssim": result.best_val_ssim,
           "best_step": result.best_step, "steps": result.steps, "stopped_early": result.stopped_early,
           "texture_amplitudes": texture, "train_seconds": round(train_s, 1), "fill_seconds": round(gen_s, 1),
           "threads": torch.get_num_threads(), "summary": summary, "pairs": rows_out, "heldout_by_gap": heldout}
    for kind, s in summary.items():
        log(f"{name}: " + summary_line(kind, s, result.best_val_ssim))
    if generator.texture is not None and config.crgan.texture_fit == "adversarial":
        # The texture amplitudes alone never reach the estimate (the adversarial gradient stops at them), so
        # fixing them to the repeat-scan spread after training gives the samples texture_fit='moments' would.
        train_seqs = [q for q in load_sequences(soul) if q.split == "train"]
        moments = texture_amplitudes(train_seqs)
        with torch.no_grad():
            generator.texture["log_amp"].copy_(torch.tensor(moments).clamp_min(1e-6).log())
        summary_m, _ = judge()
        out["moment_texture"] = {"texture_amplitudes": list(moments), "summary": summary_m}
        for kind, s in summary_m.items():
            log(f"{name}+moments: " + summary_line(kind, s, result.best_val_ssim))
    if checkpoint is None:
        for suffix in ("", ".sha256"):  # the weights and their checksum sidecar, for --checkpoint
            shutil.copy2(f"{result.best_path}{suffix}", out_dir / f"{name}.best.pt{suffix}")
    shutil.rmtree(work, ignore_errors=True)
    log(f"{name}: best step {result.best_step}/{result.steps}, train {train_s:.0f} s, fill {gen_s:.0f} s, "
        f"texture amplitudes {texture}")
    return out


def main(argv: list[str] | None = None) -> int:
    from storage.atomic import write_json_atomic

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a prepared run directory (its soul.h5 is read, never written)")
    parser.add_argument("truth_dir", type=Path, help="the phantom's --truth-dir")
    parser.add_argument("--name", required=True, help="the experiment's name (OUT/NAME.json)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="config override on the demo preset, e.g. crgan.hide_suffix_prob=0.5 (repeatable)")
    parser.add_argument("--config", type=Path, help="JSON object of config fields, applied before --set")
    parser.add_argument("--seed", type=int, default=0, help="training seed (config.seed)")
    parser.add_argument("--out", type=Path, default=Path("fill_experiments"))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--resume", action="store_true",
                        help="resume the training left in OUT/NAME.work by an interrupted experiment (the "
                             "pipeline's exact resume; a finished one is only judged)")
    parser.add_argument("--checkpoint", type=Path, help="judge this CRGAN best.pt instead of training one")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        overrides = {}
        if args.config is not None:
            from tasks.config import flatten_fields

            overrides.update(flatten_fields(json.loads(args.config.read_text())))
        overrides.update(parse_sets(args.set))
        args.out.mkdir(parents=True, exist_ok=True)
        result = run_experiment(args.run_dir, args.truth_dir, args.name, overrides, args.seed, args.out,
                                resume=args.resume, checkpoint=args.checkpoint)
    except BrvoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_json_atomic(args.out / f"{args.name}.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
