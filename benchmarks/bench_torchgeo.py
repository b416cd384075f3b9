"""The issue's reference reader: TorchGeo's RasterDataset + GridGeoSampler over one scene's COGs.

Run with an interpreter that has TorchGeo (it is not a project dependency: TorchGeo needs
torchvision, whose default wheels pull a CUDA torch). `benchmarks.run_all --torchgeo-python
PATH` calls it as a subprocess; by hand:

    /path/to/venv/bin/python benchmarks/bench_torchgeo.py SCENE_DIR --seconds 15

SCENE_DIR holds one COG per band named ``B01.tif`` ... ``B12.tif`` (what `tools.synth`
writes). Prints one JSON line: ``{"chips_per_s": ..., "chips": ..., "seconds": ...}``.

The setup is the one the issue quotes (~115 chips/s on this machine): 128 px chips of all 12
bands at 10 m (RasterDataset resamples the 20/60 m bands on read), GridGeoSampler with a
128 px stride, a torch DataLoader with 2 workers and TorchGeo's `stack_samples` collate.
The script imports nothing from this project, so it runs in a separate environment.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types

# The PyPI torchvision wheels are built against CUDA torch; with the CPU torch their compiled
# ops fail to load and the import stops at registering meta kernels for them (nms, roi_align).
# RasterDataset and the samplers use none of those ops, so skip that registration module.
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

# SpectralGPT band order (catalogs/sentinel2.yaml); B10 is not in L2A.
BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scene_dir")
    ap.add_argument("--seconds", type=float, default=15.0, help="measuring time after warm-up")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--chip", type=int, default=128, help="chip side in 10 m pixels")
    args = ap.parse_args(argv)

    import torchgeo
    from torch.utils.data import DataLoader
    from torchgeo.datasets import RasterDataset, stack_samples
    from torchgeo.samplers import GridGeoSampler

    class Sentinel2Bands(RasterDataset):  # one COG per band, as Earth Search publishes them
        filename_glob = "B02.tif"
        filename_regex = r"^(?P<band>B[0-9][0-9A])\.tif$"
        separate_files = True
        all_bands = BANDS

    ds = Sentinel2Bands(paths=args.scene_dir, res=10.0, bands=BANDS)
    sampler = GridGeoSampler(ds, size=args.chip, stride=args.chip)
    loader = DataLoader(ds, sampler=sampler, batch_size=args.batch, num_workers=args.workers,
                        collate_fn=stack_samples, persistent_workers=args.workers > 0)
    n, t0, warm = 0, 0.0, 2 * max(args.workers, 1)  # worker start-up and file opening
    deadline = None
    while True:
        for batch in loader:
            if warm:
                warm -= 1
                if not warm:
                    t0 = time.perf_counter()
                    deadline = t0 + args.seconds
                continue
            n += batch["image"].shape[0]
            if deadline is not None and time.perf_counter() >= deadline:
                break
        else:
            continue  # the grid ran out first: go round again
        break
    dt = time.perf_counter() - t0
    shape = list(batch["image"].shape[1:])
    print(json.dumps({"chips_per_s": n / dt, "chips": n, "seconds": dt, "chip_shape": shape,
                      "grid_chips": len(sampler), "torchgeo": torchgeo.__version__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
