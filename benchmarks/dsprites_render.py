r"""How long the offline dSprites renderer takes (a benchmark).

Measures, with `avb.dsprites`:
  * templates: drawing the 720 (shape, scale, orientation) sprites once, the
    only geometry work (cold, i.e. with the template cache cleared);
  * full set: `render_grid()` of all 737,280 images into memory (3 GB of
    uint8), every image a whole-pixel shift of its template;
  * on disk (with --to-disk): `render_to_cache` into a temporary directory,
    the path `load_dsprites(source="render")` takes on its first call: the
    same work plus writing the .npy memmap, renamed into place;
  * arbitrary images: `render_images` of random factor combinations, the path
    the disentanglement metrics take, as images per second.

Commands:
  python -m benchmarks.dsprites_render
  python -m benchmarks.dsprites_render --to-disk --supersample=4
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np

from avb import dsprites


def _timed(fn):
  start = time.perf_counter()
  result = fn()
  return time.perf_counter() - start, result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--supersample", type=int, default=1,
                      help="samples per pixel side (1: pixel centres)")
  parser.add_argument("--num-random", type=int, default=20_000,
                      help="random factor combinations for render_images")
  parser.add_argument("--to-disk", action="store_true",
                      help="also time render_to_cache into a temp directory")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
  args = parse_args(argv)
  results = {}

  dsprites._templates.cache_clear()
  results["templates_s"], _ = _timed(
      lambda: dsprites._templates(args.supersample))

  results["full_set_s"], images = _timed(
      lambda: dsprites.render_grid(supersample=args.supersample))
  mean_pixel = float(images.mean())
  del images

  if args.to_disk:
    with tempfile.TemporaryDirectory() as directory:
      results["full_set_to_disk_s"], dataset = _timed(
          lambda: dsprites.render_to_cache(
              directory, supersample=args.supersample))
      size_gb = os.path.getsize(dataset.source.split(":", 1)[1]) / 1e9
      del dataset

  classes = dsprites.sample_factors(np.random.default_rng(0), args.num_random)
  results["random_s"], _ = _timed(
      lambda: dsprites.render_images(classes, supersample=args.supersample))

  print()
  print(f"dSprites renderer, supersample={args.supersample}, "
        f"{dsprites.NUM_IMAGES:,} images of 64x64 (mean pixel "
        f"{mean_pixel:.4f})")
  print()
  print("| what | wall s | images/s |")
  print("|---|---:|---:|")
  print(f"| 720 templates (cold) | {results['templates_s']:.3f} | |")
  print(f"| full set into memory (render_grid) | {results['full_set_s']:.2f} "
        f"| {dsprites.NUM_IMAGES / results['full_set_s']:,.0f} |")
  if args.to_disk:
    print(f"| full set into a .npy memmap ({size_gb:.2f} GB, render_to_cache) "
          f"| {results['full_set_to_disk_s']:.2f} | "
          f"{dsprites.NUM_IMAGES / results['full_set_to_disk_s']:,.0f} |")
  print(f"| {args.num_random:,} random combinations (render_images) | "
        f"{results['random_s']:.3f} | "
        f"{args.num_random / results['random_s']:,.0f} |")
  print()
  print(f"Environment: numpy {np.__version__}, Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()})")
  return results


if __name__ == "__main__":
  main()
