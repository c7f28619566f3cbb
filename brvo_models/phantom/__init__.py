"""The built-in SOUL phantom: a procedural generative model of OCTA (superficial plexus) follow-ups.

Why: the demo and the tests need data shaped like SOUL (Xue et al. 2024) without
downloading it, and the robustness checks need data *unlike* it (issue 11): other
patient counts, scans per visit, attendance, vessel density and width, contrast,
noise and non-perfusion size. :class:`PhantomConfig` holds those knobs; its defaults
are the demo phantom, byte for byte.

Modules, one job each:

- ``config``: the knobs (:class:`PhantomConfig`), their ranges, and one-line errors.
- ``soul_layout``: SOUL's folder names and Table 3, which the phantom imitates.
- ``visit_plan``: who attends which stage, scans per visit, exam ids (no images).
- ``vessels``: the vessel trees as line segments.
- ``anatomy``: a patient's parameters and anatomy, and each stage's rendering.
- ``acquisition``: one repeat scan of a stage (shift, speckle, motion lines).
- ``clinical_sheet``: the ``Infomation.xlsx`` sheets, written deterministically.
- ``soul_writer``: the SOUL directory, written atomically.
- ``figure``: one patient's six-stage timeline as a PNG.

No Prefect here: ``flows/phantom.py`` is the pipeline step around :func:`write_phantom`.
"""
from brvo_models.phantom.config import PhantomConfig, load_phantom_config, phantom_config
from brvo_models.phantom.soul_writer import PhantomSummary, write_phantom

__all__ = ["PhantomConfig", "PhantomSummary", "load_phantom_config", "phantom_config", "write_phantom"]
