"""Benchmarks: ``python -m bench`` runs every ratio (docs/performance.md); ``python -m bench.<name>``
one measured thing. They print figures; they assert nothing."""
