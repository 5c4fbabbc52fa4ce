"""fedjax_seg: federated medical image segmentation under differential privacy."""

__version__ = "0.1.0"
