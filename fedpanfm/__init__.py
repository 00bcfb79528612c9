"""fedpanfm: federated pre-training of a pan-organ imaging foundation model."""

__version__ = "0.1.0"
