"""Fault injection, end to end: every case of both hardening passes, tried again as a user or an adversary would.

    .venv/bin/python benchmarks/fault_injection.py [--only PATTERN] [--out DIR] [--keep]

Each case sets up a scratch directory, injects its fault where a user meets it (the CLI
``.venv/bin/brvo-augment`` in a subprocess; the retrain and augment flows through their Python
entry points in a subprocess, as a deployment calls them; the torch Dataset and the registry in
this process), observes what came out (exit code, the last line of stderr, files written outside
the run or registry directory, whether the output is right) and checks the behaviour its row
expects. A row is "held" or "broke" by that check alone; "error" means the harness itself failed
(a bug here, not a verdict) and "skipped" that the case does not run here, with why.

Shared fixtures, each built once when a selected case first needs it and copied (shutil.copytree)
by cases that change things: one 8-patient phantom at 64 px, one finished ``run --preset tiny``,
a registry of two retrains, and the runs the kill cases compare against. The tiny preset's
models are meant to miss their quality bars, which several cases rely on. Everything runs under
umask 022. Writes docs/fault-injection.md (the table, with date, machine, commit and wall time)
and docs/fault-injection.json (the rows), or the same two files under ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tasks.shared.markdown_tables import markdown_table  # noqa: E402
from storage.report_schema import load_report  # noqa: E402

CLI = ROOT / ".venv" / "bin" / "brvo-augment"
PYTHON = ROOT / ".venv" / "bin" / "python"
TINY = ("--preset", "tiny")
NON_ASCII_ID = "Zoë-患者-🙂"
#: pix2pix epochs of the runs the kill cases compare: a checkpoint after each, so a kill can land between them
KILL_EPOCHS = 3
TRACEBACK = "Traceback (most recent call last)"
#: the scratch root, shown as $SCRATCH in observations (set by main)
SCRATCH: list[str] = []


def shown(text: str) -> str:
    """``text`` with the scratch root written as $SCRATCH, so the table reads the same on every run."""
    return text.replace(SCRATCH[0], "$SCRATCH") if SCRATCH else text


# ----------------------------------------------------------------------------------- what a case returns


@dataclass
class Outcome:
    observed: str
    held: bool


@dataclass
class Case:
    id: str  # "<issue>.<item><letter>": 28.1a, 15.7, P.1 (the first pass's kill-and-resume identity)
    title: str
    expected: str
    run: Callable[["Harness", Path], Outcome] | None  # None: skipped, ``expected`` says why


@dataclass
class Row:
    id: str
    case: str
    expected: str
    observed: str
    result: str  # held | broke | skipped | error
    seconds: float


@dataclass
class Proc:
    """A finished subprocess, as a user sees it."""

    args: list[str]
    code: int
    out: str
    err: str
    seconds: float

    @property
    def last_err(self) -> str:
        lines = [line for line in self.err.splitlines() if line.strip()]
        return lines[-1].strip() if lines else ""

    @property
    def last_out(self) -> str:
        lines = [line for line in self.out.splitlines() if line.strip()]
        return lines[-1].strip() if lines else ""

    @property
    def traceback(self) -> bool:
        return TRACEBACK in self.err

    def one_line_error(self, *words: str) -> bool:
        """Exit 2, stderr ending in one ``error:`` line holding ``words``, and no traceback anywhere in it."""
        return (self.code == 2 and self.last_err.startswith("error: ") and not self.traceback
                and all(w in self.last_err for w in words))

    def brief(self, width: int = 220) -> str:
        # a failure's last stderr line; a success's last stdout line when it is the run's outcome line
        tail = shown(self.last_err if self.code else self.last_out if self.last_out.startswith("Completed") else "")
        cut = tail if len(tail) <= width else tail[:width] + "..."
        return (f"exit {self.code}" + (f", `{cut}`" if cut else "")
                + ("; a traceback in stderr" if self.traceback else ""))


# ----------------------------------------------------------------------------------- files and processes


def snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file and link under ``root`` (links not followed), ``skip`` subtrees left out."""
    skip_resolved = {p.resolve() for p in skip}
    out: dict[str, tuple[int, int]] = {}
    if not root.exists():
        return out
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if (here / d).resolve() not in skip_resolved]
        for name in files + [d for d in dirs if (here / d).is_symlink()]:
            st = os.lstat(here / name)
            out[str((here / name).relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


class Watch:
    """What a command wrote under ``root`` outside its ``outputs`` (the run or registry directories)."""

    def __init__(self, root: Path, *outputs: Path) -> None:
        self.root, self.outputs = root, outputs
        self.before = snapshot(root, outputs)

    def writes(self) -> list[str]:
        after = snapshot(self.root, self.outputs)
        return sorted(p for p, stamp in after.items() if self.before.get(p) != stamp)


def outside_note(writes: list[str]) -> str:
    return "nothing written outside the run dir" if not writes else f"WROTE OUTSIDE the run dir: {writes[:5]}"


def tmp_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp-" in p.name)


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_config(folder: Path, data: dict | str, name: str = "config.json") -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def flip_bytes(path: Path, dataset: str, row: int, n: int = 1) -> None:
    """XOR ``n`` stored bytes of ``row`` of ``dataset`` in place (an image row: mid-chunk; a 1-D meta column: the
    row's own value) and put the file's mtime back, as a damaged disk or a careless copy leaves it."""
    import h5py

    st = os.stat(path)
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        if ds.ndim > 1:
            info = ds.id.get_chunk_info_by_coord((row,) + (0,) * (ds.ndim - 1))
            n = min(n, info.size)
            offset = info.byte_offset + (info.size - n) // 2
        else:
            rows = ds.chunks[0]
            info = ds.id.get_chunk_info_by_coord((row // rows * rows,))
            offset = info.byte_offset + (row % rows) * ds.dtype.itemsize
    with open(path, "r+b") as fh:
        fh.seek(offset)
        data = fh.read(n)
        fh.seek(offset)
        fh.write(bytes(b ^ 0x5A for b in data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def arrays_equal(a: Path, b: Path) -> tuple[bool, str]:
    """Images, labels and every meta column of two brvo-paired files equal (NaN equal to NaN)."""
    import numpy as np

    from storage.paired_format import read_arrays, read_meta

    (ia, la), (ib, lb) = read_arrays(a), read_arrays(b)
    ma, mb = read_meta(a), read_meta(b)
    if ia.shape != ib.shape:
        return False, f"{ia.shape[0]} vs {ib.shape[0]} rows"
    differ = [name for name, x, y in (("images", ia, ib), ("labels", la, lb)) if not np.array_equal(x, y)]
    differ += [c for c in sorted(set(ma) | set(mb)) if c not in ma or c not in mb or not ma[c].equals(mb[c])]
    return not differ, (f"{ia.shape[0]} rows: images, labels and {len(ma.columns)} meta columns identical"
                        if not differ else f"differ in {differ}")


def gfm_cells(row: str) -> list[str]:
    """A table row's cells as GFM splits them: at every pipe no backslash escapes (outer pipes dropped)."""
    cells, current, i = [], "", 0
    row = row.strip()
    while i < len(row):
        if row[i] == "\\" and i + 1 < len(row):
            current, i = current + row[i:i + 2], i + 2
            continue
        if row[i] == "|":
            cells.append(current)
            current = ""
        else:
            current += row[i]
        i += 1
    cells.append(current)
    if row.startswith("|"):
        cells = cells[1:]
    if row.endswith("|") and not row.endswith("\\|"):
        cells = cells[:-1]
    return [c.strip() for c in cells]


def broken_table_rows(markdown: str) -> list[str]:
    """Rows of the markdown's tables whose cell count differs from their header's."""
    delimiter = re.compile(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?$")
    lines, bad, i = markdown.splitlines(), [], 0
    while i + 1 < len(lines):
        if "|" in lines[i] and delimiter.match(lines[i + 1].strip()):
            width, j = len(gfm_cells(lines[i])), i + 2
            while j < len(lines) and lines[j].strip().startswith("|"):
                if len(gfm_cells(lines[j])) != width:
                    bad.append(lines[j][:80])
                j += 1
            i = j
        else:
            i += 1
    return bad


def count_tables(markdown: str) -> int:
    return len(re.findall(r"^\|?\s*:?-{3,}", markdown, re.M))


# ----------------------------------------------------------------------------------- the harness


FLOW_DRIVER = r"""
import json, sys
from storage.errors import BrvoError
kind, kwargs = sys.argv[1], json.loads(sys.argv[2])
if kind == "retrain":
    from flows.retrain import retrain as flow
else:
    from flows.augment import augment as flow
try:
    state = flow(**kwargs, return_state=True)
    result = state.result()
except BrvoError as exc:  # what a caller of the flow function catches; Prefect's exit-time lines follow on stderr
    print(json.dumps({"error": str(exc)}), flush=True)
    sys.exit(2)
print(json.dumps({"state": state.name, "message": state.message, "result": result}, default=str))
"""

#: the CLI with os.replace hooked: SIGKILL to itself (kill -9: no handler runs, nothing is cleaned up) at the
#: Nth rename onto a file named argv[1] in a folder named argv[2]
KILL_AT_RENAME = r"""
import os, signal, sys
from pathlib import Path
name, folder, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
real_replace, seen = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    target = Path(dst)
    if target.name == name and target.parent.name == folder:
        seen[0] += 1
        if seen[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
from flows.cli import main
sys.exit(main(sys.argv[4:]))
"""


def flow_refused(proc: Proc, payload: dict | None, *words: str) -> tuple[bool, str]:
    """(the flow raised a one-line BrvoError holding ``words`` and logged no traceback, what was seen)."""
    error = (payload or {}).get("error")
    if error is None:
        return False, proc.brief()
    ok = proc.code == 2 and "\n" not in error and all(w in error for w in words) and not proc.traceback
    return ok, f"BrvoError `{shown(error)[:200]}`" + ("; a traceback in the log" if proc.traceback else "")


class FixtureError(RuntimeError):
    """A shared fixture could not be built: the cases that need it cannot run."""


@dataclass
class FixtureRun:
    path: Path
    proc: Proc
    extra: dict = field(default_factory=dict)


class Harness:
    """The scratch area, the environment every subprocess gets, and the shared fixtures (built lazily)."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.home = scratch / "prefect-home"
        self.fixtures = scratch / "fixtures"
        self.fixtures.mkdir(parents=True, exist_ok=True)
        self.protected: dict[Path, dict] = {}
        self.log_dir = scratch / "logs" / "fixtures"

    # -- processes

    def env(self, home: Path | None = None, **extra: str) -> dict[str, str]:
        """No PREFECT_* or BRVO_* from the caller: each command starts Prefect's temporary server in a
        private PREFECT_HOME, as on a fresh machine."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "BRVO_"))}
        env.update({"PREFECT_HOME": str(home or self.home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": str(ROOT)})
        env.update(extra)
        return env

    def run(self, args: list[str], cwd: Path, timeout: float = 600, **env: str) -> Proc:
        t0 = time.perf_counter()
        try:
            p = subprocess.run(args, cwd=cwd, env=self.env(**env), capture_output=True, text=True, timeout=timeout)
            code, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as exc:
            code, out, err = 124, _text(exc.stdout), _text(exc.stderr) + f"\n(timed out after {timeout} s)"
        proc = Proc([str(a) for a in args], code, out, err, round(time.perf_counter() - t0, 1))
        self.keep_log(proc)
        return proc

    def keep_log(self, proc: Proc) -> None:
        """Every command's output, in SCRATCH/logs/<case>/ (outside the case's folder, which is watched)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        n = len(list(self.log_dir.iterdir()))
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(proc.args[0]).name + "-" + next(
            (a for a in proc.args[1:] if not a.startswith("-") and len(a) < 20), ""))
        (self.log_dir / f"{n:02d}-{name}.log").write_text(
            f"$ {' '.join(proc.args)}\nexit {proc.code} after {proc.seconds} s\n--- stdout\n{proc.out}\n--- stderr\n{proc.err}")

    def cli(self, *args, cwd: Path, **env: str) -> Proc:
        return self.run([str(CLI), *map(str, args)], cwd, **env)

    def flow(self, kind: str, cwd: Path, **kwargs) -> tuple[Proc, dict | None]:
        """The retrain or augment flow through its Python entry point, in a subprocess: (process, its final state
        as JSON, or {"error": the BrvoError's text} when it refused)."""
        proc = self.run([str(PYTHON), "-c", FLOW_DRIVER, kind, json.dumps(kwargs)], cwd)
        last = [line for line in proc.out.splitlines() if line.startswith("{")]
        return proc, (json.loads(last[-1]) if proc.code in (0, 2) and last else None)

    def popen(self, args: list[str], cwd: Path, log: Path, home: Path | None = None) -> subprocess.Popen:
        with open(log, "wb") as fh:
            return subprocess.Popen(args, cwd=cwd, env=self.env(home=home), stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    # -- fixtures

    def _protect(self, path: Path) -> Path:
        self.protected[path] = snapshot(path)
        return path

    def changed_fixtures(self) -> list[str]:
        """Fixtures some command wrote into (they are inputs: no case may change them); re-snapshot them."""
        changed = []
        for path, before in self.protected.items():
            after = snapshot(path)
            changed += [f"{path.name}/{p}" for p, stamp in after.items() if before.get(p) != stamp]
            changed += [f"{path.name}/{p} (removed)" for p in before if p not in after]
            self.protected[path] = after
        return sorted(changed)

    @functools.cached_property
    def phantom(self) -> Path:
        out = self.fixtures / "SOUL"
        proc = self.cli("phantom", out, "--patients", 8, "--seed", 0, "--image-size", 64, cwd=self.fixtures)
        if proc.code != 0:
            raise FixtureError(f"phantom: {proc.brief()}")
        return self._protect(out)

    @functools.cached_property
    def tiny_run(self) -> FixtureRun:
        """`run SOUL RUN --preset tiny`, finished; its stdout and stderr kept for the cases that read them."""
        phantom = self.phantom
        out = self.fixtures / "tiny_run"
        proc = self.cli("run", phantom, out, *TINY, cwd=self.fixtures)
        if proc.code != 0:
            raise FixtureError(f"tiny run: {proc.brief()}")
        return FixtureRun(self._protect(out), proc)

    def copy_run(self, dest: Path) -> Path:
        shutil.copytree(self.tiny_run.path, dest, symlinks=True)
        return dest

    @functools.cached_property
    def registry(self) -> FixtureRun:
        """Two retrains of the tiny preset into one registry: v1 (seed 0), then v2 (seed 1). Both miss their bars,
        so neither is promoted. ``extra``: the first retrain's state and its last_retrain.json."""
        phantom = self.phantom
        reg = self.fixtures / "registry"
        first, state = self.flow("retrain", self.fixtures, soul_dir=str(phantom), registry_dir=str(reg),
                                 preset="tiny")
        if state is None:
            raise FixtureError(f"first retrain: {first.brief()}")
        last_retrain = json.loads((reg / "last_retrain.json").read_text())
        second, state2 = self.flow("retrain", self.fixtures, soul_dir=str(phantom), registry_dir=str(reg),
                                   preset="tiny", config_json='{"seed": 1}')
        if state2 is None:
            raise FixtureError(f"second retrain: {second.brief()}")
        return FixtureRun(self._protect(reg), first, {"state": state, "last_retrain": last_retrain,
                                                      "versions": [state["result"].get("version"),
                                                                   state2["result"].get("version")]})

    def copy_registry(self, dest: Path) -> Path:
        shutil.copytree(self.registry.path, dest, symlinks=True)
        return dest

    @functools.cached_property
    def kill_config(self) -> Path:
        return write_config(self.fixtures, {"pix2pix": {"epochs": KILL_EPOCHS}}, "kill_config.json")

    @functools.cached_property
    def uninterrupted_run(self) -> FixtureRun:
        """The run the kill cases must reproduce: tiny, with a checkpoint after each of KILL_EPOCHS epochs."""
        phantom, config = self.phantom, self.kill_config
        out = self.fixtures / "uninterrupted"
        proc = self.cli("run", phantom, out, *TINY, "--config", config, cwd=self.fixtures)
        if proc.code != 0:
            raise FixtureError(f"uninterrupted run: {proc.brief()}")
        return FixtureRun(self._protect(out), proc)

    @functools.cached_property
    def hostile_run(self) -> FixtureRun:
        """`run manifest.csv RUN --preset tiny` where patient 1's id climbs out of the run dir and patient 2's is
        not ASCII."""
        d = self.scratch / "hostile_ids"
        d.mkdir()
        manifest, hostile = _hostile_manifest(self, d)
        run = d / "run"
        watch = Watch(d, run)
        proc = self.cli("run", manifest, run, *TINY, cwd=d)
        return FixtureRun(run, proc, {"writes": watch.writes(), "outside": d / "outside", "hostile": hostile})

    @functools.cached_property
    def killed_between_renames(self) -> FixtureRun:
        """A run killed -9 between the renames of pix2pix's last.pt sidecar and checkpoint at epoch 2, stale temp
        files planted as killed writers leave them, then the same command again."""
        phantom, config, baseline = self.phantom, self.kill_config, self.uninterrupted_run
        folder = self.scratch / "killed_between_renames"
        folder.mkdir()
        run = folder / "run"
        args = ["run", str(phantom), str(run), *TINY, "--config", str(config)]
        killed = self.run([str(PYTHON), "-c", KILL_AT_RENAME, "last.pt", "pix2pix", "2", *args], folder)
        pix2pix = run / "checkpoints" / "pix2pix"
        left = tmp_files(run)
        planted = [run / ".augmented.h5.tmp-k1ll3d", pix2pix / ".last.pt.sha256.tmp-abc123"]
        for path in planted:
            path.write_bytes(b"left by a writer that was killed")
        rerun = self.cli(*args, cwd=folder)
        return FixtureRun(run, rerun, {"killed": killed, "left_by_kill": left, "baseline": baseline.path,
                                       "planted": [str(p.relative_to(run)) for p in planted]})


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


# ----------------------------------------------------------------------------------- issue 28: silent wrong results


def _clinic_manifest(h: Harness, d: Path, sep: str, header: list[str]) -> tuple[Path, Path]:
    """A copy of the phantom's pairs listed in a manifest with separator ``sep`` and ``header``; (manifest, the
    image the case will change)."""
    import pandas as pd

    clinic = d / "clinic"
    shutil.copytree(h.phantom, clinic / "SOUL")
    rows = pd.read_csv(h.tiny_run.path / "manifest.csv", dtype=str, keep_default_na=False)
    lines = [sep.join(header)]
    for r in rows.itertuples():
        rel = lambda p: str(Path(p).relative_to(h.phantom).as_posix())  # noqa: E731
        lines.append(sep.join((r.patient_id, r.stage_name, f"SOUL/{rel(r.image_path)}", f"SOUL/{rel(r.label_path)}")))
    manifest = clinic / "list.csv"
    manifest.write_text("\n".join(lines) + "\n")
    first = Path(rows.image_path[len(rows) // 2])
    return manifest, clinic / "SOUL" / first.relative_to(h.phantom)


def _manifest_change_seen(h: Harness, d: Path, sep: str, header: list[str]) -> Outcome:
    import numpy as np
    from PIL import Image

    from storage.paired_format import read_arrays

    manifest, image = _clinic_manifest(h, d, sep, header)
    run = d / "run"
    watch = Watch(d, run)
    first = h.cli("prepare", manifest, run, *TINY, cwd=d)
    if first.code != 0:
        return Outcome(f"first prepare: {first.brief()}", False)
    before, _ = read_arrays(run / "soul.h5")
    Image.fromarray(255 - np.asarray(Image.open(image))).save(image, format="JPEG")  # in place, same name
    inputs_changed = [p for p in watch.writes() if p != str(image.relative_to(d))]
    watch = Watch(d, run)
    second = h.cli("prepare", manifest, run, *TINY, cwd=d)
    after, _ = read_arrays(run / "soul.h5")
    changed_rows = int((before.reshape(len(before), -1) != after.reshape(len(after), -1)).any(axis=1).sum()) \
        if before.shape == after.shape else -1
    writes = inputs_changed + watch.writes()
    held = second.code == 0 and changed_rows == 1 and not writes
    return Outcome(f"second prepare {second.brief()}; soul.h5 rows changed: {changed_rows} of {len(after)}; "
                   f"{outside_note(writes)}", held)


def case_semicolon_manifest(h: Harness, d: Path) -> Outcome:
    return _manifest_change_seen(h, d, ";", ["patient_id", "stage", "image_path", "label_path"])


def case_tab_upper_manifest(h: Harness, d: Path) -> Outcome:
    return _manifest_change_seen(h, d, "\t", ["PATIENT_ID", "Stage", "Image_Path", "LABEL_PATH"])


def case_retrain_infinite_lr(h: Harness, d: Path) -> Outcome:
    from storage.registry import ModelRegistry

    reg = d / "registry"
    watch = Watch(d, reg)
    refused, seen = flow_refused(*h.flow("retrain", d, soul_dir=str(h.phantom), registry_dir=str(reg), preset="tiny",
                                         config_json='{"pix2pix": {"lr": Infinity}}'),
                                 "pix2pix.lr must be a finite number, got inf")
    versions = ModelRegistry(reg).versions()
    writes = watch.writes()
    return Outcome(f"{seen}; versions published: {versions or 'none'}; {outside_note(writes)}",
                   refused and not versions and not writes)


def case_retrain_missed_bars_not_promoted(h: Harness, d: Path) -> Outcome:
    from storage.registry import ModelRegistry

    fx = h.registry
    state, result = fx.extra["state"], fx.extra["state"]["result"]
    version = result.get("version")
    registry = ModelRegistry(h.copy_registry(d / "registry"))
    promotion = json.loads((registry.models_dir / version / "promotion.json").read_text())
    missed = [bar for bar, met in (result.get("promotion") or {}).get("bars", {}).items() if not met]
    held = (bool(missed) and result.get("status") == "published" and result.get("promoted") is False
            and promotion.get("promoted") is False and registry.latest_version() is None
            and state["message"].startswith(f"published {version}, not promoted:") and all(b in state["message"]
                                                                                           for b in missed))
    return Outcome(f"state {state['state']!r}, message `{state['message']}`; latest: "
                   f"{registry.latest_version() or 'none'}; promotion.json promoted={promotion.get('promoted')}", held)


def case_augment_with_unpromoted_registry(h: Harness, d: Path) -> Outcome:
    import h5py

    from storage.registry import ModelRegistry

    reg = h.copy_registry(d / "registry")
    before = snapshot(reg)
    run = d / "run"
    watch = Watch(d, run, reg)
    proc = h.cli("run", h.phantom, run, *TINY, cwd=d, BRVO_REGISTRY_DIR=str(reg))
    registry = ModelRegistry(reg)
    published = {registry.resolve(v).sha256s.get("pix2pix.pt") for v in registry.versions()}
    used = ""
    if (run / "augmented.h5").exists():
        with h5py.File(run / "augmented.h5", "r") as f:
            used = str(f.attrs.get("pix2pix_sha256", ""))
    warned = [line for line in proc.err.splitlines() if "WARNING" in line and "not promoted" in line
              and "trains its own" in line]
    writes = watch.writes() + (["registry changed"] if snapshot(reg) != before else [])
    held = proc.code == 0 and bool(warned) and used and used not in published and not writes
    return Outcome(f"{proc.brief(120)}; WARNING 'not promoted ... trains its own': {'yes' if warned else 'no'}; "
                   f"pix2pix used is {'a registry version' if used in published else 'trained in this run'}; "
                   f"{outside_note(writes)}", bool(held))


def case_dataset_pins_its_file(h: Harness, d: Path) -> Outcome:
    from torch.utils.data import DataLoader

    from storage.errors import DatasetFormatError
    from storage.paired_format import read_meta
    from storage.torch_dataset import PairedImageDataset

    path = d / "augmented.h5"
    shutil.copy2(h.tiny_run.path / "augmented.h5", path)
    ds = PairedImageDataset(path, accepted_only=True)
    first = sum(1 for _ in DataLoader(ds, batch_size=None, num_workers=2))
    # a rerun's atomic write: another valid file lands on the path (the same run's soul.h5: other rows)
    shutil.copy2(h.tiny_run.path / "soul.h5", d / "next.h5")
    os.replace(d / "next.h5", path)
    new_meta = read_meta(path)
    mixed = yielded = 0
    error = ""
    try:
        for _, _, meta in DataLoader(ds, batch_size=None, num_workers=2):
            yielded += 1
            row = meta["row"]
            if row >= len(new_meta) or new_meta.iloc[row]["patient_id"] != meta["patient_id"] \
                    or int(new_meta.iloc[row]["stage"]) != int(meta["stage"]):
                mixed += 1
    except DatasetFormatError as exc:
        error = str(exc).strip().splitlines()[-1].split(": ", 1)[-1]
    fresh = PairedImageDataset(path, accepted_only=True)
    fresh_ok = len(fresh) == int((~new_meta["is_synthetic"] | new_meta.get("accepted", True)).sum()) and \
        fresh[0][2]["row"] == 0
    held = (first == len(ds) and yielded == 0 and mixed == 0 and "rewritten since this Dataset indexed it" in error
            and fresh_ok)
    return Outcome(f"epoch 1: {first} items; after the rewrite epoch 2 yielded {yielded} ({mixed} mixed) and raised "
                   f"`{error[-140:]}`; a new Dataset reads the new file: {fresh_ok}", held)


def case_rerun_repairs_damaged_output(h: Harness, d: Path) -> Outcome:
    import numpy as np

    from storage.paired_format import read_meta

    run = h.copy_run(d / "run")
    meta = read_meta(run / "augmented.h5")
    row = int(np.flatnonzero(meta["is_synthetic"].to_numpy())[0])
    flip_bytes(run / "augmented.h5", "images", row)
    found = h.cli("inspect", "--deep", run / "augmented.h5", cwd=d)
    watch = Watch(d, run)
    rerun = h.cli("run", h.phantom, run, cwd=d)
    again = h.cli("inspect", "--deep", run / "augmented.h5", cwd=d)
    same, how = arrays_equal(run / "augmented.h5", h.tiny_run.path / "augmented.h5")
    writes = watch.writes()
    held = (found.one_line_error(f"/images row {row}") and rerun.code == 0 and again.code == 0 and same
            and not writes)
    return Outcome(f"inspect --deep before: {found.brief(120)}; run: exit {rerun.code}; inspect --deep after: exit "
                   f"{again.code}; against the undamaged file: {how}; {outside_note(writes)}", held)


META_FLIPS = ("accepted", "stage", "patient_id", "realism")


def _meta_flip(column: str) -> Callable[[Harness, Path], Outcome]:
    def case(h: Harness, d: Path) -> Outcome:
        import numpy as np

        from storage.errors import DatasetFormatError
        from storage.paired_format import read_meta
        from storage.torch_dataset import PairedImageDataset

        path = d / "augmented.h5"
        shutil.copy2(h.tiny_run.path / "augmented.h5", path)
        meta = read_meta(path)
        rejected = np.flatnonzero(meta["is_synthetic"].to_numpy() & ~meta["accepted"].to_numpy())
        row = int(rejected[0]) if len(rejected) else len(meta) - 1  # a rejected row: 'accepted' would turn True
        flip_bytes(path, f"meta/{column}", row)
        proc = h.cli("inspect", "--deep", path, cwd=d)
        try:
            PairedImageDataset(path, accepted_only=True)
            dataset = "the Dataset opened it"
        except DatasetFormatError as exc:
            dataset = "the Dataset refused it" if f"meta/{column}" in str(exc) else f"the Dataset: {exc}"
        held = proc.one_line_error(f"meta/{column}", "damaged") and dataset == "the Dataset refused it"
        return Outcome(f"row {row}: inspect --deep {proc.brief(160)}; {dataset}", held)

    return case


def case_degenerate_labels_never_accepted(h: Harness, d: Path) -> Outcome:
    import numpy as np

    from storage.paired_format import read_arrays, read_meta

    run = h.tiny_run.path
    report = load_report(run / "report.json")
    meta, (_, labels) = read_meta(run / "soul.h5"), read_arrays(run / "soul.h5")
    train = labels[meta["split"].to_numpy() == "train"].reshape(-1, labels[0].size).mean(axis=1)
    lo, hi = float(train.min()), float(train.max())
    # the card's own loading snippet, run as a user copies it, in the run directory
    card = (run / "DATASET_CARD.md").read_text()
    snippet = re.search(r"## Load it\n```python\n(.*?)```", card, re.S)
    scope: dict = {}
    cwd = os.getcwd()
    try:
        os.chdir(run)
        exec(snippet.group(1) if snippet else "raise SystemExit('no snippet')", scope)  # noqa: S102
    finally:
        os.chdir(cwd)
    kept_meta = scope["meta"][scope["keep"]]
    density = scope["labels"].reshape(len(scope["labels"]), -1).mean(axis=1)
    synthetic = kept_meta["is_synthetic"].to_numpy()
    degenerate_kept = int(((density[synthetic] < lo) | (density[synthetic] > hi) | (density[synthetic] <= 0)
                           | (density[synthetic] >= 1)).sum())
    n_degenerate = report.synthetic.degenerate_labels if report.synthetic else None
    degenerate_by = report.synthetic.degenerate_by if report.synthetic else None
    warned = "labeller failed" in card or "degenerate" in card
    all_meta = read_meta(run / "augmented.h5")
    held = degenerate_kept == 0 and n_degenerate is not None and (n_degenerate == 0 or warned)
    return Outcome(f"{int(all_meta['is_synthetic'].sum())} synthetic rows, {n_degenerate} degenerate labels "
                   f"({degenerate_by}); the card's snippet keeps {int(synthetic.sum())} synthetic, "
                   f"{degenerate_kept} outside the train annotations' density {lo:.3f}..{hi:.3f}; card WARNING: "
                   f"{'yes' if warned else 'no'}", held)


def case_degenerate_inputs_quarantined(h: Harness, d: Path) -> Outcome:
    import numpy as np
    import pandas as pd
    from PIL import Image

    soul = d / "SOUL"
    shutil.copytree(h.phantom, soul)
    rng = np.random.default_rng(0)
    stripes = np.zeros((64, 64), np.uint8)
    stripes[:, ::8] = 255
    bad = {  # file stem -> (image, label, words its reason must hold)
        "1_90001": (rng.integers(20, 220, (1, 1), dtype=np.uint8), np.full((1, 1), 255, np.uint8), "smaller than"),
        "1_90002": (rng.integers(20, 220, (10, 10000), dtype=np.uint8), np.tile(stripes[:10, :8], (1, 1250)),
                    "aspect ratio"),
        "1_90003": (rng.integers(20, 220, (64, 64), dtype=np.uint8), np.full((64, 64), 255, np.uint8),
                    "vessel density 1.000"),
    }
    for stem, (image, label, _) in bad.items():
        for kind, array in (("image", image), ("label", label)):
            path = soul / "S1" / "s1t1" / kind / "1" / f"{stem}.jpg"
            Image.fromarray(array).save(path, quality=100)
    # a valid pair moved under a stage folder SOUL does not have
    moved_image = sorted((soul / "S1" / "s1t2" / "image").rglob("*.jpg"))[0]
    pid = moved_image.parent.name
    for kind in ("image", "label"):
        src = soul / "S1" / "s1t2" / kind / pid / moved_image.name
        dst = soul / "S1" / "s1t3" / kind / pid / moved_image.name
        dst.parent.mkdir(parents=True)
        shutil.move(src, dst)
    run = d / "run"
    watch = Watch(d, run)
    proc = h.cli("ingest", soul, run, cwd=d)
    quarantine = pd.read_csv(run / "quarantine.csv", keep_default_na=False) if proc.code == 0 else pd.DataFrame()
    reasons = dict(zip(quarantine.get("path", []), quarantine.get("reason", [])))
    expected_n = len(pd.read_csv(h.tiny_run.path / "manifest.csv")) - 1
    n = len(pd.read_csv(run / "manifest.csv")) if proc.code == 0 else -1
    found = []
    for stem, (_, _, words) in bad.items():
        found += [f"{stem} {kind}" for kind in ("image", "label")
                  if words in reasons.get(str(soul / "S1" / "s1t1" / kind / "1" / f"{stem}.jpg"), "")]
    moved = [k for k in ("image", "label") if "unknown stage folder s1t3" in
             reasons.get(str(soul / "S1" / "s1t3" / k / pid / moved_image.name), "")]
    writes = watch.writes()
    held = proc.code == 0 and len(found) >= 4 and len(moved) == 2 and n == expected_n and not writes
    # the label of 1x1 and of 10000x10 may be quarantined for its twin's reason; each image must name its own
    held = held and all(f"{stem} image" in found for stem in bad)
    return Outcome(f"{proc.brief(80)}; quarantined with their reasons: {found} and the s1t3 pair "
                   f"({len(moved)} of 2 files); manifest {n} pairs (expected {expected_n}); {outside_note(writes)}",
                   held)


def case_copied_checkpoint_refused(h: Harness, d: Path) -> Outcome:
    v1, v2 = h.registry.extra["versions"]
    reg = h.copy_registry(d / "registry")
    for name in ("pix2pix.pt", "pix2pix.pt.sha256"):
        shutil.copy2(reg / "models" / v1 / name, reg / "models" / v2 / name)
    run = d / "run"
    watch = Watch(d, run, reg)
    refused, seen = flow_refused(*h.flow("augment", d, soul_dir=str(h.phantom), run_dir=str(run), preset="tiny",
                                         registry_dir=str(reg), model_version=v2), v2, "pix2pix.pt", "not the bytes")
    writes = watch.writes()
    held = refused and not (run / "augmented.h5").exists() and not writes
    return Outcome(f"augment pinned to {v2}: {seen}; augmented.h5 written: {(run / 'augmented.h5').exists()}; "
                   f"{outside_note(writes)}", held)


def case_provenance_names_published_files(h: Harness, d: Path) -> Outcome:
    reg = h.registry.path
    version = h.registry.extra["versions"][0]
    metrics = json.loads((reg / "models" / version / "metrics.json").read_text())
    paths = {m: Path(metrics[m]["checkpoint"]["path"]) for m in ("pix2pix", "crgan")}
    inside = all(p.is_file() and p.parent == reg / "models" / version for p in paths.values())
    warnings = h.registry.extra["last_retrain"].get("warnings") or []
    into_work = [w for w in warnings if str(reg / "work") in w]
    work_left = [p.name for p in (reg / "work").iterdir()] if (reg / "work").is_dir() else []
    held = inside and warnings and not into_work and not work_left
    return Outcome(f"metrics.json names {sorted(str(p.relative_to(reg)) for p in paths.values())} "
                   f"(exist: {inside}); {len(warnings)} WARNINGs, {len(into_work)} pointing into REGISTRY/work; "
                   f"REGISTRY/work left: {work_left or 'nothing'}", bool(held))


def case_empty_latest_refused(h: Harness, d: Path) -> Outcome:
    reg = h.copy_registry(d / "registry")
    (reg / "latest").write_text("")
    run = d / "run"
    watch = Watch(d, run, reg)
    proc = h.cli("run", h.phantom, run, *TINY, cwd=d, BRVO_REGISTRY_DIR=str(reg))
    writes = watch.writes()
    ingested = (run / "manifest.csv").exists()
    held = proc.one_line_error("'latest' pointer") and not ingested and not writes
    return Outcome(f"{proc.brief(200)}; ingest ran: {ingested}; {outside_note(writes)}", held)


# ----------------------------------------------------------------------------------- issue 28: crashes and leaks


def case_symlink_loop(h: Harness, d: Path) -> Outcome:
    import pandas as pd

    from storage.paired_format import read_meta

    soul = d / "SOUL"
    shutil.copytree(h.phantom, soul)
    (soul / "S1" / "self").symlink_to("self")  # ln -s self S1/self
    run = d / "run"
    watch = Watch(d, run)
    proc = h.cli("prepare", soul, run, *TINY, cwd=d)
    quarantine = pd.read_csv(run / "quarantine.csv", keep_default_na=False) if proc.code == 0 else pd.DataFrame()
    reason = dict(zip(quarantine.get("path", []), quarantine.get("reason", []))).get(str(soul / "S1" / "self"), "")
    rows = len(read_meta(run / "soul.h5")) if (run / "soul.h5").exists() else -1
    want = len(read_meta(h.tiny_run.path / "soul.h5"))
    writes = watch.writes()
    held = proc.code == 0 and "symlink loop" in reason and rows == want and not writes
    return Outcome(f"{proc.brief(80)}; quarantine: `{reason[:80]}`; soul.h5 {rows} rows (the phantom's {want}); "
                   f"{outside_note(writes)}", held)


def case_temporary_server_dies_with_cli(h: Harness, d: Path) -> Outcome:
    log = d / "cli.log"
    cli = h.popen([str(CLI), "run", str(h.phantom), str(d / "run"), *TINY], d, log)
    server = port = None
    try:
        deadline = time.monotonic() + 180
        while server is None and time.monotonic() < deadline and cli.poll() is None:
            for pid in children(cli.pid):
                args = cmdline(pid)
                if "uvicorn" in args and "--port" in args:
                    candidate = int(args[args.index("--port") + 1])
                    if answers(f"http://127.0.0.1:{candidate}/api/health"):
                        server, port = pid, candidate
            time.sleep(0.3)
        if server is None:
            return Outcome(f"no temporary server seen (CLI exit {cli.poll()}): {log.read_text()[-200:]}", False)
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait(10)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 15 and (alive(server) or answers(f"http://127.0.0.1:{port}/api/health")):
            time.sleep(0.2)
        gone_after = time.monotonic() - t0
        survived = alive(server) or answers(f"http://127.0.0.1:{port}/api/health")
        return Outcome(f"server pid {server} on port {port}: " + (f"still alive {gone_after:.0f} s after the kill"
                       if survived else f"gone {gone_after:.1f} s after the CLI's kill -9, port closed"),
                       not survived)
    finally:
        for pid in (cli.pid, server):  # only what this case started
            if pid is not None and alive(pid):
                os.kill(pid, signal.SIGKILL)


def case_dataset_damaged_chunk(h: Harness, d: Path) -> Outcome:
    from storage.errors import DatasetFormatError
    from storage.torch_dataset import PairedImageDataset

    path = d / "augmented.h5"
    shutil.copy2(h.tiny_run.path / "augmented.h5", path)
    flip_bytes(path, "images", 5)
    ds = PairedImageDataset(path)
    index = int(list(ds.rows).index(5))
    try:
        ds[index]
        return Outcome("row 5 read without an error", False)
    except DatasetFormatError as exc:
        text = str(exc)
    except OSError as exc:
        return Outcome(f"raw {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", False)
    held = "\n" not in text and str(path) in text and "/images row 5" in text and "damaged" in text
    return Outcome(f"DatasetFormatError `{shown(text)[:200]}...`", held)


@contextlib.contextmanager
def immutable(path: Path):
    """``path`` read-only even for root: the immutable flag (chattr +i), undone afterwards."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        raise FixtureError("cannot chattr +i here")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def case_read_only_registry(h: Harness, d: Path) -> Outcome:
    reg = h.copy_registry(d / "registry")
    observed, held = [], True
    with immutable(reg):
        for force in (False, True):  # nothing changed (v2's data and config), and forced: would ingest
            before = snapshot(reg)
            refused, seen = flow_refused(*h.flow("retrain", d, soul_dir=str(h.phantom), registry_dir=str(reg),
                                                 preset="tiny", config_json='{"seed": 1}', force=force),
                                         "is not writable")
            unchanged = snapshot(reg) == before
            held &= refused and unchanged
            observed.append(f"force={force}: {seen[:150]}; registry untouched: {unchanged}")
    return Outcome("; ".join(observed), held)


def _config_refused(h: Harness, d: Path, config: dict | str, words: tuple[str, ...],
                    forbidden: str = "") -> tuple[bool, str]:
    (d / "soul").mkdir(exist_ok=True)  # never read: the config is refused first
    cfg = write_config(d, config, f"config-{len(list(d.glob('config-*')))}.json")
    run = d / f"run-{cfg.stem}"
    proc = h.cli("run", d / "soul", run, *TINY, "--config", cfg, cwd=d)
    ok = (proc.one_line_error("config", *words) and not run.exists()
          and (not forbidden or forbidden not in proc.err))
    return ok, proc.brief(160) + ("" if not run.exists() else "; the run dir was created")


def case_absurd_width(h: Harness, d: Path) -> Outcome:
    ok, seen = _config_refused(h, d, {"pix2pix": {"ngf": 100000}}, ("pix2pix.ngf",))
    return Outcome(seen, ok)


def case_crgan_diverges(h: Harness, d: Path) -> Outcome:
    ok_config, seen_config = _config_refused(h, d, '{"crgan": {"lr_g": Infinity}}',
                                             ("crgan.lr_g must be a finite number, got inf",))
    run = h.copy_run(d / "run")
    shutil.rmtree(run / "checkpoints" / "crgan")  # what the refusal to resume another config's checkpoint says
    cfg = write_config(d, {"crgan": {"lr_g": 1e30, "lr_d": 1e30}}, "diverge.json")
    proc = h.cli("train-crgan", run, *TINY, "--config", cfg, cwd=d)
    no_best = not (run / "checkpoints" / "crgan" / "best.pt").exists()
    held = ok_config and proc.one_line_error("crgan: loss became", "learning rate") and no_best
    return Outcome(f"lr_g Infinity: {seen_config}; lr 1e30: {proc.brief(170)}; best.pt written: {not no_best}", held)


def case_config_infinity(h: Harness, d: Path) -> Outcome:
    ok, seen = _config_refused(h, d, '{"pix2pix": {"lr": Infinity}}',
                               ("pix2pix.lr must be a finite number, got inf",), forbidden="valid number")
    return Outcome(seen, ok)


# ----------------------------------------------------------------------------------- issue 28: what a researcher sees


def case_markdown_tables(h: Harness, d: Path) -> Outcome:
    import h5py
    import numpy as np

    from tasks.rendering.artifacts import result_markdown, score_rows
    from storage.paired_format import read_meta

    run = h.tiny_run.path
    report = load_report(run / "report.json").to_json()  # the renderers read report.json's content
    meta = read_meta(run / "augmented.h5")
    with h5py.File(run / "augmented.h5", "r") as f:
        summary = {"augmented_h5": str(run / "augmented.h5"), "n_real": int(f.attrs["n_real"]),
                   "n_synthetic": int(f.attrs["n_synthetic"]),
                   "n_accepted": int(np.sum(meta["accepted"] & meta["is_synthetic"]))}
    documents = {"report.md": (run / "report.md").read_text(), "DATASET_CARD.md": (run / "DATASET_CARD.md").read_text(),
                 "augment-result": result_markdown(run, report, summary)}
    broken = {name: broken_table_rows(text) for name, text in documents.items()}
    n_tables = {name: count_tables(text) for name, text in documents.items()}
    density_rows = [line for line in documents["report.md"].splitlines() if line.startswith("| density_z")]
    escaped = bool(density_rows) and all("\\|z\\|" in line for line in density_rows)
    quotes = [str(v) for row in score_rows(report) for v in row.values() if isinstance(v, str) and v.startswith(">")]
    held = not any(broken.values()) and escaped and not quotes and all(n_tables.values())
    return Outcome(f"tables parsed {n_tables}; rows split wrongly: {sum(map(len, broken.values()))}; report.md "
                   f"density_z rule escaped (\\|z\\|): {escaped}; UI score cells starting with '>': {len(quotes)}",
                   held)


def case_final_state_named(h: Harness, d: Path) -> Outcome:
    fx = h.tiny_run
    bars = load_report(fx.path / "report.json").bars or {}
    missed = [b for b, met in bars.items() if not met]
    name = "Completed" if not missed else f"Completed: {len(missed)} bar{'s' if len(missed) > 1 else ''} missed"
    finished = [line for line in fx.proc.err.splitlines() if "Finished in state" in line and "Flow run" in line]
    warnings = [line for line in fx.proc.err.splitlines() if "| WARNING |" in line]
    held = (fx.proc.last_out.startswith(f"{name} - ") and bool(finished)
            and f"Finished in state {name}(" in finished[-1] and bool(warnings) and name in warnings[-1])
    return Outcome(f"{len(missed)} of {len(bars)} bars missed; the CLI's last line `{fx.proc.last_out[:90]}...`; the "
                   f"engine: `{finished[-1].split('Finished in state ')[-1][:40] if finished else 'no line'}...`; "
                   f"the last WARNING is the summary: {bool(warnings) and name in warnings[-1]}", held)


def case_retrain_artifact(h: Harness, d: Path) -> Outcome:
    from tasks.rendering.artifacts import retrain_markdown

    result = h.registry.extra["last_retrain"]
    text = retrain_markdown(result)
    missed = [b for b, met in (result.get("promotion") or {}).get("bars", {}).items() if not met]
    baselines = [b for b in ("otsu", "frangi", "segmenter", "nearest", "neighbour_mean") if b in text]
    not_met = [b for b in missed if f"| {b} | **NOT MET** |" in text]
    held = (text.startswith(f"# retrain: published {result.get('version')}, not promoted") and len(baselines) == 5
            and bool(missed) and not_met == missed and not broken_table_rows(text))
    return Outcome(f"title `{text.splitlines()[0][:70]}`; baselines shown: {baselines}; bars NOT MET shown: "
                   f"{len(not_met)} of {len(missed)} missed", held)


def case_card_licence(h: Harness, d: Path) -> Outcome:
    import h5py

    card = (h.tiny_run.path / "DATASET_CARD.md").read_text()
    section = card.split("## Licence and attribution", 1)[-1].split("\n## ", 1)[0]
    with h5py.File(h.tiny_run.path / "augmented.h5", "r") as f:
        origin = json.loads(str(f.attrs.get("data_origin", "{}")))
    held = ("phantom" in section and "Derived from SOUL" not in section and "CC BY" not in section
            and origin.get("kind") == "phantom" and "CC BY" not in str(origin.get("license")))
    return Outcome(f"card: `{section.strip()[:70]}...`; augmented.h5 data_origin kind {origin.get('kind')!r}, "
                   f"license {origin.get('license')!r}", held)


def case_ui_on_another_port(h: Harness, d: Path) -> Outcome:
    readme = (ROOT / "README.md").read_text()
    service = readme.split("## Run as a service", 1)[-1]
    step1 = service.split("### 1.", 1)[-1].split("\n### ", 1)[0]
    script = "\n".join(re.findall(r"```bash\n(.*?)```", step1, re.S))
    port = free_port()
    script = re.sub(r"^PORT=4200\b", f"PORT={port}", script, flags=re.M)  # the one line a user edits
    log = d / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=h.env(home=d / "prefect-home"), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        settings, deadline = None, time.monotonic() + 180
        while settings is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=2) as resp:
                    settings = json.loads(resp.read())
            except OSError:
                time.sleep(0.5)
        if settings is None:
            return Outcome(f"nothing answered on port {port}: {log.read_text()[-160:]}", False)
        want = f"http://127.0.0.1:{port}/api"
        return Outcome(f"server started as the README says on port {port}; the UI calls {settings.get('api_url')}",
                       settings.get("api_url") == want and answers(f"http://127.0.0.1:{port}/"))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


# ----------------------------------------------------------------------------------- issue 15 (the first pass)


def _hostile_manifest(h: Harness, d: Path) -> tuple[Path, str]:
    import pandas as pd

    rows = pd.read_csv(h.tiny_run.path / "manifest.csv", dtype=str, keep_default_na=False)
    hostile = "/.." * 24 + f"{d / 'outside'}/ESCAPED"
    ids = {"1": hostile, "2": NON_ASCII_ID}
    rows["patient_id"] = [ids.get(p, p) for p in rows["patient_id"]]
    manifest = d / "clinic" / "manifest.csv"
    manifest.parent.mkdir()
    rows[["patient_id", "stage", "image_path", "label_path"]].to_csv(manifest, index=False, quoting=csv.QUOTE_ALL)
    return manifest, hostile


def case_path_traversal_id(h: Harness, d: Path) -> Outcome:
    fx = h.hostile_run
    escaped = [str(p) for p in fx.extra["outside"].rglob("*")] if fx.extra["outside"].exists() else []
    figures = sorted((fx.path / "figures" / "timelines").glob("*.png")) if fx.proc.code == 0 else []
    held = fx.proc.code == 0 and not escaped and not fx.extra["writes"] and len(figures) == 8
    return Outcome(f"run on a manifest with patient_id '/..'x24 + '{fx.extra['outside']}/ESCAPED': "
                   f"{fx.proc.brief(60)}; files at the target: {escaped or 'none'}; {len(figures)} timeline figures "
                   f"inside the run dir; {outside_note(fx.extra['writes'])}", held)


def case_non_ascii_id(h: Harness, d: Path) -> Outcome:
    import h5py
    import pandas as pd

    fx = h.hostile_run
    if fx.proc.code != 0:
        return Outcome(f"run: {fx.proc.brief()}", False)
    with h5py.File(fx.path / "augmented.h5", "r") as f:  # the README's snippet
        meta = pd.DataFrame({k: f["meta"][k].asstr()[:] if f["meta"][k].dtype.kind == "S" else f["meta"][k][:]
                             for k in f["meta"]})
    n = int((meta["patient_id"] == NON_ASCII_ID).sum())
    return Outcome(f"{fx.proc.brief(60)}; the README snippet reads {n} rows of patient '{NON_ASCII_ID}'", n > 0)


def case_kill_between_renames(h: Harness, d: Path) -> Outcome:
    fx = h.killed_between_renames
    killed = fx.extra["killed"]
    same, how = arrays_equal(fx.path / "augmented.h5", fx.extra["baseline"] / "augmented.h5")
    resumed = "resuming from" in fx.proc.err
    held = killed.code == -9 and fx.proc.code == 0 and resumed and same
    return Outcome(f"killed (exit {killed.code}) leaving {fx.extra['left_by_kill'] or 'no temp files'}; rerun: "
                   f"{fx.proc.brief(50)}, resumed from a checkpoint: {resumed}; against the uninterrupted run: {how}",
                   held)


def case_kill_during_training(h: Harness, d: Path) -> Outcome:
    phantom, config, baseline = h.phantom, h.kill_config, h.uninterrupted_run
    run = d / "run"
    args = ["run", str(phantom), str(run), *TINY, "--config", str(config)]
    cli = h.popen([str(CLI), *args], d, d / "killed.log")
    last = run / "checkpoints" / "pix2pix" / "last.pt"
    try:
        deadline = time.monotonic() + 300
        while not last.exists() and cli.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(cli.pid, signal.SIGKILL)  # kill -9 of the command (its process group: this case started it)
    except ProcessLookupError:
        pass
    code = cli.wait(30)
    rerun = h.cli(*args, cwd=d)
    same, how = arrays_equal(run / "augmented.h5", baseline.path / "augmented.h5") if rerun.code == 0 else (False, "")
    resumed = "resuming from" in rerun.err
    held = code == -9 and rerun.code == 0 and resumed and same
    return Outcome(f"kill -9 as pix2pix's first checkpoint appeared (exit {code}); rerun {rerun.brief(40)}, resumed: "
                   f"{resumed}; against the uninterrupted run: {how}", held)


def _alter_checkpoint(path: Path, how: str) -> None:
    import torch

    from storage.checkpoints import load_checkpoint, save_checkpoint

    if how == "bytes":  # weights altered, sidecar deleted: a loadable file nothing vouches for
        state = load_checkpoint(path)
        generator = state["modules"]["G"]
        key = next(k for k, v in generator.items() if v.ndim == 4)
        weights = generator[key].numpy().tobytes()
        data = bytearray(path.read_bytes())
        at = bytes(data).find(weights[len(weights) // 2: len(weights) // 2 + 64])
        data[at:at + 64] = bytes(64)
        path.write_bytes(bytes(data))
        path.with_name(path.name + ".sha256").unlink()
    else:  # one tensor's shape changed, meta intact, re-signed with the project's own writer
        state = load_checkpoint(path)
        generator = state["modules"]["G"]
        key = next(k for k, v in generator.items() if v.ndim == 4)
        generator[key] = torch.zeros(tuple(s + 1 for s in generator[key].shape))
        save_checkpoint(path, state)


def case_missing_sidecar(h: Harness, d: Path) -> Outcome:
    from storage.checkpoints import load_checkpoint

    run = h.copy_run(d / "run")
    best = run / "checkpoints" / "pix2pix" / "best.pt"
    _alter_checkpoint(best, "bytes")
    altered = sha256(best)
    watch = Watch(d, run)
    proc = h.cli("run", h.phantom, run, cwd=d)
    writes = watch.writes()
    if proc.code == 0:  # then the altered weights must not have been used: retrained and verified
        try:
            load_checkpoint(best)
            verified = sha256(best) != altered
        except Exception:  # noqa: BLE001 - any refusal means best.pt is not a verified checkpoint
            verified = False
        same, how = arrays_equal(run / "augmented.h5", h.tiny_run.path / "augmented.h5")
        held = verified and same and not writes
        return Outcome(f"{proc.brief(60)}: best.pt rewritten and verified: {verified}; against the untouched run: "
                       f"{how}; {outside_note(writes)}", held)
    held = proc.one_line_error("best.pt") and not writes
    return Outcome(f"{proc.brief(200)}; {outside_note(writes)}", held)


def case_shape_mismatch(h: Harness, d: Path) -> Outcome:
    run = h.copy_run(d / "run")
    for name in ("last.pt", "best.pt"):
        _alter_checkpoint(run / "checkpoints" / "pix2pix" / name, "shape")
    proc = h.cli("train-pix2pix", run, cwd=d)
    held = proc.one_line_error("last.pt", "do not fit")
    return Outcome(proc.brief(220), held)


@contextlib.contextmanager
def small_tmpfs(folder: Path, size_kb: int):
    folder.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise FixtureError(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def du_kb(path: Path) -> int:
    return sum((p.stat().st_blocks * 512) for p in path.rglob("*") if p.is_file() and not p.is_symlink()) // 1024


def _disk_full(h: Harness, d: Path, remove: tuple[str, ...], margin_kb: int, where: str) -> Outcome:
    """A copy of the finished run without ``remove`` on a tmpfs with ``margin_kb`` to spare; `run` must fail in
    one line naming a file, leave nothing partial, and after the tmpfs grows a rerun must finish intact."""
    staging = h.copy_run(d / "staging")
    for name in remove:
        target = staging / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    with small_tmpfs(d / "mnt", du_kb(staging) + 64 + margin_kb) as mnt:
        run = mnt / "run"
        shutil.copytree(staging, run, symlinks=True)
        full = h.cli("run", h.phantom, run, cwd=d)
        left = tmp_files(run)
        named = re.search(r"no space left on device while writing (\S+)", full.last_err)
        subprocess.run(["mount", "-o", "remount,size=256m", str(mnt)], check=True)
        rerun = h.cli("run", h.phantom, run, cwd=d)
        deep = h.cli("inspect", "--deep", run / "augmented.h5", cwd=d)
        same, how = arrays_equal(run / "augmented.h5", h.tiny_run.path / "augmented.h5") if deep.code == 0 \
            else (False, "")
    held = (full.one_line_error("no space left on device while writing") and named is not None
            and not left and rerun.code == 0 and deep.code == 0 and same)
    return Outcome(f"{where}: {full.brief(150)}; temp files left: {left or 'none'}; after the disk grew: rerun exit "
                   f"{rerun.code}, inspect --deep exit {deep.code}, {how}", held)


def case_disk_full_training(h: Harness, d: Path) -> Outcome:
    return _disk_full(h, d, ("checkpoints",), 256, "tmpfs with 256 KB to spare for pix2pix's 3.3 MB checkpoints")


def case_disk_full_export(h: Harness, d: Path) -> Outcome:
    size_kb = (h.tiny_run.path / "augmented.h5").stat().st_size // 1024
    return _disk_full(h, d, ("augmented.h5",), max(size_kb // 4, 16),
                      f"tmpfs with a quarter of augmented.h5's {size_kb} KB to spare")


def case_lock(h: Harness, d: Path) -> Outcome:
    import h5py

    run = d / "run"
    config = write_config(d, {"pix2pix": {"epochs": 4}}, "long.json")
    log = d / "run.log"
    cli = h.popen([str(CLI), "run", str(h.phantom), str(run), *TINY, "--config", str(config)], d, log,
                  home=d / "prefect-home")
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "pix2pix").exists() and cli.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if cli.poll() is not None:
            return Outcome(f"the run ended before training: {log.read_text()[-200:]}", False)
        before = sha256(run / "soul.h5")
        other = write_config(d, {"image_size": 64}, "other.json")
        busy = h.cli("preprocess", run, "--config", other, cwd=d)
        still_training = cli.poll() is None
        untouched = sha256(run / "soul.h5") == before
        code = cli.wait(600)
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
    with h5py.File(run / "soul.h5", "r") as f:
        size = int(f.attrs["image_size"])
    deep = h.cli("inspect", "--deep", run / "augmented.h5", cwd=d)
    held = busy.one_line_error("in use by another run") and still_training and untouched and code == 0 and size == 32 and deep.code == 0
    return Outcome(f"preprocess while the run trained: {busy.brief(150)}; soul.h5 untouched: {untouched}; the run: exit "
                   f"{code}, soul.h5 at {size} px, inspect --deep exit {deep.code}", held)


def _mutations():
    import numpy as np

    def attr(name, value):
        return lambda f: f.attrs.__setitem__(name, value)

    def replace(name, values):
        def mutate(f):
            del f[name]
            f.create_dataset(name, data=values, chunks=True, fletcher32=True)
        return mutate

    def setitem(name, index, value):
        def mutate(f):
            f[name][index] = value
        return mutate

    def n(f):
        return len(f["meta/stage"])

    return [  # (what, mutate(h5 file), words the error must hold, --deep)
        ("a label of 255", setitem("labels", 2, 255), "label", False),
        ("a label of 7", setitem("labels", (3, 0, 0), 7), "label", False),
        ("stage 99", setitem("meta/stage", 1, 99), "stage", False),
        ("stage -1", setitem("meta/stage", 1, -1), "stage", False),
        ("split 'garbage'", setitem("meta/split", 0, b"garbage"), "split", False),
        ("a string score column", lambda f: replace("meta/realism", np.asarray([b"0.5"] * n(f)))(f), "realism",
         False),
        ("format_version 1.7", attr("format_version", 1.7), "format_version", False),
        ("image_size as a string", attr("image_size", "32"), "image_size", False),
        ("a subgroup in /meta", lambda f: f["meta"].create_group("extra"), "extra", False),
        ("a non-UTF-8 patient id", setitem("meta/patient_id", 0, b"\xff\xfe"), "patient_id", False),
        ("4 KB of flipped chunk bytes", None, "row 4", True),
    ]


def case_validate_values(h: Harness, d: Path) -> Outcome:
    import h5py

    misses = []
    mutations = _mutations()
    for i, (what, mutate, words, deep) in enumerate(mutations):
        path = d / f"m{i}.h5"
        shutil.copy2(h.tiny_run.path / "augmented.h5", path)
        if mutate is None:
            flip_bytes(path, "images", 4, n=4096)
        else:
            with h5py.File(path, "r+") as f:
                mutate(f)
        proc = h.cli("inspect", *(["--deep"] if deep else []), path, cwd=d)
        if not (proc.one_line_error(words, str(path)) and proc.err.count("\n") == 1):
            misses.append(f"{what}: {proc.brief(100)}")
    return Outcome(f"{len(mutations) - len(misses)} of {len(mutations)} refused by inspect in one line (exit 2)"
                   + (f"; not: {misses}" if misses else ""), not misses)


CONFIG_RANGES = [  # the values, and the field each refusal must name
    ({"crgan": {"batch_size": -3}}, "crgan.batch_size"), ({"compression": "bogus"}, "compression"),
    ({"device": "tpu"}, "device"), ({"pix2pix": {"epochs": -1}}, "pix2pix.epochs"),
    ({"samples_per_missing": 0}, "samples_per_missing"), ({"samples_per_missing": 1e9}, "samples_per_missing"),
    ({"image_size": 100000}, "image_size"), ({"image_size": 33}, "image_size"), ({"val_fraction": 1.5}, "val_fraction"),
    ({"test_fraction": 1.5}, "test_fraction"),
]


def case_config_ranges(h: Harness, d: Path) -> Outcome:
    misses = []
    for config, name in CONFIG_RANGES:
        ok, seen = _config_refused(h, d, config, (name,))
        if not ok:
            misses.append(f"{json.dumps(config)}: {seen}")
    return Outcome(f"{len(CONFIG_RANGES) - len(misses)} of {len(CONFIG_RANGES)} refused in one line before any work"
                   + (f"; not: {misses}" if misses else ""), not misses)


def case_oversized_file(h: Harness, d: Path) -> Outcome:
    import pandas as pd

    rows = pd.read_csv(h.tiny_run.path / "manifest.csv", dtype=str, keep_default_na=False)
    rows = rows[["patient_id", "stage", "image_path", "label_path"]]
    huge = d / "clinic" / "huge.jpg"
    huge.parent.mkdir()
    with open(huge, "wb") as fh:  # 8 GB that starts like a JPEG; sparse, so it costs no disk
        fh.write(b"\xff\xd8\xff\xe0")
        fh.truncate(8 << 30)
    extra = pd.DataFrame([{"patient_id": "9", "stage": "0", "image_path": str(huge),
                           "label_path": rows.label_path.iloc[0]}])
    manifest = d / "clinic" / "manifest.csv"
    pd.concat([rows, extra]).to_csv(manifest, index=False)
    run = d / "run"
    watch = Watch(d, run)
    proc = h.cli("ingest", manifest, run, cwd=d)
    huge.unlink()
    quarantine = pd.read_csv(run / "quarantine.csv", keep_default_na=False) if proc.code == 0 else pd.DataFrame()
    reason = dict(zip(quarantine.get("path", []), quarantine.get("reason", []))).get(str(huge), "")
    kept = len(pd.read_csv(run / "manifest.csv")) if proc.code == 0 else -1
    writes = [w for w in watch.writes() if w != "clinic/huge.jpg"]
    held = proc.code == 0 and "max_file_mb" in reason and kept == len(rows) and not writes
    return Outcome(f"{proc.brief(60)} in {proc.seconds} s; quarantine: `{reason[:110]}`; {kept} of {len(rows)} valid "
                   f"pairs kept; {outside_note(writes)}", held)


def case_temp_files(h: Harness, d: Path) -> Outcome:
    fx = h.killed_between_renames
    left = tmp_files(fx.path)
    held = fx.proc.code == 0 and not left
    return Outcome(f"the kill left {fx.extra['left_by_kill'] or 'none'}, planted {fx.extra['planted']}; after the "
                   f"rerun (exit {fx.proc.code}): {left or 'no temp files'}", held)


def case_closed_pipe(h: Harness, d: Path) -> Outcome:
    proc = subprocess.Popen([str(CLI), "inspect", str(h.tiny_run.path / "augmented.h5")], cwd=d, env=h.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader went away, as `| head -1` does once it has its line
    err = proc.stderr.read().decode(errors="replace")
    code = proc.wait(120)
    held = code == 141 and TRACEBACK not in err and "BrokenPipeError" not in err
    return Outcome(f"exit {code}; stderr: {err.strip()[:80] or 'empty'}", held)


def case_umask(h: Harness, d: Path) -> Outcome:
    import stat

    run = h.tiny_run.path
    files = ["augmented.h5", "DATASET_CARD.md", "report.json", "manifest.csv", "soul.h5",
             "checkpoints/pix2pix/best.pt", "checkpoints/pix2pix/best.pt.sha256"]
    dirs = ["figures", "checkpoints/pix2pix"]
    modes = {p: oct(stat.S_IMODE((run / p).stat().st_mode)) for p in files + dirs}
    wrong = {p: m for p, m in modes.items() if m != (oct(0o755) if p in dirs else oct(0o644))}
    return Outcome(f"{len(modes) - len(wrong)} of {len(modes)} as the umask says (files 0o644, dirs 0o755)"
                   + (f"; not: {wrong}" if wrong else ""), not wrong)


# ----------------------------------------------------------------------------------- the table


CASES: list[Case] = [
    # issue 28: silent wrong results
    Case("28.1a", "image changed in place, semicolon manifest",
         "`prepare list.csv RUN` twice, one listed image inverted in between: the second prepare rebuilds soul.h5 "
         "(exactly that row changes), exit 0", case_semicolon_manifest),
    Case("28.1b", "image changed in place, tab-separated manifest with an upper-case header",
         "as 28.1a: the change is seen", case_tab_upper_manifest),
    Case("28.2a", "retrain with pix2pix.lr Infinity",
         "retrain flow, config_json `{\"pix2pix\": {\"lr\": Infinity}}`: one-line refusal naming the field, nothing "
         "published", case_retrain_infinite_lr),
    Case("28.2b", "retrain whose models miss their bars",
         "tiny retrain (its models lose to their baselines): published, not promoted; `latest` does not move; the "
         "state message says 'not promoted' and names each missed bar", case_retrain_missed_bars_not_promoted),
    Case("28.2c", "augment with a registry of unpromoted versions",
         "`BRVO_REGISTRY_DIR=REG run`: exit 0, trains its own models, a WARNING names the unpromoted version; the "
         "registry is not written", case_augment_with_unpromoted_registry),
    Case("28.3", "torch Dataset after a rewrite of its file",
         "PairedImageDataset + DataLoader(num_workers=2): after the path is rewritten, epoch 2 yields nothing mixed "
         "and raises 'rewritten since this Dataset indexed it'; a new Dataset reads the new file",
         case_dataset_pins_its_file),
    Case("28.4", "rerun after one flipped byte in augmented.h5 (mtime kept)",
         "`inspect --deep` names the damaged row (exit 2); `run` again rewrites it: exit 0, `inspect --deep` passes "
         "and the arrays equal the undamaged file's", case_rerun_repairs_damaged_output),
    *[Case(f"28.5{'abcd'[i]}", f"one flipped byte in meta/{column}",
           f"`inspect --deep` exits 2 in one line naming meta/{column} as damaged; the Dataset refuses the file",
           _meta_flip(column)) for i, column in enumerate(META_FLIPS)],
    Case("28.6", "degenerate synthetic labels (the tiny run's failed Pix2Pix)",
         "no accepted synthetic row has a label outside the train annotations' density range (empty or all-vessel "
         "included); the card's own loading snippet keeps none; the card warns", case_degenerate_labels_never_accepted),
    Case("28.7", "degenerate inputs: 1x1 px, 10000x10 px, all-255 label, a pair under S1/s1t3",
         "`ingest`: exit 0; each bad file in quarantine.csv with its reason (size, aspect ratio, vessel density, "
         "unknown stage folder); every other pair in manifest.csv", case_degenerate_inputs_quarantined),
    Case("28.8a", "a checkpoint copied from another registry version, sidecar and all",
         "augment pinned to that version: one-line refusal naming the version and pix2pix.pt ('not the bytes'), "
         "nothing exported", case_copied_checkpoint_refused),
    Case("28.8b", "provenance after a retrain deletes its work directory",
         "metrics.json names the version's own checkpoint files; no WARNING points into REGISTRY/work; nothing left "
         "there", case_provenance_names_published_files),
    Case("28.8c", "empty `latest` with versions present",
         "`BRVO_REGISTRY_DIR=REG run`: one-line error about the 'latest' pointer, exit 2, before ingest",
         case_empty_latest_refused),
    # issue 28: crashes and leaks
    Case("28.9", "symlink loop in the SOUL tree (`ln -s self S1/self`)",
         "`prepare`: exit 0, the link in quarantine.csv as a symlink loop, soul.h5 holds every pair",
         case_symlink_loop),
    Case("28.10", "kill -9 of the CLI during `run`",
         "its temporary Prefect server is gone within 15 s and its port closed", case_temporary_server_dies_with_cli),
    Case("28.11a", "the Dataset on a damaged image chunk",
         "one-line DatasetFormatError naming the file and the row, not a raw OSError", case_dataset_damaged_chunk),
    Case("28.11b", "retrain on a read-only registry (chattr +i)",
         "nothing changed and forced alike: one line 'is not writable' from preflight, registry untouched",
         case_read_only_registry),
    Case("28.11c", "pix2pix.ngf = 100000",
         "`run --config`: one-line config refusal naming pix2pix.ngf, exit 2, no run dir", case_absurd_width),
    Case("28.11d", "CRGAN at lr Infinity, and at a diverging lr (1e30)",
         "Infinity: one-line config refusal; 1e30: `train-crgan` ends in one line 'crgan: loss became ... learning "
         "rate', exit 2, no best.pt", case_crgan_diverges),
    Case("28.11e", "`--config` with Infinity",
         "one line 'pix2pix.lr must be a finite number, got inf' (not 'valid number'), exit 2, no run dir",
         case_config_infinity),
    # issue 28: what a researcher sees
    Case("28.12", "markdown tables of report.md, the card and the UI result",
         "every table row has its header's cell count; report.md's density_z rule escapes '|z|'; no UI score cell "
         "starts with '>' (the KID table's cut-off column is visual: tests/test_report_tables.py)",
         case_markdown_tables),
    Case("28.13", "a tiny run that misses bars, in the runs list and the terminal",
         "the final state is named 'Completed: N bars missed' (engine log and the CLI's last line); the last WARNING "
         "is that summary (the UI list and `--watch` need a served deployment: tests/test_service_ux.py)",
         case_final_state_named),
    Case("28.14", "the retrain-result artifact of a retrain that missed bars",
         "title 'published ..., not promoted'; each model beside its baselines; each missed bar **NOT MET**",
         case_retrain_artifact),
    Case("28.15", "the card's licence on a phantom run",
         "names the built-in phantom, not 'Derived from SOUL' or CC BY; augmented.h5 records the phantom as origin",
         case_card_licence),
    Case("28.16a", "README wording (install, .venv/bin, three terminals, 4 bars)",
         "not run here: README text is checked by tests/test_readme.py", None),
    Case("28.16b", "the README's server step on a non-default port",
         "step 1 verbatim with PORT changed: the UI's ui-settings name that port's API, the UI answers",
         case_ui_on_another_port),
    # issue 15: the first pass
    Case("15.1", "patient id `/..`x24 + an absolute path",
         "`run manifest.csv RUN`: exit 0, nothing at the target, every timeline figure inside the run dir",
         case_path_traversal_id),
    Case("15.2", f"non-ASCII patient id `{NON_ASCII_ID}`",
         "the same run: exit 0; the README's read snippet returns the id intact", case_non_ascii_id),
    Case("15.3", "kill -9 between the sidecar's and the checkpoint's rename (pix2pix, epoch 2 of 3)",
         "rerun: exit 0, resumes from a checkpoint, augmented.h5 identical to an uninterrupted run's",
         case_kill_between_renames),
    Case("15.4a", "best.pt altered and its sidecar deleted",
         "`run`: the altered weights are never used: a one-line refusal naming best.pt, or best.pt retrained "
         "(verified) and augmented.h5 identical to the untouched run's", case_missing_sidecar),
    Case("15.4b", "a tensor's shape changed in last.pt and best.pt, re-signed",
         "`train-pix2pix`: one line naming last.pt ('do not fit'), exit 2, no traceback", case_shape_mismatch),
    Case("15.5a", "disk full while training (small tmpfs)",
         "one line 'no space left on device while writing PATH', exit 2, no temp file left; once the disk grows, "
         "a rerun ends with an intact augmented.h5 identical to the tiny run's", case_disk_full_training),
    Case("15.5b", "disk full while exporting (small tmpfs)", "as 15.5a", case_disk_full_export),
    Case("15.6", "`preprocess --config other.json` while a run trains in the directory",
         "refused in one line (the lock), exit 2, no traceback; soul.h5 untouched; the run finishes (exit 0)",
         case_lock),
    Case("15.7", "inspect on value faults: labels 255/7, stage 99/-1, split, string scores, format_version 1.7, "
         "string image_size, /meta subgroup, non-UTF-8 id, 4 KB flipped (--deep)",
         "each: exit 2, exactly one stderr line naming the fault, no traceback", case_validate_values),
    Case("15.8", "config ranges: batch_size -3, compression, device tpu, epochs -1, samples 0 / 1e9, image_size "
         "100000 / 33, fractions 1.5", "each: `run --config` refuses in one line naming the field, before any work",
         case_config_ranges),
    Case("15.9", "an 8 GB file named in a manifest",
         "`ingest`: exit 0, the file quarantined unread (reason names max_file_mb), every other pair kept",
         case_oversized_file),
    Case("15.10", "temp files of killed writers",
         "after the 15.3 rerun, no `.tmp-` file in the run dir (the kill's and planted `.augmented.h5.tmp-*`, "
         "`.last.pt.sha256.tmp-*`)", case_temp_files),
    Case("15.11", "`inspect FILE` into a closed pipe",
         "exit 141, no BrokenPipeError traceback (lock and checkpoint refusals: no traceback, see 15.4b, 15.6)",
         case_closed_pipe),
    Case("15.12", "output modes under umask 022",
         "the tiny run's files 0o644 and directories 0o755", case_umask),
    Case("P.1", "kill -9 during pix2pix training, then the same command",
         "rerun: exit 0, resumes, augmented.h5 identical to an uninterrupted run's (images, labels, meta)",
         case_kill_during_training),
]


def run_case(h: Harness, case: Case) -> Row:
    t0 = time.perf_counter()
    if case.run is None:
        return Row(case.id, case.title, case.expected, case.expected.split(": ", 1)[-1], "skipped", 0.0)
    d = h.scratch / "cases" / re.sub(r"[^A-Za-z0-9_.-]", "_", case.id)
    d.mkdir(parents=True)
    h.log_dir = h.scratch / "logs" / d.name
    try:
        outcome = case.run(h, d)
        changed = h.changed_fixtures()
        if changed:
            outcome = Outcome(outcome.observed + f"; WROTE INTO ITS INPUTS: {changed[:5]}", False)
        result = "held" if outcome.held else "broke"
        observed = shown(outcome.observed)
    except Exception as exc:  # noqa: BLE001 - a harness failure is reported as such, never as a verdict
        traceback.print_exc()
        result, observed = "error", f"the harness failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return Row(case.id, case.title, case.expected, observed, result, round(time.perf_counter() - t0, 1))


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    return f"{os.cpu_count()} cores (nproc {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()}), {cpu}"


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "flows", "tasks", "storage", "brvo_models"],
                           cwd=ROOT).returncode != 0
    return head.strip() + (" (with uncommitted changes to the product code)" if dirty else "")


def render(rows: list[Row], started: str, wall_s: float, only: str | None, code: str = "", cpu_s: float = 0.0) -> str:
    counts = {r: sum(row.result == r for row in rows) for r in ("held", "broke", "skipped", "error")}
    lines = [
        "# Fault injection: both hardening passes, end to end",
        "",
        "Every case of the first hardening pass (issue 15) and of the second (issue 28), injected as a user or an "
        "adversary would and checked mechanically by `benchmarks/fault_injection.py` (a row is held or broke by its "
        "check, never by hand). Regenerate: `.venv/bin/python benchmarks/fault_injection.py` (`--only PATTERN` runs "
        "a subset; the wall time below is what the whole takes).",
        "",
        f"- date: {started}",
        f"- machine: {machine()}",
        f"- code: commit {code or commit()}",
        f"- wall time: {wall_s / 60:.1f} min, CPU time {cpu_s / 60:.1f} min (this script and every command it ran)"
        + (f"; only the cases matching `{only}`" if only else ""),
        f"- result: {counts['held']} held, {counts['broke']} broke, {counts['skipped']} skipped, "
        f"{counts['error']} harness errors",
        "",
        "Fixtures: one 8-patient phantom at 64 px and one finished `run --preset tiny` (its models miss their bars "
        "on purpose, which 28.2, 28.6, 28.13 and 28.14 rely on), a registry of two tiny retrains, and for the kill "
        "cases a tiny run with 3 Pix2Pix epochs. Commands run as `.venv/bin/brvo-augment` subprocesses with a "
        "private PREFECT_HOME and no PREFECT_API_URL; retrain and augment-with-a-pinned-version through their flow "
        "functions in a subprocess; the Dataset, the registry files and the artifacts' markdown in-process. "
        "Everything under umask 022. A one-line error is the literal last line of stderr, `error: ...`, after "
        "anything Prefect logs at exit. `$SCRATCH` is the run's scratch directory; each command's full output is "
        "kept in `$SCRATCH/logs/<case>/` with `--keep`.",
        "",
        markdown_table(["case", "expected", "observed", "result"],
                       [[f"{r.id} {r.case}", r.expected, r.observed,
                         f"**{r.result}**" if r.result != "held" else r.result] for r in rows]),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, metavar="PATTERN",
                        help="run the cases whose id or title matches this regular expression (case-insensitive)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs",
                        help="folder for fault-injection.md and fault-injection.json (default docs/)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (its path is printed)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    selected = [c for c in CASES if args.only is None or re.search(args.only, f"{c.id} {c.title}", re.I)]
    if args.list:
        for case in selected:
            print(f"{case.id:7} {case.title}")
        return 0
    if not selected:
        print(f"error: no case matches {args.only!r}", file=sys.stderr)
        return 2
    os.umask(0o022)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    code_at_start = commit()
    t0 = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="brvo-fault-injection-"))
    harness = Harness(scratch)
    SCRATCH[:] = [str(scratch)]
    rows = []
    try:
        for case in selected:
            print(f"[{time.perf_counter() - t0:6.0f} s] {case.id} {case.title} ...", flush=True)
            row = run_case(harness, case)
            print(f"[{time.perf_counter() - t0:6.0f} s] {case.id}: {row.result.upper()} ({row.seconds} s): "
                  f"{row.observed}", flush=True)
            rows.append(row)
    finally:
        if args.keep:
            print(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    wall = time.perf_counter() - t0
    times = os.times()
    cpu = times.user + times.system + times.children_user + times.children_system
    code = commit()
    if code != code_at_start:  # other work landed while this ran: say so, the rows may straddle both
        code = f"{code_at_start} at the start, {code} at the end"
    text = render(rows, started, wall, args.only, code, cpu)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fault-injection.md").write_text(text)
    (args.out / "fault-injection.json").write_text(json.dumps(
        {"date": started, "machine": machine(), "commit": code, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
         "only": args.only,
         "rows": [asdict(r) for r in rows]}, indent=1, ensure_ascii=False) + "\n")
    print(text)
    return 0 if all(r.result in ("held", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
