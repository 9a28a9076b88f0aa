"""Micro-benchmark of the built-in rasterizer (not a test).

A synthetic face-sized mesh: a 189 x 189 vertex grid (35721 vertices, 70688 triangles,
close to BFM's 35709 / 70789) on a sphere cap, projected with SPEC §3's camera (focal
1015, camera at distance 10) to the centre of a 256 x 256 image, filling about 60% of it.
Reports milliseconds per frame for forward (rasterize + interpolate) and forward+backward
(backward of the image sum w.r.t. vertices and colours), batch 1 and batch 16.

    python bench/bench_render.py [--batch 1 16] [--repeat 10] [--threads N] [--profile]

Times are the best of --repeat runs (wall clock). On a shared machine other processes
inflate them, with several threads most (a parallel region waits for its slowest
thread); the load average is printed with the results.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from core.render import MeshRenderer  # noqa: E402


def sphere_cap_mesh(n: int = 189, image_size: int = 256, cover: float = 0.6, seed: int = 0):
    """(verts_screen (N, 3), faces (F, 3)) of an n x n grid on a sphere cap."""
    g = torch.Generator().manual_seed(seed)
    focal, distance, radius = 1015.0, 10.0, 1.5
    half_px = 0.5 * image_size * cover ** 0.5
    half = half_px * distance / focal
    t = torch.linspace(-half, half, n, dtype=torch.float64)
    y, x = torch.meshgrid(t, t, indexing="ij")
    x = x + (torch.rand(x.shape, generator=g, dtype=torch.float64) - 0.5) * (2 * half / n) * 0.3
    y = y + (torch.rand(y.shape, generator=g, dtype=torch.float64) - 0.5) * (2 * half / n) * 0.3
    z = (radius ** 2 - x ** 2 - y ** 2).sqrt() - radius + 0.5
    zc = distance - z
    col = focal * x / zc + image_size / 2
    row = image_size - (focal * y / zc + image_size / 2)
    verts = torch.stack([col, row, zc], -1).reshape(-1, 3).float()
    i = torch.arange(n - 1)
    a = (i[:, None] * n + i[None, :]).reshape(-1)
    quads = torch.stack([a, a + 1, a + n, a + n + 1], 1)
    faces = torch.cat([quads[:, [0, 1, 2]], quads[:, [1, 3, 2]]], 0)
    return verts, faces


def timeit(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs (best is kept)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's default)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    verts1, faces = sphere_cap_mesh(image_size=args.size)
    renderer = MeshRenderer(backend="builtin")
    print(f"threads={torch.get_num_threads()} verts={verts1.shape[0]} faces={faces.shape[0]} "
          f"image={args.size}x{args.size} load average={os.getloadavg()[0]:.2f} "
          f"(other processes on the cores inflate the times)")
    for batch in args.batch:
        g = torch.Generator().manual_seed(1)
        verts = verts1.expand(batch, -1, -1) + torch.randn(batch, 1, 3, generator=g) * torch.tensor([2.0, 2.0, 0.0])
        colors = torch.rand(batch, verts1.shape[0], 3, generator=g) * 255
        size = (args.size, args.size)

        def forward():
            with torch.no_grad():
                return renderer(verts, faces, colors, size)

        def forward_backward():
            v = verts.clone().requires_grad_(True)
            c = colors.clone().requires_grad_(True)
            renderer(v, faces, c, size).sum().backward()

        def raster_only():
            return renderer.rasterize(verts, faces, size)

        coverage = forward()[..., 3].mean().item()
        t_r = timeit(raster_only, args.repeat) / batch * 1e3
        t_f = timeit(forward, args.repeat) / batch * 1e3
        t_fb = timeit(forward_backward, args.repeat) / batch * 1e3
        print(f"batch {batch:3d}: coverage {coverage:.2f}  rasterize {t_r:6.2f} ms/frame  "
              f"forward {t_f:6.2f} ms/frame  forward+backward {t_fb:6.2f} ms/frame")
        if args.profile:
            from torch.profiler import profile
            with profile() as prof:
                forward_backward()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    sys.exit(main())
