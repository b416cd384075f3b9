"""`python -m pipeline.build_shards`: Sentinel-2 L2A via STAC -> WebDataset shards.

Examples:
    python -m pipeline.build_shards --aoi europe                  # embedded sample catalog, offline
    python -m pipeline.build_shards --aoi ireland --catalog earth-search --start 2024-05-01 --end 2024-06-30
    python -m pipeline.build_shards --bbox -7.5,52.2,-6.5,52.8 --catalog https://my.stac/api --dry-run
    python -m pipeline.build_shards --config configs/pipeline/europe.yaml --output /data/s2

Exit codes: 0 done (or already up to date, or nothing new for a refresh), 2 bad input /
unreachable catalog / unwritable output, 3 no scenes found, 4 another build or refresh holds
the dataset's lock, 5 finished but some scenes could not be read (skipped, listed in the
manifest) or --fail-fast stopped at the first one, 6 no space left on the output's device
(nothing published; run again once there is space), 130 interrupted (run again to resume),
1 unexpected error (a bug: traceback printed).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from pipeline.config import load_config, parse_bbox
from pipeline.errors import PipelineError
from pipeline.redact import install_redaction

log = logging.getLogger("pipeline.build_shards")


def parser(prog: str = "python -m pipeline.build_shards") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Search Sentinel-2 L2A scenes through STAC and write analysis-ready zarr cubes and WebDataset shards.",
    )
    g = p.add_argument_group("what to search")
    g.add_argument("--aoi", help="named AOI in catalogs/aois/ (default: europe)")
    g.add_argument("--bbox", help="W,S,E,N in degrees (overrides --aoi)")
    g.add_argument("--catalog", help="source name in catalogs/sources.yaml, a STAC API URL, or a static catalog.json "
                   "(default: the embedded sample catalog)")
    g.add_argument("--collection", help="collection id, or several separated by commas (default: the source's L2A collection)")
    g.add_argument("--start", help="first date, ISO (inclusive)")
    g.add_argument("--end", help="last date, ISO (inclusive)")
    g.add_argument("--max-cloud", type=float, dest="max_cloud", help="max scene eo:cloud_cover in percent (default 30)")
    g.add_argument("--max-items", type=int, dest="max_items", help="an explicit cap on the items taken from the search (default: none, every page); "
                   "when it cuts the search, the log and the manifest say so")
    o = p.add_argument_group("output")
    o.add_argument("--output", help="dataset directory (default: datasets/<aoi>)")
    o.add_argument("--config", help="YAML file with any of the keys of BuildConfig; flags override it")
    o.add_argument("--dry-run", action="store_true", help="print the scenes found and chips it would make; write nothing")
    o.add_argument("--overwrite", action="store_true", help="replace a finished dataset built with another config "
                   "(built beside it; the old one stays readable until the new manifest replaces it)")
    o.add_argument("--force", action="store_true", default=None,
                   help="write into a non-empty folder that holds no dataset of ours (refused otherwise)")
    o.add_argument("--workers", type=int, help="Dask threads of the local cluster (default: all cores)")
    o.add_argument("--scheduler", help="address of an existing Dask scheduler, e.g. tcp://10.0.0.5:8786 (default: a local "
                   "cluster on 127.0.0.1); its workers need the package and the output location, not this disk")
    o.add_argument("--dashboard", action="store_true", default=None,
                   help="serve the local cluster's Dask dashboard on 127.0.0.1 and log its URL (default: none)")
    o.add_argument("--fail-fast", action="store_true", dest="fail_fast", default=None,
                   help="stop at the first scene that keeps failing (exit 5) instead of skipping it")
    o.add_argument("--wait", action="store_true", help="wait for another build/refresh of the same output instead of exiting 4")
    o.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def glue_negative_values(argv: list[str], flags: tuple[str, ...] = ("--bbox",)) -> list[str]:
    """`--bbox -7.5,52,-6,53` starts with '-', which argparse takes for an option: glue it
    (also for the other coordinate `flags` of a command, e.g. `--point`)."""
    out: list[str] = []
    it = iter(argv)
    for a in it:
        if a in flags:
            nxt = next(it, None)
            out.append(f"{a}={nxt}" if nxt is not None else a)
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None, *, refresh: bool = False, prog: str | None = None) -> int:
    p = parser(prog or ("python -m pipeline.refresh" if refresh else "python -m pipeline.build_shards"))
    if refresh:
        p.description = "Add the scenes a dataset does not have yet as a new dataset version."
    args = p.parse_args(glue_negative_values(list(sys.argv[1:] if argv is None else argv)))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # before anything can log: signed hrefs, SAS tokens and URL credentials are masked in
    # every record from here on, ours and third-party ones, at every verbosity (pipeline.redact)
    install_redaction()
    for noisy in ("urllib3", "rasterio", "distributed", "uvicorn", "httpx", "asyncio", "fsspec", "aiobotocore", "botocore", "s3fs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # distributed installs its own logging configuration (INFO: ~40 lines per build) when it
    # is imported, after this: its level is set through dask's config instead
    import dask

    dask.config.set({"logging.distributed": "info" if args.verbose else "warning"})
    # odc-loader warps intermediate numpy buffers that carry no geotransform; harmless noise per read
    warnings.filterwarnings("ignore", message="Dataset has no geotransform")
    try:
        overrides = {
            "aoi": args.aoi,
            "bbox": parse_bbox(args.bbox) if args.bbox else None,
            "catalog": args.catalog,
            "collection": args.collection,
            "start": args.start,
            "end": args.end,
            "max_cloud": args.max_cloud,
            "max_items": args.max_items,
            "output": args.output,
            "workers": args.workers,
            "scheduler": args.scheduler,
            "dashboard": args.dashboard,
            "force": args.force,
            "fail_fast": args.fail_fast,
        }
        cfg = load_config(args.config, overrides)
        if refresh and args.config is None:
            cfg = _dataset_config(cfg, overrides)
        from pipeline.stages import build  # heavy imports (dask, xarray) after argument checks

        summary = build(cfg, dry_run=args.dry_run, overwrite=args.overwrite, refresh=refresh, wait=args.wait)
    except PipelineError as e:
        log.error("%s", e)
        return e.exit_code
    except KeyboardInterrupt:
        log.error("interrupted: run the same command again to resume")
        return 130
    _print_summary(summary)
    if summary.failed:
        permanent = sum("permanent, not retried" in r for r in summary.failed.values())
        log.error(
            "%d scene(s) could not be read and were skipped (listed under 'failed' in manifest.json); %s",
            len(summary.failed),
            "their inputs are missing or not GeoTIFFs: fix the catalog" if permanent == len(summary.failed)
            else "run pipeline.refresh later to retry them" + (f" ({permanent} of them have missing or non-GeoTIFF "
                                                                 "inputs: fix the catalog)" if permanent else ""),
        )
        return 5
    return 0


def _dataset_config(cfg, overrides):  # type: ignore[no-untyped-def]
    """A refresh without --config continues with the dataset's own settings (from its
    manifest), with the given flags on top, so it never re-tiles by accident."""
    from pipeline.config import build_config, is_catalog_file
    from pipeline.location import Location, is_url

    out = cfg.output_target
    man = Location(out).read_json("manifest.json")
    if not isinstance(man, dict) or not isinstance(man.get("config"), dict):
        return cfg
    raw = {k: v for k, v in man["config"].items() if k not in ("output", "workers", "scheduler", "dashboard")}
    recorded = raw.get("catalog")
    if recorded and not is_url(out) and is_catalog_file(recorded):
        # a local static catalog is recorded relative to the dataset folder (BuildConfig.recorded_catalog)
        raw["catalog"] = os.path.normpath(os.path.join(out, recorded))
    raw.update({k: v for k, v in overrides.items() if v is not None})
    if overrides.get("bbox") is not None:
        raw["aoi"] = None
    raw["output"] = out
    return build_config(raw)


def _print_summary(s) -> None:  # type: ignore[no-untyped-def]
    if s.dry_run:
        log.info("dry run: nothing written")
        return
    if s.nothing_new:
        log.info("nothing new: the dataset is unchanged")
        return
    log.info("scenes: %d found, %d used, %d rejected, %d failed", s.found, s.used - len(s.failed),
             sum(s.rejected.values()), len(s.failed))
    for reason, n in s.rejected.most_common():
        log.info("  rejected %4d  %s", n, reason)
    for sid, reason in sorted(s.failed.items()):
        log.info("  failed        %s: %s", sid, reason)
    for name, per in s.chips.items():
        log.info("dataset %s: %s", name, ", ".join(f"{k} {v}" for k, v in per.items()))
        for reason, n in sorted(s.dropped.get(name, {}).items()):
            log.info("  dropped %4d  %s", n, reason)
    if not s.up_to_date:
        log.info("version %d: wrote %.1f MB in %.1f s -> %s", s.version, s.bytes / 1e6, s.seconds, f"{str(s.output).rstrip('/')}/manifest.json")


if __name__ == "__main__":
    from spectralgpt.cli import exit_now

    exit_now(main())
