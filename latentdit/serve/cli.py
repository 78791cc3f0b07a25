"""``latentdit serve`` and ``latentdit generate --server URL`` (a running server draws the images)."""

from __future__ import annotations

import argparse

from ..cli_base import command, save_images


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="shapes", help="model folder, packaged name or hub id")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; anything beyond loopback should come with --token")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--token", default=None,
                   help="require 'Authorization: Bearer TOKEN' on /v1 (default: $LATENTDIT_TOKEN)")
    p.add_argument("--max-batch", type=int, default=16, help="images per sampler call")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond which the answer is 429")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may wait and run")


@command("serve", "a REST API (with batching) and a web UI at /ui for a model")(_serve_args)
def run_serve(args: argparse.Namespace) -> int:
    try:
        from .server import serve
    except ImportError as e:
        raise ValueError(f"serving needs FastAPI and uvicorn: pip install -e '.[serve]' ({e})") from None
    for name in ("max_batch", "max_queue"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    serve(args.model, args.host, args.port, args.device, args.token, args.max_batch, args.max_wait_ms,
          args.max_queue, args.timeout)
    return 0


def generate_on_server(args: argparse.Namespace) -> int:
    """``latentdit generate PROMPT --server URL``: the same flags, drawn by a running server."""
    import os

    from .client import Client

    if args.from_file or args.random_tiny or args.fp32:
        raise ValueError("--server draws one prompt; --from-file, --random-tiny and --fp32 are local-only")
    from ..cli_base import check_image_out

    check_image_out(args.out)
    client = Client(args.server, token=os.environ.get("LATENTDIT_TOKEN"))
    interval = list(args.guidance_interval) if args.guidance_interval else None
    images, seeds = client.generate(args.prompt, num_images=args.num_images, seed=args.seed, steps=args.steps,
                                    guidance_scale=args.guidance, sampler=args.sampler, height=args.height,
                                    width=args.width, negative_prompt=args.negative, guidance_interval=interval)
    return save_images(images, args.out)
