"""WebDataset shard writing with size caps and atomic publication; stats.

A shard is written to a temporary file (beside the target for a local dataset, in the
worker's scratch folder for a remote one), fsynced, then renamed or uploaded in one piece
(`pipeline.location`): a file under its final name is always complete. Tar members are deterministic (fixed mtime, owner and mode), so
the same samples give byte-identical shards, which is what makes a resumed run equal an
uninterrupted one.

Per-band statistics are exact and streaming: each train shard keeps a histogram of its
uint16 values per band (65536 bins); the dataset's mean, std and percentiles come from the
sum of those histograms. A histogram is a mergeable summary, so resuming or adding shards
never double counts and percentiles are exact, not sketched.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.location import Location
from pipeline.names import safe_name

N_BINS = 65536
PERCENTILES = (1, 2, 50, 98, 99)


def encode_sample(data: np.ndarray, meta: dict[str, Any]) -> tuple[bytes, bytes]:
    """`.npy` bytes (no pickle possible: plain uint16) and canonical JSON bytes."""
    head, body = npy_parts(data)
    return head + body.tobytes(), encode_meta(meta)


def npy_parts(data: np.ndarray) -> tuple[bytes, memoryview]:
    """The `.npy` file of `data` as (header bytes, a byte view of the array): written out
    in two parts, the array is never copied into an intermediate buffer."""
    arr = np.ascontiguousarray(data)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
    return buf.getvalue(), memoryview(arr.reshape(-1)).cast("B")


def encode_meta(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def band_histogram(data: np.ndarray) -> np.ndarray:
    """[C, 65536] int64 counts of valid (non-zero) values per band of [C,H,W] or [T,C,H,W]."""
    hist = np.zeros((data.shape[-3], N_BINS), dtype=np.int64)
    add_band_histogram(hist, data)
    hist[:, 0] = 0  # 0 = nodata
    return hist


def add_band_histogram(hist: np.ndarray, data: np.ndarray) -> None:
    """Add the counts of uint16 [C,H,W] or [T,C,H,W] `data` to `hist` [C, 65536] (bin 0,
    nodata, included). One compiled pass (`kernels.add_histogram`): 5x faster than one
    `np.bincount` per band, which casts every value to int64 first (measured per chip)."""
    from pipeline.kernels import add_histogram

    c = data.shape[-3]
    for frame in np.ascontiguousarray(data, dtype=np.uint16).reshape(-1, c, data.shape[-2] * data.shape[-1]):
        add_histogram(hist, frame)


def stats_from_histogram(hist: np.ndarray) -> dict[str, Any]:
    """Per-band count, mean, std, min, max and percentiles (stored units) from [C, 65536]."""
    values = np.arange(N_BINS, dtype=np.float64)
    count = hist.sum(axis=1)
    safe = np.maximum(count, 1)
    mean = (hist * values).sum(axis=1) / safe
    var = (hist * values**2).sum(axis=1) / safe - mean**2
    cdf = np.cumsum(hist, axis=1)
    out: dict[str, Any] = {
        "count": count.astype(int).tolist(),
        "mean": [round(float(v), 4) for v in mean],
        "std": [round(float(v), 4) for v in np.sqrt(np.maximum(var, 0))],
        "min": [int(np.argmax(h > 0)) if c else 0 for h, c in zip(hist, count)],
        "max": [int(N_BINS - 1 - np.argmax(h[::-1] > 0)) if c else 0 for h, c in zip(hist, count)],
        "percentiles": {},
        "units": "harmonised DN (reflectance = value * 1e-4); valid pixels of the train split",
    }
    for p in PERCENTILES:
        target = np.ceil(count * p / 100.0)
        idx = [int(np.searchsorted(cdf[b], max(t, 1))) if count[b] else 0 for b, t in enumerate(target)]
        out["percentiles"][f"p{p}"] = idx
    return out


def save_hist(path: Path, hist: np.ndarray) -> None:
    """Store a [C, 65536] histogram sparsely (a few thousand non-zero bins; 6 MB dense)."""
    nz = np.nonzero(hist)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, shape=np.array(hist.shape), band=nz[0].astype(np.int16), value=nz[1].astype(np.uint16), count=hist[nz])
    os.replace(tmp, path)


def load_hist(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        hist = np.zeros(tuple(z["shape"]), dtype=np.int64)
        hist[z["band"].astype(np.int64), z["value"].astype(np.int64)] = z["count"]
    return hist


@dataclass
class ShardRecord:
    path: str  # relative to the dataset root
    num_samples: int
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "num_samples": self.num_samples, "bytes": self.bytes, "sha256": self.sha256}


class _HashingFile(io.RawIOBase):
    """File wrapper that counts bytes as they are written and gives their sha256 (no second
    read). A `DirectFile` hashes in its own writer thread, off the caller's path; any other
    file is hashed here."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self._h = None if isinstance(f, DirectFile) else hashlib.sha256()
        self.n = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.n

    def write(self, b: Any) -> int:
        mv = memoryview(b)
        if self._h is not None:
            self._h.update(mv)
        self.n += len(mv)
        self.f.write(mv)
        return len(mv)

    def hexdigest(self) -> str:
        """After the file's final flush: the sha256 of everything written."""
        return self._h.hexdigest() if self._h is not None else self.f.sha256.hexdigest()


class DirectFile:
    """A new file written sequentially with O_DIRECT, bypassing the page cache: `write`s,
    then `flush` once (pads the last block and trims the file to its exact length), `fileno`
    for the fsync, `close`.

    Why: here (benchmarks/RESULTS.md), copying into fresh page-cache pages cost ~2.3 CPU-s
    per GB (buffered write + fsync of 1 GB: 2.8 s wall, 2.3 s CPU), against 0.9 s wall and
    0.1 s CPU through O_DIRECT; shards are written once and not read back by the build, so
    caching them only evicts more useful pages. Bytes are gathered in page-aligned buffers
    (O_DIRECT needs aligned memory, offsets and lengths) and written by one background
    thread while the caller fills the other buffer. `open` gives a plain buffered file
    where the filesystem refuses O_DIRECT (tmpfs, some network filesystems).
    """

    ALIGN = 4096  # as zarr_chunks.ALIGN: O_DIRECT's alignment of memory, offsets and lengths

    def __init__(self, fd: int, block: int = 4 << 20) -> None:
        import concurrent.futures as cf
        import mmap

        self.fd = fd
        self.size = 0  # bytes accepted so far: the file's final length
        self._bufs = [mmap.mmap(-1, block), mmap.mmap(-1, block)]  # anonymous maps are page-aligned
        self._cur = 0
        self._fill = 0
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="shard-write")
        self._pending: cf.Future[None] | None = None
        self._flushed = False
        # hashed in the writer thread, block by block in file order (the padding is not hashed):
        # the caller's thread was spending ~0.26 s per 500 MB here (profile of a quarter scene)
        self.sha256 = hashlib.sha256()

    @staticmethod
    def open(path: Path) -> Any:
        """A `DirectFile` on a new file at `path`, or a buffered file where O_DIRECT is refused."""
        from pipeline.zarr_chunks import open_direct

        fd = open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        return open(path, "wb") if fd is None else DirectFile(fd)

    def write(self, b: Any) -> int:
        if self._flushed:
            raise ValueError("DirectFile: write after the final flush")
        mv = memoryview(b).cast("B")
        n, off = len(mv), 0
        while off < n:
            buf = self._bufs[self._cur]
            k = min(n - off, len(buf) - self._fill)
            buf[self._fill : self._fill + k] = mv[off : off + k]
            self._fill += k
            off += k
            if self._fill == len(buf):
                self._submit(len(buf), len(buf))
        self.size += n
        return n

    def _submit(self, length: int, data_len: int) -> None:
        """Queue the current buffer's first `length` bytes (a multiple of ALIGN, of which the
        first `data_len` are data, the rest padding); swap buffers."""
        self._wait()  # the other buffer is free again (a write error surfaces here)
        self._pending = self._pool.submit(self._write_all, memoryview(self._bufs[self._cur])[:length], data_len)
        self._cur = 1 - self._cur
        self._fill = 0

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _write_all(self, view: memoryview, data_len: int) -> None:
        self.sha256.update(view[:data_len])
        done = 0
        while done < len(view):
            done += os.write(self.fd, view[done:])

    def flush(self) -> None:
        """The final flush: the rest, zero-padded to the alignment, then the file trimmed to `size`."""
        if self._flushed:
            return
        pad = -self._fill % self.ALIGN
        self._bufs[self._cur][self._fill : self._fill + pad] = bytes(pad)
        self._submit(self._fill + pad, self._fill)
        self._wait()
        os.ftruncate(self.fd, self.size)
        self._flushed = True

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        """Release the file (after `flush` for a complete file; without it, the caller discards it)."""
        if self.fd < 0:
            return
        try:
            self._pool.shutdown(wait=True)
        finally:
            os.close(self.fd)
            self.fd = -1
            self._pending = None  # a failed write's future holds a view of a buffer
            for b in self._bufs:
                with contextlib.suppress(BufferError):  # a view still alive in a traceback: freed with it
                    b.close()


@dataclass
class ShardWriter:
    """Writes `<rel_dir>/<prefix>-NNNNNN.tar` shards into the dataset at `root` (a local
    folder or a `Location`, which may be remote), closing one at `max_bytes` or `max_samples`.

    `on_close(record, hist)` is called after each shard appears under its final name, with
    the shard's band histogram when `with_hist` (used for train statistics). `scratch`: the
    local folder remote shards are written in before their upload.
    """

    root: Location | Path
    rel_dir: str
    prefix: str
    max_bytes: int
    max_samples: int
    index: int = 0
    with_hist: bool = False
    on_close: Any = None
    scratch: Path | None = None
    _raw: Any = field(default=None, repr=False)
    _hf: _HashingFile | None = field(default=None, repr=False)
    _tmp: Path | None = field(default=None, repr=False)
    _count: int = 0
    _hist: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.root, Location):
            self.root = Location(str(self.root))
        safe_name(self.rel_dir, "dataset name")  # the shard's folder and file name: never a path of their own
        safe_name(self.prefix, "shard name prefix")

    @property
    def loc(self) -> Location:
        assert isinstance(self.root, Location)
        return self.root

    def _rel(self, i: int) -> str:
        return f"{self.rel_dir}/{self.prefix}-{i:06d}.tar"

    def _open(self) -> None:
        rel = self._rel(self.index)
        if self.loc.remote:
            base = self.scratch if self.scratch is not None else Path(tempfile.gettempdir())
            tmp = base / "shards" / rel
        else:
            final = self.loc.local_root / rel
            tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = tmp
        self._raw = DirectFile.open(tmp)
        self._hf = _HashingFile(self._raw)
        self._count = 0
        self._hist = None

    def _member(self, name: str, size: int, *parts: bytes | memoryview) -> None:
        """One tar member, written straight through the hashing file: header, payload
        parts, NUL padding to the 512-byte block (what `tarfile.addfile` writes, without
        its 16 KB copy loop through an intermediate buffer)."""
        ti = tarfile.TarInfo(name)
        ti.size = size
        ti.mtime = 0  # deterministic bytes
        ti.mode = 0o444
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        assert self._hf is not None
        self._hf.write(ti.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
        for part in parts:
            self._hf.write(part)
        if size % tarfile.BLOCKSIZE:
            self._hf.write(tarfile.NUL * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))

    def write(self, key: str, data: np.ndarray, meta: dict[str, Any]) -> None:
        safe_name(key, "sample key")  # a tar member name: `../x` or `/tmp/x` never reaches a reader's disk
        head, body = npy_parts(data)
        js = encode_meta(meta)
        npy_size = len(head) + len(body)
        size = npy_size + len(js) + 3 * 512  # two headers + padding, upper bound
        if self._hf is not None and self._count > 0 and (
            self._count >= self.max_samples or self._hf.n + size > self.max_bytes
        ):
            self.close_shard()
        if self._hf is None:
            self._open()
        self._member(f"{key}.npy", npy_size, head, body)
        self._member(f"{key}.json", len(js), js)
        self._count += 1
        if self.with_hist:
            if self._hist is None:
                self._hist = np.zeros((data.shape[-3], N_BINS), dtype=np.int64)
            add_band_histogram(self._hist, data)

    def close_shard(self) -> ShardRecord | None:
        if self._hf is None:
            return None
        if self._hist is not None:
            self._hist[:, 0] = 0  # 0 = nodata
        # end of archive as tarfile writes it: two zero blocks, then zeros to a whole record
        self._hf.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        if self._hf.n % tarfile.RECORDSIZE:
            self._hf.write(tarfile.NUL * (tarfile.RECORDSIZE - self._hf.n % tarfile.RECORDSIZE))
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        rel = self._rel(self.index)
        assert self._tmp is not None
        self.loc.publish(self._tmp, rel)  # rename (local) or one upload (remote): complete or absent
        self._tmp = None
        rec = ShardRecord(rel, self._count, self._hf.n, self._hf.hexdigest())
        hist = self._hist
        self._hf = None
        self.index += 1
        if self.on_close is not None:
            self.on_close(rec, hist)
        return rec

    def abandon(self) -> None:
        """Drop the open (incomplete) shard without publishing it."""
        if self._hf is None:
            return
        try:
            self._raw.close()
        finally:
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)
                self._tmp = None
            self._hf = None


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to `path` via a fsynced temporary file and an atomic rename."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
