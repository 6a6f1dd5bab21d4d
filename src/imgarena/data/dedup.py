"""Near-duplicate detection over decoded images: a perceptual signature per image, matched by angle,
grouped by connected components.

The signature: the image's luma is area-resampled to a 32x32 thumbnail and its 16x16 lowest DCT
frequencies, less the DC term (brightness), are scaled to unit length. Resizing, re-encoding (JPEG)
and brightness/contrast changes barely turn it; distinct images turn it a lot. Two images are
near-duplicates when the cosine of their signatures is at least MIN_COSINE. Measured on
Fashion-MNIST (28x28, where distinct items are alike): copies resized to 64 or 40 px or re-encoded
as JPEG q=70 have cosine >= 0.9975 in ~90-99% of cases (decoded at 28 px: 90%; at 32 or 224 px:
99%); only 0.5% of distinct images have a neighbour that close, and those include its real
duplicates. On photographs copies score > 0.999 and distinct pictures < 0.7. (A 64-bit pHash
cannot tell Fashion-MNIST items apart: a quarter are within 4 bits of another; a 256-bit median
hash flips half its bits on smooth photographs, whose high frequencies are all near the median.)

Featureless images (a nearly flat thumbnail: blank frames, solid colours) are never grouped: their
signature is noise, and two blank frames are not one photo. They are counted (`Hashes.flat`) so
reports can say how many were left out.

Matching does not compare all pairs: each signature also gets a 256-bit SimHash (signs of fixed
random projections; the fraction of differing bits estimates the angle / pi). The bits are cut
into CANDIDATE_BITS + 1 bands; two hashes within CANDIDATE_BITS bits agree on a whole band
(pigeonhole), so only images sharing a band value are compared (vectorised, in numpy: Hamming
distance, then exact cosine). Copies (cosine > 0.999) differ in ~4 bits and in more than
CANDIDATE_BITS with probability ~0.001; pairs right at MIN_COSINE (~6 bits) ~0.025, and chains
through the other copies of a group recover most of those. On Fashion-MNIST raising
CANDIDATE_BITS to 14 found exactly the same groups, at twice the time.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

VERSION = 2  # of the signature: stored results of another version are recomputed
THUMB = 32  # thumbnail side the DCT is taken of
FREQS = 16  # FREQS x FREQS lowest frequencies (less DC) make the signature
BITS = 256  # SimHash bits
WORDS = BITS // 64
MIN_COSINE = 0.9975  # signatures at least this close (cosine) are near-duplicates
CANDIDATE_BITS = 10  # SimHash Hamming distance within which pairs are checked by cosine
FLAT_RANGE = 8.0  # 5th..95th percentile spread (0..255) of the thumbnail below which an image is featureless
BIG_BUCKET = 24  # band buckets larger than this are compared as blocks, smaller ones pair by pair
FILE = f"near-duplicates-v{VERSION}.npz"


@dataclass
class Hashes:
    bits: np.ndarray  # uint64 (N, WORDS): SimHash of the signature (finds candidates)
    flat: np.ndarray  # bool (N,): featureless image, never grouped
    sig: np.ndarray  # float16 (N, FREQS**2 - 1): unit-length signature (decides)


# ---- hashing ----

def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of area (box) resampling, for up- and downscaling alike."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(n_in)[None, :]
    w = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0, None)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _dct_matrix(n: int, k: int) -> np.ndarray:
    i = np.arange(n)
    return np.cos(np.pi * (2 * i[None, :] + 1) * np.arange(k)[:, None] / (2 * n)).astype(np.float32)


def _projections() -> np.ndarray:
    return np.random.default_rng(0x51A4A5).standard_normal((BITS, FREQS * FREQS - 1)).astype(np.float32)


def _hash_block(block: np.ndarray, p: np.ndarray, q: np.ndarray, a16: np.ndarray, b16: np.ndarray, r: np.ndarray):
    """(bits (n, WORDS) uint64, flat (n,) bool, signature (n, FREQS**2 - 1) float16) of uint8 (n, C, H, W) rows.

    `p`/`q` map rows/columns straight to the DCT of the area thumbnail (DCT @ resampling), so the
    coefficients are two plain 2-D products (one GEMM each), not n small ones."""
    x = block.astype(np.float32)
    g = x[:, 0] if x.shape[1] == 1 else np.tensordot(x, np.array([0.299, 0.587, 0.114], np.float32), axes=([1], [0]))
    n, h, w = g.shape
    c = (g.reshape(n * h, w) @ q.T).reshape(n, h, FREQS).transpose(0, 2, 1).reshape(n * FREQS, h) @ p.T
    sig = c.reshape(n, FREQS * FREQS)[:, 1:]  # (transposed coefficient order; [0] is DC either way)
    sig /= np.maximum(np.linalg.norm(sig, axis=1, keepdims=True), 1e-6)
    packed = np.packbits(sig @ r.T > 0, axis=1).view(">u8").astype(np.uint64)
    t = (g.reshape(n * h, w) @ b16.T).reshape(n, h, 16).transpose(0, 2, 1).reshape(n * 16, h) @ a16.T
    k5, k95 = 12, 243  # 5th and 95th of 256 thumbnail pixels
    spread = np.partition(t.reshape(n, 256), [k5, k95], axis=1)
    return packed, (spread[:, k95] - spread[:, k5]) < FLAT_RANGE, sig.astype(np.float16)


def compute_hashes(images, chunk: int = 2048) -> Hashes:
    """Hashes of uint8 (N, C, H, W) images (an array or memmap, read in chunks of `chunk` rows)."""
    n, _, h, w = images.shape
    d = _dct_matrix(THUMB, FREQS)
    p, q = d @ _area_matrix(h, THUMB), d @ _area_matrix(w, THUMB)
    a16, b16, r = _area_matrix(h, 16), _area_matrix(w, 16), _projections()
    bits = np.zeros((n, WORDS), np.uint64)
    flat = np.zeros(n, bool)
    sig = np.zeros((n, FREQS * FREQS - 1), np.float16)
    chunk = max(1, min(chunk, (64 << 20) // max(1, h * w * 4 * 3)))  # ~64 MB of float work per chunk
    for s in range(0, n, chunk):
        bits[s : s + chunk], flat[s : s + chunk], sig[s : s + chunk] = _hash_block(
            np.asarray(images[s : s + chunk]), p, q, a16, b16, r)
    return Hashes(bits, flat, sig)


# ---- stored with the cache entry (they depend only on its pixels) ----

def _checksum(arrays: dict) -> int:
    crc = 0
    for name in sorted(arrays):
        crc = zlib.crc32(np.ascontiguousarray(arrays[name]).tobytes(), crc)
    return crc


def _read(path: str, n: int, min_cosine: float) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("bits", "flat", "labels", "min_cosine")}
            crc = int(z["crc"])
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - any damage (zip CRC, missing member, bad header): recompute
        log.warning("stored near-duplicate hashes %s are unreadable (%s): recomputing them", path, e)
        return None
    if arrays["labels"].shape != (n,) or arrays["bits"].shape != (n, WORDS) or crc != _checksum(arrays):
        log.warning("stored near-duplicate hashes %s do not match the cache entry: recomputing them", path)
        return None
    if float(arrays["min_cosine"]) != float(min_cosine):
        return None
    return arrays["labels"].astype(np.int64)


def stored_featureless(folder: str) -> int | None:
    """How many of an entry's images are featureless (never grouped), from its stored hashes."""
    try:
        with np.load(os.path.join(folder, FILE), allow_pickle=False) as z:
            return int(z["flat"].sum())
    except Exception:  # noqa: BLE001 - not stored or unreadable: unknown
        return None


def entry_labels(folder: str, images, min_cosine: float = MIN_COSINE) -> np.ndarray:
    """near_duplicate_labels of a cache entry's rows: read from `folder` when stored there, else
    computed and stored (atomically, self-checking; a read-only cache just computes them)."""
    path = os.path.join(folder, FILE)
    labels = _read(path, len(images), min_cosine)
    if labels is not None:
        return labels
    h = compute_hashes(images)
    labels = near_duplicate_labels(h, min_cosine)
    arrays = {"bits": h.bits, "flat": h.flat, "labels": labels, "min_cosine": np.float64(min_cosine)}
    from imgarena.data.cache import write_best_effort

    write_best_effort(path, lambda f: np.savez(f, crc=np.int64(_checksum(arrays)), **arrays),
                      f"near-duplicate hashes in {folder}")
    return labels


# ---- matching ----

def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    table = np.array([bin(i).count("1") for i in range(256)], np.uint8)  # numpy < 2
    return table[x.view(np.uint8)].reshape(*x.shape, 8).sum(-1)


def _distance(cols: np.ndarray, i, j) -> np.ndarray:
    """Hamming distances between hashes i and j; `cols` is (WORDS, N) (1-D gathers are fast)."""
    d = _popcount(cols[0][i] ^ cols[0][j]).astype(np.int32)
    for w in range(1, len(cols)):
        d += _popcount(cols[w][i] ^ cols[w][j])
    return d


def _bands(bits: np.ndarray, n_bands: int) -> list[np.ndarray]:
    """n_bands disjoint sets of the hash's bits as integers. Band k takes every n_bands-th bit from
    bit k: low frequencies (alike across many images) are spread over all bands, so band buckets
    stay small."""
    flat = np.unpackbits(bits.astype(">u8").view(np.uint8), axis=1)  # (N, BITS)
    out = []
    for k in range(n_bands):
        cols = flat[:, k::n_bands].astype(np.uint64)
        out.append(cols @ (np.uint64(1) << np.arange(cols.shape[1], dtype=np.uint64)))
    return out


def _close_pairs(h: Hashes, ids: np.ndarray, min_cosine: float, max_distance: int = CANDIDATE_BITS) -> np.ndarray:
    """(P, 2) pairs of `ids` whose signatures have cosine >= min_cosine, each pair once (i < j).
    Candidates share a SimHash band: in small band buckets the pairs within `max_distance` bits
    are checked by cosine; a big bucket (alike images: Fashion-MNIST has thousands of similar
    shirts) is compared as a whole, by cosines from one matrix product per block."""
    import torch

    candidates, verified = [], []
    sub = h.bits[ids]
    sig = h.sig[ids].astype(np.float32)
    for band in _bands(sub, max_distance + 1):
        order = np.argsort(band, kind="stable")
        vals = band[order]
        cols = np.ascontiguousarray(sub[order].T)  # this band's sort order: neighbours are adjacent
        starts = np.flatnonzero(np.r_[True, vals[1:] != vals[:-1]])
        sizes = np.diff(np.r_[starts, len(vals)])
        big = sizes > BIG_BUCKET
        run = np.repeat(np.arange(len(starts)), sizes)
        run[np.repeat(big, sizes)] = -1 - np.arange(int(sizes[big].sum()))  # never equal: skipped below
        for k in range(1, min(BIG_BUCKET, int(sizes.max(initial=1)))):  # positions p, p+k in one small run
            p = np.flatnonzero(run[:-k] == run[k:])
            if len(p) == 0:
                break
            keep = p[_distance(cols, p, p + k) <= max_distance]
            candidates.append(np.stack([order[keep], order[keep + k]], 1))
        for s, z in zip(starts[big], sizes[big]):
            members = order[s : s + z]
            block = torch.from_numpy(sig[members])
            for r in range(0, z, 512):
                a, b = np.nonzero(np.triu((block[r : r + 512] @ block.T).numpy() >= min_cosine, k=r + 1))
                verified.append(np.stack([members[r + a], members[b]], 1))
    out = [np.zeros((0, 2), np.int64)] + verified
    if candidates:
        pairs = np.sort(np.concatenate(candidates), axis=1).astype(np.int64)
        codes = np.unique(pairs[:, 0] * len(ids) + pairs[:, 1])  # found through several bands: check once
        pairs = np.stack([codes // len(ids), codes % len(ids)], 1)
        cos = np.einsum("ij,ij->i", sig[pairs[:, 0]], sig[pairs[:, 1]])
        out.append(pairs[cos >= min_cosine])
    return ids[np.concatenate(out).astype(np.int64)]


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Component label per node (0..n-1) of the graph with edges `pairs`."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(pairs) == 0:
        return np.arange(n, dtype=np.int64)
    g = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(g, directed=False)[1].astype(np.int64)


def near_duplicate_labels(h: Hashes, min_cosine: float = MIN_COSINE) -> np.ndarray:
    """Group label per image (int64 (N,)): images with the same label are near-duplicates, directly
    or through a chain of them. Singletons have labels of their own."""
    import torch

    # Thousands of small block products: threads gain little on them and, on a busy machine,
    # multithreaded BLAS slowed matching 5x (2 shared cores: 39 s vs 6 s for 60,000 images).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pairs = _close_pairs(h, np.flatnonzero(~h.flat), min_cosine)
    finally:
        torch.set_num_threads(threads)
    return _components(len(h.flat), pairs)


def groups_of(labels: np.ndarray) -> list[np.ndarray]:
    """Members (sorted indices) of every label shared by more than one item, largest group first."""
    order = np.argsort(labels, kind="stable")
    vals = labels[order]
    starts = np.flatnonzero(np.r_[True, vals[1:] != vals[:-1]])
    sizes = np.diff(np.r_[starts, len(vals)])
    out = [np.sort(order[s : s + z]) for s, z in zip(starts, sizes) if z > 1]
    out.sort(key=lambda g: (-len(g), int(g[0])))
    return out
