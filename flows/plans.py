"""The plans: which steps the augment and retrain flows run, in order. No Prefect here.

The augment plan is also the table the CLI's single-step commands come from (flows/cli.py), so
building the command line does not start Prefect's logging.
"""
from __future__ import annotations

from tasks.crgan import TRAIN_CRGAN
from tasks.engine import Step
from tasks.export import EXPORT
from tasks.figures import FIGURES
from tasks.fill import FILL
from tasks.image_quality import IMAGE_QUALITY
from tasks.ingest import INGEST
from tasks.label import LABEL
from tasks.pix2pix import TRAIN_PIX2PIX
from tasks.preprocess import PREPROCESS
from tasks.score import SCORE
from tasks.usefulness import USEFULNESS

#: The whole chain when the run trains its own models.
AUGMENT: tuple[Step, ...] = (INGEST, PREPROCESS, TRAIN_PIX2PIX, TRAIN_CRGAN, FILL, LABEL, SCORE, EXPORT, FIGURES,
                             IMAGE_QUALITY, USEFULNESS)
#: What a retrain runs in its work directory before it publishes the two models.
RETRAIN: tuple[Step, ...] = (INGEST, PREPROCESS, TRAIN_PIX2PIX, TRAIN_CRGAN)
