"""The dataset contract's identifiers (docs/DATASET_FORMAT.md): one place for the format id.

Written by the pipeline, checked by `pipeline.inspect` and the trainer.
"""

#: What `build_shards` writes. 2: shards are named per unit of work
#: (`<dataset>/<split>-v<N>-<tag>-<unit>-NNNNNN.tar`), the search cap is recorded.
FORMAT_ID = "spectralgpt-shards/2"
#: What the readers accept: version 1 datasets (one running shard index per split) are read
#: the same way, since every reader goes through the manifest's shard list.
READABLE_FORMATS = ("spectralgpt-shards/1", FORMAT_ID)
