"""``aqm convert`` and ``aqm export`` (registered into the ``aqm`` command line).

torch, onnx and the encoder are imported only when a subcommand runs.
"""
from __future__ import annotations

import argparse

__all__ = ["register"]


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert
    encoder = {k: v for k, v in (("beam", args.beam), ("iters", args.iters)) if v is not None}
    tuning = ({"finetune_steps": args.finetune, "finetune_lr": args.finetune_lr,
               "finetune_raw": args.finetune_raw} if args.finetune else {})
    summary = convert(args.source, args.output, bits=args.bits, target_size=args.target_size,
                      allocate=args.allocate, permute=args.permute, codebooks=args.codebooks,
                      calib=args.calib, keep=args.keep or (), seed=args.seed,
                      progress=not args.no_progress, encoder=encoder, **tuning)
    src = (f" (source files {summary.source_file_bytes / 1e6:.2f} MB)"
           if summary.source_file_bytes else "")
    print(f"{summary}{src}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .onnx_graph import export_onnx
    result = export_onnx(args.file, args.output)
    extra = f" + external data {result['external_data']}" if result["external_data"] else ""
    print(f"{result['path']}: {result['bytes'] / 1e6:.2f} MB ONNX model{extra}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``convert`` and ``export`` to the ``aqm`` subcommands."""
    p = sub.add_parser("convert", help="compress a PyTorch or ONNX model into an .aqm file",
                       description="Source type from the path: .pt/.pth/.bin (weights_only), "
                                   ".safetensors, .onnx, or a Hugging Face model folder.")
    p.add_argument("source", help="model file or Hugging Face folder")
    p.add_argument("-o", "--output", required=True, help="the .aqm file to write")
    p.add_argument("--bits", type=float, default=4.0, help="code bits per compressed weight (default 4)")
    p.add_argument("--target-size", help="file size budget, e.g. 5MB: bits allocated per tensor to fit")
    p.add_argument("--allocate", action="store_true",
                   help="allocate bits per tensor by predicted output error: --bits per compressed "
                        "weight, every byte counted")
    p.add_argument("--permute", action="store_true",
                   help="search a column permutation per tensor (slower, lower error)")
    p.add_argument("--codebooks", choices=("shared", "per-layer", "by-kind"), default="by-kind",
                   help="codebook sharing across tensors (default by-kind: attention, MLP, conv, other)")
    p.add_argument("--calib", help="calibration inputs: .npy/.npz arrays or a .txt of sentences "
                                   "(Hugging Face text models)")
    p.add_argument("--keep", action="append", metavar="PATTERN",
                   help="keep tensors matching this fnmatch pattern raw (repeatable)")
    p.add_argument("--finetune", type=int, default=0, metavar="STEPS",
                   help="after coding, distil the original model into the codebooks for STEPS steps "
                        "on the --calib inputs (PyTorch modules and Hugging Face folders)")
    p.add_argument("--finetune-lr", type=float, default=1e-3, help="peak learning rate of --finetune")
    p.add_argument("--finetune-raw", choices=("all", "1d"), default="all",
                   help="uncompressed tensors --finetune trains: all float ones, e.g. kept embeddings "
                        "(default), or norms and biases only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beam", type=int, help="code search beam width (speed/quality)")
    p.add_argument("--iters", type=int, help="codebook training iterations (speed/quality)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("export", help="write a plain ONNX model with the decoded weights")
    p.add_argument("file", help=".aqm file holding an ONNX graph")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.set_defaults(func=_cmd_export)
