"""Every markdown table the project writes (report.md, the dataset card, the Prefect UI artifacts) parses back
with as many cells in each row as in its header, whatever its cells say."""
from __future__ import annotations

import re

import markdown_it

from tasks.config import preset
from test_report import _report

_DELIMITER = re.compile(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?$")


def gfm_cells(row: str) -> list[str]:
    """A table row's cells as GFM splits them: at every pipe that no backslash escapes; outer pipes dropped."""
    row = row.strip()
    cells, current, i, ended_on_pipe = [], "", 0, False
    while i < len(row):
        if row[i] == "\\" and i + 1 < len(row):
            current, i, ended_on_pipe = current + row[i:i + 2], i + 2, False
            continue
        if row[i] == "|":
            cells.append(current)
            current, ended_on_pipe = "", True
        else:
            current, ended_on_pipe = current + row[i], False
        i += 1
    if not ended_on_pipe:
        cells.append(current)
    if row.startswith("|"):
        cells = cells[1:]
    return [c.strip() for c in cells]


def tables(markdown: str) -> list[list[list[str]]]:
    """Each table in ``markdown`` as its rows of cells (header first, the delimiter row left out)."""
    lines, out, i = markdown.splitlines(), [], 0
    while i + 1 < len(lines):
        if "|" in lines[i] and _DELIMITER.match(lines[i + 1].strip()):
            rows, j = [gfm_cells(lines[i])], i + 2
            assert len(gfm_cells(lines[i + 1])) == len(rows[0]), lines[i:i + 2]
            while j < len(lines) and lines[j].strip().startswith("|"):
                rows.append(gfm_cells(lines[j]))
                j += 1
            out.append(rows)
            i = j
        else:
            i += 1
    return out


def assert_every_row_fits_its_header(markdown: str) -> int:
    found = tables(markdown)
    for rows in found:
        for row in rows[1:]:
            assert len(row) == len(rows[0]), f"{len(row)} cells under {len(rows[0])} headers: {row} / {rows[0]}"
    return len(found)


def html_of(markdown: str) -> str:
    return markdown_it.MarkdownIt("commonmark").enable("table").render(markdown)


def _full_report() -> dict:
    """A report with every table report.md and the card draw, and the cells that broke them."""
    from tasks.score import AcceptanceThresholds

    report = _report()
    thresholds = AcceptanceThresholds.from_config(preset("demo")).model_copy(update={
        "max_abs_density_z": 73.32, "min_label_density": 0.05, "max_label_density": 0.4,
        "label_density_source": "30 train annotations of 6 patients (min..max)"})
    scores = {k: {"mean": 0.5, "p10": 0.4, "p90": 0.6} for k in thresholds.rules()}
    report["synthetic"] = {"n": 10, "accepted": 4, "thresholds": thresholds.model_dump(), "scores": scores,
                           "rejected_by": {"density_z": 3, "label_density": 2}, "degenerate_labels": 2,
                           "degenerate_by": {"all-vessel label": 2},
                           "per_stage": {"s1t1": {"real": 5, "synthetic": 0, "accepted": 0},
                                         "s1t2": {"real": 3, "synthetic": 10, "accepted": 4}}}
    nan = float("nan")
    stage = {"n_real": 12, "n_synthetic": 11, "kid_mean": 0.01, "precision": 0.5, "recall": 0.4, "density": 1.0,
             "coverage": 0.3, "reason": None, "baseline": {"kid_mean": 0.02, "precision": 0.1, "recall": 0.1,
                                                           "density": 0.1, "coverage": 0.1}}
    too_few = {**stage, "n_synthetic": 0, "kid_mean": nan,
               "reason": "too few images: 12 real and 0 synthetic, need at least 10 on each side"}
    report["image_quality"] = {"n_synthetic": 11, "synthetic_rows": "accepted", "n_held_out_real": 20,
                               "n_train_real": 30,
                               "extractors": {"random_cnn": {"all": stage, "s1t1": too_few, "s1t2": stage}}}
    report["timings_s"] = {"pix2pix": 0.4, "score": 2.0, "total": 2.4, "cached": ["score"]}
    return report


def test_report_and_card_tables_parse_back_with_the_density_rule_in_one_cell():
    from tasks.rendering.report import render_card, render_report

    report = _full_report()
    text, card = render_report(report, "phantom"), render_card(report, {}, "phantom")
    assert assert_every_row_fits_its_header(text) >= 8 and assert_every_row_fits_its_header(card) >= 2
    assert "<td>|z| &lt;= 73.32</td>" in html_of(text)  # the rule is one cell, shown as written


def test_a_pipe_or_a_line_break_inside_any_cell_stays_in_that_cell():
    from tasks.shared.markdown_tables import markdown_table

    cells = ["|z| <= 3", "a\\|b", "two\nlines", ">= 0.5", "- not a list", "", None, 7]
    table = markdown_table(["what", "value"], [[f"row {i}", c] for i, c in enumerate(cells)])
    (rows,) = tables(table)
    assert len(rows) == len(cells) + 1 and all(len(r) == 2 for r in rows)
    html = html_of(table)
    for shown in ("|z| &lt;= 3", "a\\|b", "two lines", "&gt;= 0.5", "- not a list", "7"):
        assert f"<td>{shown}</td>" in html


def test_ui_table_cells_starting_with_a_comparison_are_not_blockquotes():
    """The Prefect UI renders each string cell of a table artifact as markdown: '>= 0.2' was a blockquote."""
    from tasks.rendering.artifacts import score_rows

    rows = score_rows(_full_report())
    cells = [v for row in rows for v in row.values() if isinstance(v, str)]
    assert any(c.lstrip("\\").startswith(">=") for c in cells)
    for cell in cells:
        html = html_of(cell)
        assert "<blockquote>" not in html and "<ul>" not in html and "<h" not in html, (cell, html)
    rule = next(r for r in rows if r["score"] == "density_z")["accepted when"]
    assert html_of(rule).strip() == "<p>|z| &lt;= 73.32</p>"


def test_per_stage_kid_table_keeps_its_reasons_below_it_so_no_column_runs_off_the_ui():
    """The Prefect UI draws table cells on one line and hides the scrollbar: a sentence in the last column
    pushed it out of view. The table holds numbers; why a stage has no KID is written beneath it."""
    from tasks.rendering.report import render_report

    text = render_report(_full_report(), "phantom")
    (kid,) = [rows for rows in tables(text) if "KID synthetic" in rows[0]]
    assert max(len(cell) for row in kid for cell in row) <= 20, kid
    assert "s1t1: too few images: 12 real and 0 synthetic, need at least 10 on each side" in text


def test_ui_result_and_live_training_tables_parse_back(tmp_path):
    from tasks.rendering.artifacts import result_markdown
    from tasks.shared.progress import TrainingProgress

    report = _full_report()
    report["bars"] = {"pix2pix_beats_baselines": False}
    summary = {"augmented_h5": str(tmp_path / "a|b" / "augmented.h5"), "n_real": 5, "n_synthetic": 10,
               "n_accepted": 4}
    text = result_markdown(tmp_path, report, summary)
    assert assert_every_row_fits_its_header(text) == 1
    assert "a|b/augmented.h5" in html_of(text)
    progress = TrainingProgress("pix2pix")
    for step, score in ((100, 0.4), (200, 0.6)):
        progress({"step": step, "total_steps": 200, "G_L1": 1.0, "val_score": score, "seconds": 1.0})
    assert assert_every_row_fits_its_header(progress.markdown()) == 1


def test_card_counts_table_parses_back():
    from tasks.rendering.report import render_card

    report = _full_report()
    report["synthetic"]["per_stage"]["s1|t3"] = {"real": 1, "synthetic": 2, "accepted": 0}
    assert assert_every_row_fits_its_header(render_card(report, {}, "phantom")) >= 2


# ----------------------------------------------------------------------------- what the data is (the card)


def _ingested(tmp_path, source, name="run"):
    from tasks.ingest import ingest

    run = tmp_path / name
    run.mkdir()
    ingest(source, run, log=lambda *_: None, workers=1)
    return run


def _card_for(run) -> str:
    """The card's text for a run whose input ingest has read, with the attrs export writes from it."""
    from tasks.export import origin_attrs
    from tasks.rendering.report import render_card

    return render_card(_report(), origin_attrs(run), str(run))


def test_a_phantom_runs_card_says_phantom_not_soul(tmp_path):
    from flows.phantom import generate_phantom

    soul = tmp_path / "phantom" / "SOUL"
    generate_phantom(soul, n_patients=2, seed=0, image_size=32, workers=1)
    card = _card_for(_ingested(tmp_path, soul))
    assert "Derived from SOUL" not in card and "CC BY" not in card.split("## Licence")[1].split("##")[0]
    assert "built-in phantom" in card.split("## Licence")[1]


def test_a_soul_tree_keeps_the_soul_licence_and_a_manifest_names_the_users_own(tmp_path):
    """A tree whose clinical sheet a person saved is taken for SOUL (the attribution is owed); a manifest's data
    are the user's, whose licence brvo-augment cannot know."""
    import openpyxl

    from flows.phantom import generate_phantom

    soul = tmp_path / "copy" / "SOUL"
    generate_phantom(soul, n_patients=2, seed=0, image_size=32, workers=1)
    sheet = soul / "Infomation.xlsx"
    openpyxl.load_workbook(sheet).save(sheet)  # saved again by a person's tool: no phantom stamp
    licence = _card_for(_ingested(tmp_path, soul, "soul_run")).split("## Licence")[1]
    assert "Derived from SOUL" in licence and "CC BY 4.0" in licence and "doi:10.1038/s41597-024-03665-7" in licence

    images = sorted((soul / "S1" / "s1t1" / "image").rglob("*.jpg"))
    rows = [f"{p.parent.name},0,{p},{str(p).replace('/image/', '/label/')}" for p in images]
    manifest = tmp_path / "mine.csv"
    manifest.write_text("patient_id,stage,image_path,label_path\n" + "\n".join(rows) + "\n")
    licence = _card_for(_ingested(tmp_path, manifest, "manifest_run")).split("## Licence")[1]
    assert "Derived from SOUL" not in licence and "your own data" in licence and str(manifest) in licence
