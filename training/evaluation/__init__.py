"""Downstream evaluation of SpectralGPT encoders (``python -m training.evaluate``).

* :mod:`.readers` - one reader per published on-disk format (EuroSAT-MS, BigEarthNet-S2 v1,
  a generic image/mask GeoTIFF layout, OSCD), bands mapped to the model order by name;
* :mod:`.checkpoints` - exported weights, DeepSpeed run dirs and official ``SpectralGPT.pth``
  files, and the input normalisation that goes with them;
* :mod:`.heads` - the frozen/trainable encoder without masking, linear and kNN heads, the
  light dense decoder, layer-wise LR decay;
* :mod:`.tasks` - the protocols (linear, finetune, knn; segmentation; change detection);
* :mod:`.metrics` - dataset-level metrics in numpy.
"""
