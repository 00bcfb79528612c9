"""The server's pictures of each round for TensorBoard (``fedpanfm/tb_figures.py`` draws them).

Per round, on the server's sub-run: ``organs/saliency_and_mask_rate`` (bars per organ),
``experts/usage`` (layer x expert heatmap) and, when the server holds a labelled cohort (the
probe's), ``masks/student_view``: a few of its subjects' organ mid-slices with the organs SGM
would mask under the round's global saliency framed, and their masked patches shaded. Per
site: ``update/norm_per_tensor``, the histogram of its update's per-tensor L2 norms.

Our choices: the student view is drawn with the sites' own masker (:class:`OrganMasker`,
global weight 1, seeded by the round), so it shows the policy, not one site's actual draw; and a
picture that fails to render is logged and skipped: pictures never stop a federation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np
import torch

from fedpanfm import tb_figures
from fedpanfm.config import ExperimentConfig
from fedpanfm.data.batch import SubjectBatch
from fedpanfm.sgm import OrganMasker
from fedpanfm.tb import RunLogger

log = logging.getLogger(__name__)

#: Subjects drawn in the student-view picture.
SUBJECTS = 3


class RoundPictures:
    """Draws a round's pictures into the server's and the sites' sub-runs.

    Args:
        cfg: the experiment config (organs, masking policy, seed).
        server: the server's sub-run.
        cohort: returns the labelled cohort's collated batches (None: no student-view picture).
    """

    def __init__(self, cfg: ExperimentConfig, server: RunLogger,
                 cohort: Callable[[], list[SubjectBatch]] | None = None) -> None:
        self.cfg = cfg
        self.server = server
        self.organs = tuple(cfg.data.organ_set().names)
        self._cohort = cohort

    def draw(self, server_round: int, metrics: Mapping[str, float], saliency: torch.Tensor | None) -> None:
        """Render and write the round's server pictures (call it on the TensorBoard thread)."""
        title = f"round {server_round}"
        jobs: list[tuple[str, Callable[[], object]]] = [
            ("organs/saliency_and_mask_rate", lambda: tb_figures.organ_bars(
                {o: metrics[f"saliency/{o}"] for o in self.organs if f"saliency/{o}" in metrics},
                {o: metrics[f"train/mask_rate/{o}"] for o in self.organs if f"train/mask_rate/{o}" in metrics},
                title)),
        ]
        if any(k.startswith("expert_usage/") for k in metrics):
            jobs.append(("experts/usage", lambda: tb_figures.expert_heatmap(
                tb_figures.expert_usage_matrix(metrics), title)))
        if self._cohort is not None and saliency is not None and saliency.numel() == len(self.organs):
            jobs.append(("masks/student_view", lambda: self.student_view(server_round, saliency)))
        for tag, render in jobs:
            try:
                self.server.image(tag, render(), server_round)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - a picture never stops the run
                log.error("TensorBoard picture %s of round %d failed: %s: %s", tag, server_round, type(exc).__name__, exc)

    def student_view(self, server_round: int, saliency: torch.Tensor):  # noqa: ANN201 - an image array
        """The first :data:`SUBJECTS` subjects of the cohort as the student would see them."""
        assert self._cohort is not None
        batch = self._cohort()[0]
        masker = OrganMasker(self.cfg.data.organ_set(), self.cfg.train.masking)
        masker.set_global(saliency.float(), weight=1.0)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + server_round)
        organ_mask = masker.sample(batch.present, generator=g)
        specs = self.cfg.data.organs
        patches = masker.sample_patch_mask(batch, organ_mask, {o: specs[o].num_patches for o in batch.index}, g)
        rows = []
        for b in range(min(SUBJECTS, batch.size)):
            slices: dict[str, np.ndarray] = {}
            masks: dict[str, np.ndarray | None] = {}  # None: the whole organ is masked
            for organ, index in batch.index.items():
                hit = (index == b).nonzero().flatten()
                if hit.numel() == 0:
                    continue
                i = int(hit[0])
                slices[organ] = tb_figures.mid_slice(batch.images[organ][i])
                if bool(organ_mask[b, self.organs.index(organ)]):
                    masks[organ] = None
                else:
                    masks[organ] = tb_figures.patch_grid(patches[organ][i], specs[organ].grid, specs[organ].patch)
            rows.append((batch.subject_ids[b], slices, masks))
        return tb_figures.masked_subjects(rows, [o for o in self.organs if o in batch.index],
                                          f"round {server_round}: student view under the global saliency")

    @staticmethod
    def update_norms(site: RunLogger, norms: list[float], server_round: int) -> None:
        """A site's per-tensor update norms as a histogram (nothing for an empty update)."""
        if norms:
            site.histogram("update/norm_per_tensor", norms, server_round)


__all__ = ["RoundPictures", "SUBJECTS"]
