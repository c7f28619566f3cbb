"""The label baselines Pix2Pix is judged against (Otsu, Frangi, a supervised segmenter), kept by their own inputs.

Why a cache of their own: the baselines depend on soul.h5, the split, the image size, the seed, the segmenter's
step budget and precision, and their code; not on anything of Pix2Pix's recipe. Retraining Pix2Pix with another
objective, schedule or width on the same data (a rerun of the 'pix2pix' step on a run directory, or a sub-run
that reuses the directory) would otherwise tune Frangi and train the segmenter again, about a fifth of the step.
The key is a sha256 over the soul.h5 bytes, :data:`CONFIG_FIELDS` of the config and the code fingerprint of this
module's closure, so a cached entry is only ever what the current code, config and data would compute.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from brvo_models.metrics import choose_threshold
from brvo_models.segmentation_baselines import FrangiBaseline, otsu_masks
from brvo_models.segmenter import fit_segmenter, predict_probabilities
from storage.hashing import file_sha256
from tasks.config import PipelineConfig
from tasks.engine.identity import code_fingerprint
from tasks.engine.logs import LogFn, run_log
from tasks.engine.step import config_fields
from tasks.shared.keyed_cache import read_entry, write_entry
from tasks.shared.workers import process_map

#: What the baselines' result depends on besides soul.h5 and the code (dotted for a model's field).
CONFIG_FIELDS = ("image_size", "seed", "segmenter_steps", "labelled_train_patients", "device", "pix2pix.precision")

ScoreFn = Callable[[np.ndarray, np.ndarray], dict[str, float]]


def baselines_key(soul_h5: str | os.PathLike, config: PipelineConfig, scored_on: str,
                  *helpers: Callable[..., Any]) -> str:
    """The cache key of the baselines of ``soul_h5`` under ``config``: data bytes, config slice, where the masks
    are scored (the batched and the per-image metrics agree to 1e-4, not bit for bit), and the code of this
    module and of the ``helpers`` handed to it (the split reader and the scorer)."""
    fields = config_fields(config, CONFIG_FIELDS)
    h = hashlib.sha256()
    h.update(file_sha256(soul_h5).encode())
    h.update(json.dumps({**fields, "scored_on": scored_on}, sort_keys=True).encode())
    for fn in (compute_label_baselines, *helpers):
        h.update(code_fingerprint(fn).encode())
    return h.hexdigest()


def label_baselines(soul_h5: str | os.PathLike, config: PipelineConfig, cache_dir: str | os.PathLike | None, *,
                    load_split: Callable[..., tuple[np.ndarray, np.ndarray, Any]], score: ScoreFn,
                    scored_on: str = "numpy", log: LogFn = run_log) -> dict[str, Any]:
    """The baselines' test scores and how they were made, served from ``cache_dir`` when its entry has this
    run's key, else computed and stored there (atomically). ``cache_dir`` None: always computed.
    ``scored_on``: where ``score`` computes (a device name, or "numpy"), part of the key."""
    key = baselines_key(soul_h5, config, scored_on, load_split, score) if cache_dir is not None else None
    path = Path(cache_dir) / f"{key}.json" if cache_dir is not None else None
    entry = read_entry(path, key, log, "label baselines") if path is not None else None
    if entry is not None:
        log(f"label baselines: served from {path} (computed {entry.get('computed_utc')}, "
            f"{entry['result']['seconds']} s then)")
        return entry["result"]
    result = compute_label_baselines(soul_h5, config, load_split=load_split, score=score, log=log)
    if path is not None:
        write_entry(path, key, result)
    return result


def compute_label_baselines(soul_h5: str | os.PathLike, config: PipelineConfig, *,
                            load_split: Callable[..., tuple[np.ndarray, np.ndarray, Any]], score: ScoreFn,
                            log: LogFn = run_log) -> dict[str, Any]:
    """Otsu (no training), Frangi (sigmas and threshold tuned on the annotated train and the val patients) and
    the supervised segmenter (:func:`segmenter_baseline`), each scored on the test patients by ``score``."""
    t0 = time.perf_counter()
    soul = Path(soul_h5)
    test_x, test_y, _ = load_split(soul, ("test",))
    labelled_x, labelled_y, _ = load_split(soul, ("train",), config.labelled_train_patients)
    val_x, val_y, _ = load_split(soul, ("val",))
    fit_x, fit_y = np.concatenate([labelled_x, val_x]), np.concatenate([labelled_y, val_y])
    otsu = score(otsu_masks(test_x), test_y)
    t_frangi = time.perf_counter()
    with process_map() as parallel_map:  # Frangi is per image and CPU-bound: one process per CPU
        frangi_model = FrangiBaseline.tune(fit_x, fit_y, seed=config.seed, map_fn=parallel_map)
        frangi_masks = frangi_model.predict(test_x, map_fn=parallel_map)
    frangi_seconds = time.perf_counter() - t_frangi
    frangi = score(frangi_masks, test_y)
    segmenter, segmenter_flipped, segmenter_params = segmenter_baseline(
        (labelled_x, labelled_y), (val_x, val_y), test_x, config, log=log)
    segmenter_scores = score(segmenter, test_y)
    # not a baseline bar: shows whether Pix2Pix's margin comes from its flip averaging or from the model
    segmenter_params["flip_averaged_test"] = score(segmenter_flipped, test_y)
    return {
        "scores": {"otsu": otsu, "frangi": frangi, "segmenter": segmenter_scores},
        "frangi_params": {"sigmas": list(frangi_model.sigmas), "threshold": frangi_model.threshold,
                          "tuned_on": f"{frangi_model.n_tuned} train/val images",
                          "tuned_dice": round(frangi_model.tuned_dice, 4), "seconds": round(frangi_seconds, 2)},
        "segmenter_params": segmenter_params,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def segmenter_baseline(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                       test_images: np.ndarray, config: PipelineConfig, *,
                       log: LogFn = run_log) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The third label baseline: test masks (uint8 0/1) of a plain supervised segmenter, the same net's
    flip-averaged test masks, and how it was made.

    Trained on the same train rows as Pix2Pix for ``config.segmenter_steps`` optimiser steps (seed
    ``config.seed``, the run's device, Pix2Pix's precision), validated ten times on the val patients, which
    choose its weights and threshold; the test patients only receive its labels. Pix2Pix must at least match
    what this minute of ordinary supervised training gives. The flip-averaged masks (threshold chosen again on
    the val patients from averaged probabilities) are for the reader, not the bar: they show how much of
    Pix2Pix's margin its own flip averaging explains."""
    (train_x, train_y), (val_x, val_y) = train, val
    steps = int(config.segmenter_steps)
    fit = fit_segmenter(train_x, train_y, image_size=config.image_size, steps=steps, val_images=val_x,
                        val_labels=val_y, val_every=max(1, steps // 10), seed=config.seed, device=config.device,
                        precision=config.pix2pix.precision)
    masks = (predict_probabilities(fit.net, test_images) > fit.threshold).astype(np.uint8)
    flip_threshold, _ = choose_threshold(predict_probabilities(fit.net, val_x, flip_average=True), val_y)
    flipped = (predict_probabilities(fit.net, test_images, flip_average=True) > flip_threshold).astype(np.uint8)
    log(f"segmenter baseline: {steps} steps in {fit.seconds:.1f} s, best step {fit.best_step} "
        f"(val dice {fit.best_val_dice:.3f}, threshold {fit.threshold:.2f})")
    return masks, flipped, {"arch": "dilated CNN (5 convs, 8 channels), BCE + soft Dice", "steps": steps,
                            "best_step": fit.best_step, "best_val_dice": round(fit.best_val_dice, 4),
                            "threshold": fit.threshold, "flip_averaged_threshold": flip_threshold,
                            "seconds": round(fit.seconds, 2)}
