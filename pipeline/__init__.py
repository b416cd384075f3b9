"""Sentinel-2 L2A STAC -> analysis-ready zarr -> WebDataset shards (see ARCHITECTURE.md)."""

__version__ = "0.1.0"
