"""``Gallery.verify``: every check of a gallery's files, reported rather than raised.

What is checked: every kept generation (not only the served one: a fall-back needs the older one too)
against its manifest's checksums, and in a logged gallery its metadata copy (a readable database whose
log position is at least the generation's) and its config copy (equal to gallery.json); the log
(continuity from the oldest kept generation on, so a fall-back would lose nothing; an incomplete last
record is noted, not a problem: it is a write in progress beside a live service, or a crash's torn tail
that the next open drops); the model (per task when gallery.json records fingerprints, else its hash);
every metadata id in every task and no vector without metadata (a read-only open replays the log up to
the metadata's position, so both describe one moment); and every blob the metadata refers to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from index.gallery_files import CONFIG, METADATA_COPY, VerifyReport, parse_config
from index.generations import GenerationError, Manifest
from index.metadata import Metadata, MetadataError
from index.tasks import check_run, recorded_fingerprints
from model.tasks import Fingerprints

if TYPE_CHECKING:
    from index.gallery import Gallery


def check_gallery(
    gallery: Gallery, model_hash: str | None, fingerprints: Fingerprints | None = None
) -> VerifyReport:
    report = VerifyReport()
    generations = gallery.store.generations
    rejected = list(generations.rejected)
    report.problems += [f"refused generation: {reason}" for reason in rejected]
    manifests = generations.manifests()
    logged = gallery.wal is not None
    if not manifests and not logged:
        report.problems.append("no saved generation: the gallery was never saved")
    for generation, manifest in manifests.items():
        if not isinstance(manifest, Manifest):
            if manifest not in rejected:
                report.problems.append(f"generation {generation}: {manifest}")
            continue
        try:
            generations.verify(generation, model_hash=gallery.model_hash, embedding_dim=None)
        except GenerationError as e:
            if str(e) not in rejected:
                report.problems.append(f"generation {generation} (a fall-back): {e}")
            continue
        directory = generations.directory(manifest)
        if logged and METADATA_COPY in manifest.files:
            try:
                copy = Metadata(gallery.root, read_only=True, path=directory / METADATA_COPY)
            except MetadataError as e:
                report.problems.append(f"generation {generation}: metadata copy: {e}")
            else:
                try:
                    applied = copy.applied_position() or 0
                    if copy.quick_check() != "ok" or applied < manifest.log_position:
                        report.problems.append(
                            f"generation {generation}: metadata copy is inconsistent "
                            f"(at record {applied}, the vectors at {manifest.log_position})"
                        )
                finally:
                    copy.close()
        if CONFIG in manifest.files:
            try:
                same = parse_config(gallery.root, (directory / CONFIG).read_bytes()) == gallery.config
            except (OSError, RuntimeError):  # parse_config raises DamagedGalleryError
                same = False
            if not same:
                report.problems.append(f"generation {generation}: its copy of {CONFIG} differs from {CONFIG}")
        report.checked.append(
            f"generation {generation}: manifest and file checksums"
            + (", metadata and config copies" if METADATA_COPY in manifest.files else "")
        )
    scan = gallery.scan
    if scan is not None:
        served = gallery.store.manifest
        at = served.log_position if served else 0
        report.checked.append(
            f"log: records {scan.first}..{scan.last} in {len(scan.segments)} segment(s), {scan.size} bytes; "
            f"{max(0, scan.last - at)} after the served snapshot"
        )
        if scan.tail is not None:
            report.checked.append(
                f"log tail (a write in progress, or dropped on the next open): {scan.tail.describe()}"
            )
        positions = [m.log_position for m in manifests.values() if isinstance(m, Manifest)]
        oldest = min(positions, default=0)
        if scan.segments and scan.first > oldest + 1:
            report.problems.append(
                f"log starts at record {scan.first}: falling back to the generation at record {oldest} "
                f"would miss records {oldest + 1}..{scan.first - 1}"
            )
    check_model_match(report, gallery.config, model_hash, fingerprints)
    known = gallery.metadata.ids()
    for task in gallery.tasks:
        stored = gallery.store.ids(task)
        missing = np.setdiff1d(known, stored)
        extra = np.setdiff1d(stored, known)
        if len(missing):
            report.problems.append(f"task {task!r}: {len(missing)} ids missing, e.g. {missing[:5].tolist()}")
        if len(extra):
            report.problems.append(
                f"task {task!r}: {len(extra)} ids without metadata, e.g. {extra[:5].tolist()}"
            )
    report.checked.append(f"{len(known)} ids in each of {len(gallery.tasks)} tasks")
    with_blobs = [r for r in gallery.metadata.get(known).values() if r.has_blob]
    for record in with_blobs:
        path = gallery.metadata.blob_path(record.content_hash)
        if not path.is_file():
            report.problems.append(f"item {record.id}: blob {path.name} is missing")
    report.checked.append(f"{len(with_blobs)} blobs present")
    return report


def check_model_match(
    report: VerifyReport, config: dict[str, Any], model_hash: str | None, fingerprints: Fingerprints | None
) -> None:
    """Whether a run may serve the gallery whose ``config`` this is, into ``report``: its per-task
    fingerprints when the gallery recorded them (a child run serves its old tasks), else the model hash."""
    built_with = str(config["model_hash"])
    recorded = recorded_fingerprints(config)
    if recorded is not None and fingerprints is not None:
        check = check_run(recorded.shared, recorded.tasks, fingerprints)
        if check.problem is not None:
            report.problems.append(f"model mismatch: {check.problem}")
        else:
            report.checked.append(
                f"task fingerprints: the run embeds {', '.join(check.valid) or 'none'} as indexed"
                + (f"; not indexed: {', '.join(check.missing)}" if check.missing else "")
            )
            if model_hash == built_with:
                report.checked.append("model hash matches the run")
    elif model_hash is not None and model_hash != built_with:
        report.problems.append(
            f"model mismatch: gallery built with {built_with[:12]}…, run has {model_hash[:12]}…"
        )
    else:
        report.checked.append("model hash" + (" matches the run" if model_hash else " recorded"))
