"""hybridad: unsupervised anomaly segmentation on MVTec AD 2 (INP-Former + CPR)."""

__version__ = "0.1.0"
