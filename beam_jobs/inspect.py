"""What the pipeline thinks of a DICOM file: one JSON line per file, exit status 1 if any file failed.

    octjepa inspect scan.dcm gs://bucket/retinal_oct/structural_oct/topcon_triton/1001/x.dcm
    octjepa inspect data/retinal_oct/structural_oct/zeiss_cirrus        # a folder: every *.dcm under it
    octjepa inspect --header-only big.dcm                                # skip the pixel decode

Each line holds the SOP class, transfer syntax, manufacturer and model, shape ``(D, H, W)``, ``spacing_mm``
``(dz, dy, dx)`` with the tag path each value came from, and any warning; or ``error`` (the reason the
preprocessing job would record) with its message. Pixels are decoded by default, because a file whose header is
fine can still hold a broken codestream.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from pydicom.uid import UID

from beam_jobs.config import DEFAULT_MAX_DECODED_BYTES
from beam_jobs.dicom import DicomReadError, read_header, read_oct_dicom
from shards import storage


def expand(paths: Sequence[str]) -> Iterator[str]:
    """Each argument as given, or for a folder every ``*.dcm`` below it (sorted)."""
    for url in paths:
        fs, path = storage.get_fs(url)
        if fs.isdir(path):
            found = sorted(p for p in fs.find(path) if p.lower().endswith(".dcm"))
            prefix = "gs://" if url.startswith("gs://") else ""
            yield from (prefix + p for p in found)
        else:
            yield url


def inspect_file(
    url: str,
    *,
    decode: bool = True,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    allow_other_sop_classes: bool = False,
) -> dict[str, Any]:
    """The JSON-ready report for one file; never raises for a bad file (the report carries the error)."""
    try:
        with storage.open_url(url, "rb") as f:
            data = f.read()
    except FileNotFoundError as exc:
        return {"path": url, "error": "missing_file", "message": f"{url}: file not found ({exc})"}
    options = dict(name=url, max_decoded_bytes=max_decoded_bytes, allow_other_sop_classes=allow_other_sop_classes)
    volume: np.ndarray | None = None
    try:
        if decode:
            volume, header = read_oct_dicom(data, **options)
        else:
            header = read_header(data, **options)
    except DicomReadError as exc:
        return {"path": url, "error": exc.reason, "message": str(exc)}
    report: dict[str, Any] = {
        "path": url,
        "sop_class": header.sop_class_uid,
        "sop_class_name": UID(header.sop_class_uid).name,
        "transfer_syntax": header.transfer_syntax_uid,
        "transfer_syntax_name": UID(header.transfer_syntax_uid).name,
        "manufacturer": header.manufacturer,
        "model": header.model,
        "laterality": header.laterality,
        "shape": list(header.shape),
        "dtype": f"uint{header.bits_allocated}",
        "bits_stored": header.bits_stored,
        "spacing_mm": list(header.spacing_mm),
        "spacing_source": list(header.spacing_source),
        "extent_mm": [round(n * s, 4) for n, s in zip(header.shape, header.spacing_mm)],
        "warnings": list(header.warnings),
    }
    if volume is not None:
        report["intensity"] = {
            "min": int(volume.min()),
            "max": int(volume.max()),
            "mean": round(float(volume.mean(dtype=np.float64)), 3),
        }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="octjepa inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="DICOM files or folders, local or gs://")
    parser.add_argument("--header-only", action="store_true", help="check the header only, decode no pixel")
    parser.add_argument("--max-decoded-bytes", type=int, default=DEFAULT_MAX_DECODED_BYTES)
    parser.add_argument("--allow-other-sop-classes", action="store_true")
    args = parser.parse_args(argv)
    failed = 0
    for url in expand(args.paths):
        report = inspect_file(
            url,
            decode=not args.header_only,
            max_decoded_bytes=args.max_decoded_bytes,
            allow_other_sop_classes=args.allow_other_sop_classes,
        )
        failed += "error" in report
        print(json.dumps(report), flush=True)
    if failed:
        print(f"octjepa inspect: {failed} file(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
