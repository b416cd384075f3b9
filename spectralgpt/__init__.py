"""SpectralGPT pipeline and trainer: the one version number and the ``spectralgpt`` command.

The code lives in ``pipeline`` (STAC -> zarr cubes -> WebDataset shards) and ``training``
(pretraining, export, evaluation); this package only names the release and dispatches the
console command (``spectralgpt build|refresh|inspect|pretrain|export|evaluate``).
"""

#: The release, single-sourced: pyproject.toml reads it (``[tool.setuptools.dynamic]``) and
#: manifests, exports and reports record it. CHANGELOG.md lists what each release changed.
__version__ = "0.2.0"
