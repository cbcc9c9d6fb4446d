"""Peak RSS of ``Predictor(resize=True)``'s image resize on one huge image (issue #16 item 8).

Each measurement runs in a fresh subprocess: it builds a random uint8 image of
SIZE x SIZE x 3, records the RSS, resizes it to the bundle-like size with
the area kernel (``tilead.runtime.image_resize.resize_image``, what the
Predictor runs on a shrinking image since issue #19), the banded bilinear
resize (``resize_uint8``, what it runs on a growing image, and ran before #19
on every image) or the whole-image float32 conversion that one replaced, and
reports the peak RSS above the image itself (``ru_maxrss`` minus the RSS with
the image allocated).

    python benchmarks/bench_resize_rss.py --size 20000 --out-size 900 [--json out/bench/resize_rss.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import numpy as np

def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")

size, out_size, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
from tilead.runtime.image_resize import resize_image, resize_uint8
image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
base = rss_mib()
start = time.perf_counter()
if mode == "area":
    out = resize_image(image, (out_size, out_size))
elif mode == "banded":
    out = resize_uint8(image, (out_size, out_size))
else:  # what Predictor did before: the whole image as float32 planes
    out = resize_uint8(image, (out_size, out_size), whole_elements=image.size)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"mode": mode, "size": size, "image_mib": image.nbytes / 2**20, "rss_with_image_mib": base,
                  "peak_rss_mib": peak, "temporaries_mib": peak - base, "seconds": seconds,
                  "checksum": int(out.astype(np.int64).sum())}))
"""


def measure(size: int, out_size: int, mode: str) -> dict[str, float]:
    """Run one measurement in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(size), str(out_size), mode], capture_output=True, text=True, check=True
    )
    result: dict[str, float] = json.loads(proc.stdout)
    return result


def main() -> None:
    """Measure the area and banded resizes and, unless --banded-only, the whole-image conversion."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20000, help="Input image side in pixels.")
    parser.add_argument("--out-size", type=int, default=900, help="Output side (the bundle's image size).")
    parser.add_argument("--banded-only", action="store_true", help="Skip the old whole-image route (needs ~5x RAM).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = parser.parse_args()
    modes = ["area", "banded"] if args.banded_only else ["area", "banded", "whole"]
    rows = [measure(args.size, args.out_size, m) for m in modes]
    for r in rows:
        print(
            f"{r['mode']:7s} {args.size}x{args.size}x3 -> {args.out_size}: image {r['image_mib']:.0f} MiB, "
            f"temporaries {r['temporaries_mib']:.0f} MiB (peak RSS {r['peak_rss_mib']:.0f} MiB), {r['seconds']:.2f} s"
        )
    if len(rows) == 3:
        print(f"banded and whole give the same output: {rows[1]['checksum'] == rows[2]['checksum']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
