"""The sha256 sidecar of a checkpoint (``<name>.pt.sha256``), committed before the checkpoint.

A checkpoint and its digest must change as one unit, but they are two files and two
renames. The sidecar is therefore written *first*, and it holds the new digest and
the digest of the checkpoint it is about to replace::

    <sha256 of the new checkpoint>
    previous <sha256 of the checkpoint now at the path>

so a kill at any instant leaves a pair that verifies:

* before the sidecar's rename: the old sidecar and the old checkpoint;
* between the two renames: the new sidecar and the old checkpoint (its digest is the
  ``previous`` line), so training resumes from the epoch before, which on CPU ends with
  the same weights;
* after the checkpoint's rename: the new sidecar and the new checkpoint.

A checkpoint whose digest is on neither line was cut short or altered; a checkpoint
without a sidecar cannot be verified. Both are refused with a one-line
:class:`~storage.errors.CheckpointError`, never trusted. One-line sidecars (older
runs, the registry's copies) read the same way. No torch here: the registry uses it.

A sidecar travels with its checkpoint, so it cannot tell one good checkpoint from another:
a registry version's ``pix2pix.pt`` replaced by another version's, sidecar and all, would
verify. A checkpoint in a registry version directory is therefore also checked against
that version's own manifest (``sha256s.json``, written once when the version was
published), on every load: the digest a run records for a registry model is then the
digest of the bytes it used.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from storage.atomic import write_text_atomic
from storage.errors import CheckpointError
from storage.hashing import file_sha256

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
PREVIOUS = "previous"
#: A registry version's manifest: {"pix2pix.pt": sha256, "crgan.pt": sha256}, beside the checkpoints.
MANIFEST = "sha256s.json"


def sidecar_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def read_digests(path: str | os.PathLike) -> list[str] | None:
    """Digests the sidecar of checkpoint ``path`` vouches for (new first); None when there is no sidecar."""
    sidecar = sidecar_path(path)
    try:
        text = sidecar.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{sidecar}: cannot read the checkpoint's sha256 sidecar ({exc}); "
                              f"delete {Path(path).name} and its sidecar to retrain") from None
    digests = []
    for i, line in enumerate(text.splitlines()):
        words = line.split()
        if not words:
            continue
        digest = words[-1] if (i > 0 and words[0] == PREVIOUS and len(words) == 2) else " ".join(words)
        if not _DIGEST.match(digest):
            raise CheckpointError(f"{sidecar}: not a sha256 sidecar (line {i + 1}); "
                                  f"delete {Path(path).name} and its sidecar to retrain")
        digests.append(digest)
    if not digests:
        raise CheckpointError(f"{sidecar}: empty sha256 sidecar; delete {Path(path).name} and its sidecar to retrain")
    return digests


def write_sidecar(path: str | os.PathLike, digest: str, previous: str | None = None) -> None:
    """Commit the sidecar of ``path`` (atomically): ``digest``, and ``previous`` when given."""
    lines = [digest] + ([f"{PREVIOUS} {previous}"] if previous and previous != digest else [])
    write_text_atomic(sidecar_path(path), "\n".join(lines) + "\n")


def previous_digest(path: str | os.PathLike) -> str | None:
    """The digest of the checkpoint now at ``path`` as its sidecar vouches for it (None if it cannot).

    Only after a kill between the two renames does the sidecar hold two digests; only
    then is the file hashed to learn which of them it is.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        digests = read_digests(path)
    except CheckpointError:
        return None
    if not digests:
        return None
    if len(digests) == 1:
        return digests[0]  # if the file does not match it, it fails verification either way
    actual = file_sha256(path)
    return actual if actual in digests else None


def verified_sha256(path: str | os.PathLike) -> str:
    """sha256 of checkpoint ``path``, which its sidecar must vouch for; else CheckpointError."""
    path = Path(path)
    digests = read_digests(path)
    if digests is None:
        raise CheckpointError(f"{path}: its sha256 sidecar {sidecar_path(path).name} is missing, so the checkpoint "
                              f"cannot be verified; delete {path.name} to retrain (or restore the sidecar)")
    actual = file_sha256(path)
    if actual not in digests:
        raise CheckpointError(f"{path}: sha256 mismatch (interrupted or altered checkpoint); "
                              f"delete it to retrain from the previous one")
    published = manifest_digest(path)
    if published is not None and actual != published:
        raise CheckpointError(f"{path}: not the bytes registry version {path.parent.name} published (sha256 "
                              f"{actual[:12]}, its {MANIFEST} records {published[:12]}); the file was replaced or "
                              f"copied in from elsewhere: restore it or pin another version")
    return actual


def manifest_digest(path: str | os.PathLike) -> str | None:
    """The sha256 the registry version holding checkpoint ``path`` published for it (None outside a version)."""
    path = Path(path)
    manifest = path.parent / MANIFEST
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{manifest}: cannot read the version's manifest ({exc}); "
                              f"pin another version or run retrain again") from None
    digest = recorded.get(path.name) if isinstance(recorded, dict) else None
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise CheckpointError(f"{manifest}: records no sha256 for {path.name}, so it cannot be verified; "
                              f"pin another version or run retrain again")
    return digest
