"""SpectralGPT pretraining: model, streaming loader, DeepSpeed engine, checkpoints, export."""
