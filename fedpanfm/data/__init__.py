"""Cohorts on disk: manifests, image readers, preprocessing, datasets and the synthetic cohort."""
