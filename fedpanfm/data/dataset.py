"""Site datasets: a validated manifest turned into preprocessed :class:`Subject` samples.

Construction validates the whole site (manifest rows, then every image file's header and
dimensionality) so bad input fails before training, not in the middle of an epoch. With
``cfg.data.on_bad == "skip"`` a bad subject is left out whole, with one warning line, and named in
``SiteDataset.skipped``. Manifest-structure errors (no manifest, missing column, no rows) always
raise.

Preprocessed arrays are cached on disk as ``.npy`` (never pickle) under ``cfg.data.cache_dir``
(``''`` -> ``<site>/.fedpanfm_cache``), keyed by the file's absolute path, mtime, size, the
manifest spacing and modality and the organ's ``OrganSpec``. Writes go to a temporary file then
``os.replace``, so parallel readers (DataLoader workers, sites sharing a cache folder) only ever
see whole files. A warm cache entry counts as the file's validation: its key already pins the
exact file that was read and preprocessed successfully.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from fedpanfm.config import ExperimentConfig, OrganSpec
from fedpanfm.data.batch import Subject
from fedpanfm.data.intensity import resolve_modality
from fedpanfm.data.manifest import MANIFEST_NAME, CohortError, read_manifest, where
from fedpanfm.data.preprocess import check_dims, preprocess
from fedpanfm.data.readers import file_signature, probe_image, read_image

log = logging.getLogger(__name__)

CACHE_FOLDER = ".fedpanfm_cache"
# Bump when preprocessing changes meaning, so stale cache entries are never read.
# 2: canonical RAS orientation, exact spacing with anti-aliasing, modality-aware intensity.
CACHE_VERSION = 2


@dataclass
class _Image:
    """One organ image of a subject: where it is and how it was listed."""

    organ: str
    row: int
    rel_path: str
    path: Path
    npy_spacing: tuple[float, ...] | None
    modality: str = ""  # the manifest's modality cell
    file_modality: str | None = None  # what the file says (DICOM Modality), once probed


@dataclass
class _Entry:
    subject_id: str
    labels: dict[str, float]
    images: list[_Image]


@dataclass
class SubjectMemory:
    """Preprocessed subjects kept in RAM up to ``budget`` bytes.

    Our policy: the first subjects read stay and none is ever evicted. Training reads every
    subject once per epoch in a new order, so a least-recently-used cache smaller than the site
    would evict each subject before its next use and never hit; keeping the first ones hits on
    ``budget / site size`` of the reads every epoch. Callers must not modify a returned subject.
    """

    budget: int
    used: int = 0
    subjects: dict[str, Subject] = field(default_factory=dict)

    def offer(self, subject: Subject) -> None:
        """Keep ``subject`` if it still fits."""
        size = sum(t.numel() * t.element_size() for t in subject.images.values())
        if self.used + size <= self.budget:
            self.subjects[subject.subject_id] = subject
            self.used += size


class SiteDataset(Dataset[Subject]):
    """The subjects of one site folder, each with the organs it has and its labels.

    Args:
        site_dir: the site folder holding ``manifest.csv``.
        cfg: the experiment config (``cfg.data``: organ specs, ``on_bad``, cache settings).
        subjects: only these subject ids (e.g. one side of :func:`split_subjects`); None = all.
            An id the manifest does not list raises :class:`CohortError`.
    """

    def __init__(self, site_dir: Path, cfg: ExperimentConfig, subjects: list[str] | None = None) -> None:
        self.site_dir = Path(site_dir)
        self.cfg = cfg
        self.organs = cfg.data.organ_set()
        manifest = read_manifest(self.site_dir, self.organs, cfg.data.on_bad)
        self.label_names: list[str] = list(manifest.label_names)
        self.skipped: list[str] = []
        self.skip_reasons: dict[str, str] = {}
        by_subject = manifest.rows_by_subject()
        wanted = list(by_subject) if subjects is None else list(subjects)
        if subjects is not None:
            unknown = [s for s in wanted if s not in by_subject and s not in manifest.bad]
            if unknown:
                raise CohortError(f"{where(self.site_dir)}: subject(s) not in {MANIFEST_NAME}: {', '.join(unknown[:10])}")
        for sid, msg in manifest.bad.items():
            if subjects is None or sid in wanted:
                self._skip(sid, msg)
        self._entries: list[_Entry] = []
        for sid in wanted:
            if sid not in by_subject:
                continue  # skipped for a bad manifest row above
            rows = by_subject[sid]
            images = [
                _Image(r.organ, n, r.path, self.site_dir / r.path, r.spacing, r.modality) for n, r in rows
            ]
            labels = {k: math.nan if v is None else float(v) for k, v in rows[0][1].labels.items()}
            try:
                for im in images:
                    self._validate(im)
            except CohortError as exc:
                if cfg.data.on_bad == "error":
                    raise
                self._skip(sid, str(exc))
                continue
            self._entries.append(_Entry(sid, labels, images))
        # Shared with subsets, so the train and validation loaders of every round read a subject
        # from disk once while it fits in ``data.memory_cache_mib``.
        self._memory = SubjectMemory(int(cfg.data.memory_cache_mib * 2**20))

    # ------------------------------------------------------------------ dataset protocol

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: int) -> Subject:
        e = self._entries[i]
        kept = self._memory.subjects.get(e.subject_id)
        if kept is not None:
            return kept
        images = {im.organ: torch.from_numpy(self._load(im)) for im in e.images}
        subject = Subject(subject_id=e.subject_id, images=images, labels=dict(e.labels), site=self.site)
        self._memory.offer(subject)
        return subject

    # ------------------------------------------------------------------ views

    @property
    def site(self) -> str:
        return self.site_dir.name

    @property
    def subject_ids(self) -> list[str]:
        """The ids of the subjects this dataset yields, in order."""
        return [e.subject_id for e in self._entries]

    def organs_of(self, i: int) -> list[str]:
        """The organs subject ``i`` has, without loading its images."""
        return [im.organ for im in self._entries[i].images]

    def labels_of(self, i: int) -> dict[str, float]:
        """Subject ``i``'s labels (NaN = unknown), without loading its images."""
        return dict(self._entries[i].labels)

    def subset(self, subject_ids: list[str]) -> "SiteDataset":
        """The same site restricted to ``subject_ids`` (already validated; nothing is re-read).

        Args:
            subject_ids: ids among ``self.subject_ids``; others raise :class:`CohortError`.
        """
        index = {e.subject_id: e for e in self._entries}
        unknown = [s for s in subject_ids if s not in index]
        if unknown:
            raise CohortError(f"{where(self.site_dir)}: subject(s) not in this dataset: {', '.join(unknown[:10])}")
        out = copy.copy(self)  # shares _memory: the same subjects, preprocessed the same way
        out._entries = [index[s] for s in subject_ids]
        return out

    def cache_dir(self) -> Path:
        """Where this site's preprocessed arrays are cached."""
        if self.cfg.data.cache_dir:
            return Path(self.cfg.data.cache_dir) / self.site
        return self.site_dir / CACHE_FOLDER

    # ------------------------------------------------------------------ internals

    def _skip(self, subject_id: str, reason: str) -> None:
        log.warning("skipping subject %r: %s", subject_id, reason)
        self.skipped.append(subject_id)
        self.skip_reasons[subject_id] = reason

    def _spec(self, organ: str) -> OrganSpec:
        return self.cfg.data.organs[organ]

    def _cache_path(self, im: _Image) -> Path:
        mtime, size = file_signature(im.path)
        key = json.dumps(
            {
                "v": CACHE_VERSION,
                "path": str(im.path.resolve()),
                "mtime_ns": mtime,
                "size": size,
                "npy_spacing": im.npy_spacing,
                "modality": im.modality,
                "spec": dataclasses.asdict(self._spec(im.organ)),
            },
            sort_keys=True,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        return self.cache_dir() / f"{im.organ}-{digest}.npy"

    def _validate(self, im: _Image) -> None:
        """Raise :class:`CohortError` (naming site, row and file) if the image cannot be used."""
        source = where(self.site_dir, im.row, im.rel_path)
        try:
            if self.cfg.data.cache and self._cache_path(im).is_file():
                return
            spec = self._spec(im.organ)
            info = probe_image(im.path, im.npy_spacing, spec.frame)
            check_dims(info.shape, spec, im.organ, source)
            im.file_modality = info.modality
            resolve_modality(im.modality, info.modality, spec.modality, source)
        except CohortError as exc:
            raise _with_source(exc, source) from None

    def _load(self, im: _Image) -> np.ndarray:
        source = where(self.site_dir, im.row, im.rel_path)
        spec = self._spec(im.organ)
        try:
            cache_path = self._cache_path(im) if self.cfg.data.cache else None
            if cache_path is not None and cache_path.is_file():
                arr = np.load(cache_path, allow_pickle=False)
                if arr.shape != (1, *spec.grid) or arr.dtype != np.float32:
                    raise CohortError(f"cache file {cache_path} holds {arr.dtype} {arr.shape}, expected float32 {(1, *spec.grid)}")
                return arr
            if im.file_modality is None:
                im.file_modality = probe_image(im.path, im.npy_spacing, spec.frame).modality
            modality = resolve_modality(im.modality, im.file_modality, spec.modality, source)
            image, spacing = read_image(im.path, im.npy_spacing, spec.frame)
            arr = preprocess(image, spacing, spec, im.organ, source, modality)
        except CohortError as exc:
            raise _with_source(exc, source) from None
        if cache_path is not None:
            _atomic_save(cache_path, arr)
        return arr


#: Sites this process has opened, most recently used last (see :func:`open_site_dataset`).
_OPENED: "OrderedDict[tuple[str, int, int, str], SiteDataset]" = OrderedDict()


def open_site_dataset(site_dir: Path, cfg: ExperimentConfig, keep: int = 8) -> SiteDataset:
    """``SiteDataset(site_dir, cfg)``, reused while the site's manifest and ``cfg.data`` are unchanged.

    A site answers one Flower message per round and used to re-read and re-validate its
    manifest each time (docs/performance.md, item 4). The key is the folder, the manifest's
    mtime and size and the data config, not the site's identity: one process (a simulation
    actor) may serve many sites, each under its own key. Image files are validated when the
    site is first opened; an image replaced later without touching the manifest is caught by the
    disk cache's key (its mtime and size) when it is loaded.

    Args:
        site_dir: the site folder holding ``manifest.csv``.
        cfg: the experiment config (its ``data`` section is part of the key).
        keep: sites kept open per process, least recently used dropped first (bounds memory
            when one process serves many sites).
    """
    manifest = Path(site_dir) / MANIFEST_NAME
    try:
        stat = manifest.stat()
    except OSError:
        return SiteDataset(site_dir, cfg)  # raises the dataset's own error naming the site
    key = (str(Path(site_dir).resolve()), stat.st_mtime_ns, stat.st_size, repr(cfg.data))
    dataset = _OPENED.pop(key, None)
    if dataset is None:
        dataset = SiteDataset(site_dir, cfg)
    _OPENED[key] = dataset
    while len(_OPENED) > keep:
        _OPENED.popitem(last=False)
    return dataset


def _with_source(exc: CohortError, source: str) -> CohortError:
    """Prefix the site / row / file unless the message already starts with it."""
    msg = str(exc)
    return exc if msg.startswith(source) else CohortError(f"{source}: {msg}")


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    """``np.save`` to a temporary file in the same folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def split_subjects(subject_ids: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train / validation split of a site's subjects.

    The ids are sorted before shuffling, so the split depends only on the set of ids and the
    seed, not on manifest order. ``round(n * val_fraction)`` subjects go to validation, at
    least one when ``val_fraction > 0`` and ``n >= 2``, and never all of them (training needs
    one). Both lists come back sorted.

    Args:
        subject_ids: the site's subject ids (unique).
        val_fraction: share held out for validation, in [0, 1).
        seed: shuffling seed.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction {val_fraction} must be in [0, 1)")
    ids = sorted(subject_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("split_subjects: duplicate subject ids")
    n = len(ids)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, max(0, n - 1))
    shuffled = ids[:]
    random.Random(seed).shuffle(shuffled)
    val = set(shuffled[:n_val])
    return [s for s in ids if s not in val], [s for s in ids if s in val]


def is_site(folder: Path) -> bool:
    """A site folder is a folder holding ``manifest.csv``."""
    return (Path(folder) / MANIFEST_NAME).is_file()


def list_sites(cohort_dir: Path) -> list[Path]:
    """The site folders (sub-folders holding ``manifest.csv``) of a cohort, sorted by name.

    Args:
        cohort_dir: the cohort folder.

    Raises :class:`CohortError` when the folder is missing or holds no site.
    """
    cohort_dir = Path(cohort_dir)
    if not cohort_dir.is_dir():
        raise CohortError(f"cohort folder {cohort_dir} not found")
    sites = sorted((d for d in cohort_dir.iterdir() if d.is_dir() and is_site(d)), key=lambda d: d.name)
    if not sites:
        raise CohortError(f"cohort folder {cohort_dir} holds no site folder (a sub-folder with {MANIFEST_NAME})")
    return sites


def pooled_dataset(cohort_dir: Path, cfg: ExperimentConfig) -> ConcatDataset:
    """All sites of a cohort as one dataset: the centralized (pooled) baseline.

    Args:
        cohort_dir: the cohort folder.
        cfg: the experiment config.
    """
    return ConcatDataset([SiteDataset(d, cfg) for d in list_sites(cohort_dir)])
