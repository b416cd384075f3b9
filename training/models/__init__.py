"""Model definitions (one readable module per model family)."""

from training.models.spectral_mae import PRESETS, MAEOutput, SpectralMAE, build_model

__all__ = ["PRESETS", "MAEOutput", "SpectralMAE", "build_model"]
