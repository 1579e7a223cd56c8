"""``aqm convert`` and ``aqm export`` (registered into the ``aqm`` command line).

torch, onnx and the encoder are imported only when a subcommand runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from aqformat.cpus import default_threads
from aqformat.errors import AqmInputError, AqmWarning
from aqformat.units import UNITS_HELP, format_size

from .options import CODECS, DEFAULT_CODEC, GROUPINGS

__all__ = ["register"]

# SearchEffort's defaults, as the help states them (tests check they agree)
DEFAULT_BEAM, DEFAULT_ITERS = 8, 6


def _check_output(path: str, force: bool) -> bool:
    """Refuse to replace an existing file without ``--force``; return whether one is replaced."""
    if os.path.isdir(path):
        raise AqmInputError(f"{path} is a directory")
    exists = os.path.lexists(path)
    if exists and not force:
        raise AqmInputError(f"{path} exists; pass --force to replace it")
    return exists


def set_threads(n: int | None) -> int:
    """Use ``n`` threads for torch (default: :func:`aqformat.cpus.default_threads`); return the count."""
    import torch
    n = default_threads() if n is None else n
    if n < 1:
        raise AqmInputError(f"--threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    return n


def _code_width(text: str) -> int | str:
    """``--bits-per-code``: a number of bits, or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bits or 'auto', got {text!r}") from None


def _cmd_convert(args: argparse.Namespace) -> int:
    replaced = _check_output(args.output, args.force)
    if not args.output.lower().endswith(".aqm"):
        ext = os.path.splitext(args.output)[1] or "no extension"
        warnings.warn(f"-o {args.output}: an .aqm file is written whatever the name ({ext}); "
                      f"`aqm export` writes ONNX", AqmWarning, stacklevel=1)
    threads = set_threads(args.threads)
    from .api import convert
    encoder = {k: v for k, v in (("beam", args.beam), ("iters", args.iters), ("bits_per_code", args.bits_per_code),
                                 ("d", args.vector_dim)) if v is not None}
    tuning = ({"finetune_steps": args.finetune, "finetune_lr": args.finetune_lr,
               "finetune_raw": args.finetune_raw} if args.finetune else {})
    progress = not args.no_progress and args.verbosity >= 0 and sys.stderr.isatty()
    summary = convert(args.source, args.output, bits=args.bits, target_size=args.target_size,
                      allocate=args.allocate, permute=args.permute, grouping=args.grouping,
                      calib=args.calib, keep=args.keep or (), seed=args.seed, codec=args.codec,
                      codec_for=args.codec_for or (),
                      progress=progress, encoder=encoder, strict=args.strict, **tuning, workers=args.workers,
                      ray=args.ray, device=args.device, fold_batchnorm=not args.no_fold_batchnorm,
                      tokenizer=args.tokenizer, image=_image_preprocess(args), model_code=args.model)
    if args.verbosity < 0:
        return 0
    src = f" (source files {format_size(summary.source_file_bytes)})" if summary.source_file_bytes else ""
    print(f"{summary}{src}" + ("; replaced the existing file" if replaced else ""))
    if args.verbosity >= 1:
        print(f"threads: {threads}")
        from aqformat import open as open_aqm
        with open_aqm(summary.path) as f:  # each tensor's codec as written, whichever chose it
            stored = {t.name: f"{t.codec} {t.group}" if t.group else t.codec for t in f.tensors()}
        width = max([len(n) for n in summary.compressed + summary.raw] + [6])
        print(f"{'tensor':<{width}}  {'stored as':<24} weight SQNR")
        for n in summary.compressed + summary.raw:
            sqnr = summary.weight_sqnr_db.get(n)
            how = f"affine {summary.affine_bits[n]}-bit" if n in summary.affine_bits else stored.get(n, "raw")
            print(f"{n:<{width}}  {how:<24} "
                  + (f"{sqnr:.1f} dB" if sqnr is not None else "exact"))
    return 0


def _image_preprocess(args: argparse.Namespace):
    """The image preprocessing flags, or None when none is given (defaults then apply)."""
    given = {k: getattr(args, f"image_{k}") for k in ("size", "resize", "mean", "std", "layout")}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None}
    if not given:
        return None
    from .calib_inputs import ImagePreprocess
    return ImagePreprocess(**given)


def _cmd_export(args: argparse.Namespace) -> int:
    replaced = _check_output(args.output, args.force)
    from .onnx_graph import export_onnx
    result = export_onnx(args.file, args.output)
    if args.verbosity >= 0:
        extra = f" + external data {result['external_data']}" if result["external_data"] else ""
        print(f"{result['path']}: {format_size(result['bytes'])} ONNX model{extra}"
              + ("; replaced the existing file" if replaced else ""))
    return 0


def _add_data_args(p: argparse.ArgumentParser) -> None:
    """What a conversion can learn from: ``--calib``, ``--model`` (and whether BatchNorm is folded into
    it) and ONNX calibration's preprocessing."""
    p.add_argument("--calib", metavar="PATH",
                   help="calibration inputs: .npy (one input, rows are samples), .npz (arrays keyed by "
                        "input name), a .txt of sentences (Hugging Face folders; ONNX with --tokenizer) "
                        "or, for ONNX, a folder of images; default: none, weight error is minimised")
    p.add_argument("--model", metavar="MODULE:CALLABLE",
                   help="model code for a .pt/.safetensors state_dict, so --calib, --allocate and "
                        "--finetune can run it: a class or function called with no arguments that "
                        "returns an nn.Module taking the checkpoint (mypkg.models:Net or "
                        "path/to/model.py:Net; default: none, a state_dict is coded without data)")
    p.add_argument("--no-fold-batchnorm", action="store_true",
                   help="code Conv weights as they are, BatchNorm kept apart (default: each BatchNorm after a "
                        "Conv, or an ONNX Gemm, is folded into its weights before coding)")
    _add_onnx_calib_args(p)


def _add_onnx_calib_args(p: argparse.ArgumentParser) -> None:
    """``--tokenizer`` and the image preprocessing flags of ONNX calibration."""
    p.add_argument("--tokenizer", metavar="FOLDER",
                   help="tokenizer folder (tokenizer.json) for text calibration of an ONNX model")
    img = p.add_argument_group("image calibration of ONNX models (ImageNet defaults)")
    img.add_argument("--image-size", type=int, help="centre crop side (default: the model input's, else 224)")
    img.add_argument("--image-resize", type=int, help="shorter side before the crop (default size/0.875; "
                     "the size itself for images already cut to the input)")
    img.add_argument("--image-mean", type=float, nargs=3, metavar=("R", "G", "B"),
                     help="per-channel mean of [0, 1] RGB (default 0.485 0.456 0.406)")
    img.add_argument("--image-std", type=float, nargs=3, metavar=("R", "G", "B"),
                     help="per-channel std (default 0.229 0.224 0.225)")
    img.add_argument("--image-layout", choices=("NCHW", "NHWC"),
                     help="input layout (default: from the model input's shape, else NCHW)")


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    """``--threads``, ``--workers``, ``--ray`` and ``--device``: where the encoder's work runs."""
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads (default: the cores this process may use, by CPU affinity and "
                        "cgroup quota, less those busy by the 1-minute load average; at least 1)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="train codebook groups and code tensors in N local processes of one thread each; "
                        "the file is byte-identical whatever N (default: in this process, with --threads)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="run those tasks on a Ray cluster: auto (this machine's cluster, else a local one) "
                        "or HOST:PORT; needs pip install 'aqformat[ray]' (default: no Ray)")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="where codebooks are trained and codes searched (default: cuda when present, else cpu)")


def _add_codec_args(p: argparse.ArgumentParser) -> None:
    """``--codec`` and ``--codec-for``: which codec codes the compressed tensors."""
    p.add_argument("--codec", choices=CODECS,
                   help="auto: per tensor the codec (aq, lattice or uniform, affine, fp16, raw) and setting of least "
                        "measured error per byte, all within --bits per compressed weight (codes, "
                        "scales, steps, codebooks and records counted) or --target-size; aq: additive "
                        "quantization in shared codebooks at --bits code bits; lattice: dithered "
                        "scalar quantization with entropy-coded indices, every tensor at --bits "
                        f"(default: {DEFAULT_CODEC}, or aq with --permute or --allocate, AQ's options)")
    p.add_argument("--codec-for", action="append", metavar="PATTERN:CODEC",
                   help="with --codec auto: code the tensors matching this fnmatch pattern with CODEC "
                        "(aq, uniform, lattice, affine, fp16 or raw), at the setting the budget gives them; "
                        "repeatable, the first matching pattern wins; a pattern may name small tensors "
                        "too (default: every tensor chooses)")


def _paths(p: argparse.ArgumentParser, source: str, source_help: str, output_help: str) -> None:
    """The input, ``-o`` and ``--force`` arguments that ``convert`` and ``export`` share."""
    p.add_argument(source, help=source_help)
    p.add_argument("-o", "--output", required=True, help=output_help)
    p.add_argument("--force", action="store_true", help="replace the output file if it exists (default: refuse)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``convert`` and ``export`` to the ``aqm`` subcommands."""
    p = sub.add_parser("convert", help="compress a PyTorch or ONNX model into an .aqm file",
                       description="Source type from the path: .pt/.pth/.bin (weights_only), "
                                   ".safetensors, .onnx, or a Hugging Face model folder. "
                                   "An existing output is replaced only with --force.")
    _paths(p, "source", "model file or Hugging Face folder", "the .aqm file to write")
    _add_codec_args(p)
    p.add_argument("--bits", type=float, default=4.0,
                   help="bits per compressed weight (default 4): with --codec auto the budget of the "
                        "compressed tensors' bytes; with --codec aq code bits (with --allocate, the "
                        "budget in bits per weight with every byte counted)")
    p.add_argument("--target-size", metavar="SIZE",
                   help=f"file size budget, e.g. 250kB or 5MB ({UNITS_HELP}): code bits are allocated "
                        "per tensor to land just under it, between 1 and 8 bits per weight; a size "
                        "out of reach is refused before encoding, with the reachable range (default: no budget)")
    p.add_argument("--allocate", action="store_true",
                   help="allocate bits per tensor by predicted output error: --bits per compressed "
                        "weight, every byte counted (default: every tensor gets --bits)")
    p.add_argument("--permute", action="store_true",
                   help="search a column permutation per tensor (slower, lower error; default off)")
    p.add_argument("--grouping", choices=GROUPINGS, default="by-kind",
                   help="codebook sharing across tensors (default by-kind: attention, MLP, conv, other)")
    _add_data_args(p)
    p.add_argument("--keep", action="append", metavar="PATTERN",
                   help="keep tensors matching this fnmatch pattern raw (repeatable; PATTERN:fp16 or "
                        "PATTERN:bf16 keeps them at 16 bits, float32 where a value is beyond that range; "
                        "default: none)")
    p.add_argument("--finetune", type=int, default=0, metavar="STEPS",
                   help="after coding, distil the original model into the codebooks for STEPS steps "
                        "on the --calib inputs (Hugging Face folders, ONNX models, state_dicts with --model; default 0: off)")
    p.add_argument("--finetune-lr", type=float, default=1e-3, metavar="LR",
                   help="peak learning rate of --finetune (default 1e-3)")
    p.add_argument("--finetune-raw", choices=("all", "1d"), default="all",
                   help="uncompressed tensors --finetune trains: all float ones, e.g. kept embeddings "
                        "(default), or norms and biases only")
    p.add_argument("--strict", action="store_true",
                   help="fail when the .aqm file would not be smaller than the model's tensors "
                        "(default: write it and warn)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of sampling and codebook training: same inputs and seed, same file (default 0)")
    p.add_argument("--beam", type=int, metavar="N",
                   help=f"code search beam width: larger is slower and more accurate (default {DEFAULT_BEAM})")
    p.add_argument("--iters", type=int, metavar="N",
                   help=f"codebook training iterations: more is slower and more accurate (default {DEFAULT_ITERS})")
    p.add_argument("--bits-per-code", type=_code_width, metavar="B",
                   help="AQ code width: codebooks of 2**B codewords (default 8); 'auto': the code width and "
                        "vector length measured best at equal bytes where 8-bit codebooks weigh (small models)")
    p.add_argument("--vector-dim", type=int, metavar="D",
                   help="AQ vector length: --bits is reached with bits*D/B codebooks (default 8)")
    _add_parallel_args(p)
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (default: shown when stderr is a terminal, unless -q)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("export", help="write a plain ONNX model with the decoded weights",
                       description="Write the embedded ONNX graph with every weight decoded: an ordinary "
                                   ".onnx file (weights over 1 GiB go to FILE.data beside it). An existing "
                                   "output is replaced only with --force.")
    _paths(p, "file", ".aqm file holding an ONNX graph", "the .onnx file to write")
    p.set_defaults(func=_cmd_export)
