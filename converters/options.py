"""Typed settings of a conversion.

The public functions (:func:`aqformat.converters.from_torch`, ``from_onnx``,
``convert``, ``finetune``) take readable keyword arguments and build these
frozen dataclasses once; the pipeline passes them on whole.

* :class:`ConvertOptions`: what is compressed, at what rate, by which codec;
* :class:`EncoderOptions`: the AQ encoder's codebook shape and search effort;
* :class:`FinetuneOptions`: distillation after coding;
* :class:`AQConfig`: the resolved setting of one AQ codebook group.

Rates are named for their unit: ``bits_per_weight`` is the code rate of a
compressed tensor, ``bits_per_code`` the width of one AQ code (``K = 2**b``).
"""
from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from aqformat.codecs import aq as aq_codec
from aqformat.codecs import lattice as lattice_codec
from aqformat.errors import AqmInputError
from aqformat.units import parse_size

__all__ = ["SearchEffort", "AQConfig", "EncoderOptions", "ConvertOptions", "FinetuneOptions", "GROUPINGS", "CODECS",
           "AUTO", "CODEBOOK_CODECS", "ENCODERS", "DEFAULT_CODEC", "DEFAULT_MIN_ELEMENTS", "resolve_codec"]

GROUPINGS = ("shared", "per-layer", "by-kind")  # codebook sharing across tensors
# The encoders a conversion can use: codec name -> "module:class" in aqformat.converters
# (the interface is aqformat.converters.encoders.TensorEncoder).
AUTO = "auto"  # not a codec of the format: the per-tensor choice among them (codec_choice.py)
ENCODERS = {aq_codec.NAME: "aq_encode:AQEncoder", lattice_codec.NAME: "lattice:LatticeEncoder",
            AUTO: "codec_choice:AutoEncoder"}
CODECS = tuple(ENCODERS)
CODEBOOK_CODECS = (aq_codec.NAME, AUTO)  # the --codec values whose encoder may train AQ codebooks
DEFAULT_CODEC = AUTO  # a conversion that names no codec; AQ where it asks for an AQ option (resolve_codec)
DEFAULT_MIN_ELEMENTS = 4096
DEFAULT_BITS_PER_CODE = 8  # K = 256 codewords
DEFAULT_VECTOR_DIM = 8


def resolve_codec(codec: str | None, *, permute: bool = False, allocate: bool = False) -> str:
    """The codec of a conversion: ``codec``, or where it is None the default, :data:`DEFAULT_CODEC`
    (``auto``), unless an option that belongs to AQ is set: ``permute`` or ``allocate`` (auto
    allocates by itself and has no permutation).

    Fine-tuning keeps the default: it trains AQ codebooks and scales, biases and norms, while a
    lattice or uniform tensor stays as coded, and still an auto file fine-tuned was smaller and
    closer to the original than an AQ one on EfficientNet-Lite0 (3 bits, 256 photo crops, 600
    steps: 10.6x at top-1 agreement 0.81 against 9.8x at 0.775) and on the digits CNN (2 bits:
    15.3 kB at agreement 0.991 against 31.1 kB at 0.993)."""
    if codec is not None:
        return codec
    return aq_codec.NAME if permute or allocate else DEFAULT_CODEC


@dataclass(frozen=True)
class SearchEffort:
    """How hard the AQ encoder searches (speed against quality).

    Parameters
    ----------
    beam : int
        Beam width of the code search.
    iters : int
        Alternations of codebook least squares and code search in training.
    feedback : bool or "auto"
        GPTQ-style error feedback across column blocks (else each block is
        coded independently under the diagonal block of ``H``). ``"auto"``
        (default) codes both ways and keeps, per row, the lower output error:
        feedback halves the held-out output error of most MiniLM layers but
        diverges on ill-conditioned ``H`` (its MLP output layers, 1536 input
        columns), where the per-row choice keeps the plain coding. On MiniLM
        (403 calibration sentences, shared 4x8-bit codebooks over 8-vectors)
        the embedding cosine went from 0.974 to 0.989 at 4 bits and from
        0.933 to 0.970 at 3 bits, for twice the encoding time. Without
        calibration only the plain coding runs.
    damp : float
        Relative damping added to ``diag(H)`` before inverting it.
    """

    beam: int = 8
    iters: int = 6
    feedback: bool | str = "auto"
    damp: float = 0.01


@dataclass(frozen=True)
class AQConfig(SearchEffort):
    """Settings of one codebook group and of its encoder (the search effort of :class:`SearchEffort`).

    Parameters
    ----------
    M, b, d : int
        Codebooks per vector, bits per code (``K = 2**b``), vector length.
        These are the format parameters shared by every tensor of a group.
    """

    M: int = 2
    b: int = 8
    d: int = 8

    def __post_init__(self) -> None:
        if not (1 <= self.b <= 16 and self.M >= 1 and self.d >= 1 and self.beam >= 1
                and self.feedback in (True, False, "auto")):
            raise AqmInputError(f"invalid AQ config {self}")

    @property
    def K(self) -> int:
        """Codewords per codebook."""
        return 1 << self.b

    @property
    def code_bits(self) -> float:
        """Code bits per weight (ignoring padding, scales and codebooks)."""
        return self.M * self.b / self.d

    def codebook_bytes(self) -> int:
        """Bytes of the group's fp16 codebooks."""
        return 2 * self.M * self.K * self.d


@dataclass(frozen=True)
class EncoderOptions(SearchEffort):
    """Settings of the AQ encoder shared by every codebook group of a conversion.

    Parameters
    ----------
    beam, iters, feedback, damp
        Search effort (:class:`SearchEffort`).
    bits_per_code : int or "auto", optional
        Bits of one code (``K = 2**bits_per_code`` codewords per codebook); default 8.
        ``"auto"``: the code width and the vector length are chosen by measured rate and
        distortion where 8-bit codebooks weigh (:mod:`aqformat.converters.shape_choice`).
    d : int, optional
        Vector length; default 8.
    reservoir : int
        Training vectors sampled per codebook group.
    perm_iters : int
        Rounds of the column permutation search (``permute``).
    """

    bits_per_code: int | str | None = None
    d: int | None = None
    reservoir: int = 1 << 16
    perm_iters: int = 2000

    def __post_init__(self) -> None:
        if self.bits_per_code == AUTO and self.d is not None:
            raise AqmInputError("bits_per_code 'auto' chooses the vector length too: give no d with it")
        if not (self.bits_per_code in (None, AUTO) or isinstance(self.bits_per_code, int)):
            raise AqmInputError(f"bits_per_code must be a number of bits or 'auto', not {self.bits_per_code!r}")

    @property
    def code_width(self) -> int:
        """Bits of one code: ``bits_per_code``, 8 where not given (or still to be chosen)."""
        return DEFAULT_BITS_PER_CODE if self.bits_per_code in (None, AUTO) else int(self.bits_per_code)

    @property
    def vector_dim(self) -> int:
        """Vector length: ``d``, 8 where not given."""
        return DEFAULT_VECTOR_DIM if self.d is None else int(self.d)

    @property
    def choose_shape(self) -> bool:
        """Whether the code width and vector length are to be chosen (``bits_per_code="auto"``)."""
        return self.bits_per_code == AUTO

    @classmethod
    def of(cls, value: EncoderOptions | Mapping[str, Any] | None) -> EncoderOptions:
        """``value`` itself, the defaults for ``None``, or the options a mapping names."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise AqmInputError(f"encoder must be EncoderOptions or a mapping, not {type(value).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = set(value) - set(known)
        if unknown:
            raise AqmInputError(f"unknown encoder option(s) {sorted(unknown)} (known: {', '.join(known)})")
        return cls(**value)

    def exact(self, bits_per_weight: float) -> bool:
        """Whether ``bits_per_weight`` is a whole number of codebooks (``bits * d / b``); other
        rates mix the two code widths around them."""
        M = bits_per_weight * self.vector_dim / self.code_width
        return abs(M - round(M)) < 1e-9

    def config(self, bits_per_weight: float) -> AQConfig:
        """The group setting of about ``bits_per_weight`` code bits: ``M = bits * d / b`` rounded.

        Raises :class:`AqmInputError` naming the reachable range (1 to 64 codebooks of ``b``
        bits over ``d``-vectors) when ``bits_per_weight`` is outside it.
        """
        b, d = self.code_width, self.vector_dim
        M = int(round(bits_per_weight * d / b))
        if not (b / d - 1e-9 <= bits_per_weight <= 64 * b / d + 1e-9 and 1 <= M <= 64):
            raise AqmInputError(f"bits={bits_per_weight:g} is out of reach: {b}-bit codes over {d}-vectors "
                                f"(1 to 64 codebooks) code {b / d:g} to {64 * b / d:g} bits per weight; "
                                "give bits in that range, or another bits_per_code or d")
        return AQConfig(M=M, b=b, d=d, beam=self.beam, iters=self.iters, feedback=self.feedback,
                        damp=self.damp)


@dataclass(frozen=True)
class ConvertOptions:
    """What a conversion compresses, at which rate and with which codec.

    Parameters
    ----------
    bits_per_weight : float
        Code bits per compressed weight (AQ: ``M = bits * d / b``; lattice:
        the entropy target of the dithered quantizer).
    target_size : int, optional
        File size budget in bytes (AQ): bits are allocated per tensor to fit it.
    target_text : str, optional
        The budget as the user wrote it (e.g. ``"250kB"``): messages use its units.
    allocate : bool
        Allocate bits per tensor at ``bits_per_weight`` with every byte counted (AQ).
    permute : bool
        Search a column permutation per tensor (AQ).
    grouping : {"shared", "per-layer", "by-kind"}
        Codebook sharing across tensors (AQ).
    keep : tuple of str
        fnmatch patterns of tensors stored raw.
    keep_half : tuple of (str, str)
        Those of ``keep`` stored at 16 bits instead: ``(pattern, "float16" or "bfloat16")``
        (``--keep PATTERN:fp16`` / ``:bf16``; a tensor beyond the format's range stays float32).
    min_elements : int
        Smallest tensor compressed.
    seed : int
        Seed of sampling, training and dithers (same inputs, same file).
    progress : bool
        Show progress bars on stderr.
    codec : {"aq", "lattice", "auto"}
        The encoder of the compressed tensors; ``"auto"`` chooses per tensor among AQ, the
        lattice, affine, float16 and raw by measured error per byte
        (:mod:`aqformat.converters.codec_choice`).
    codec_for : tuple of (str, str)
        With ``"auto"``: ``(pattern, codec)`` pairs forcing the codec of the tensors a pattern
        matches (``--codec-for PATTERN:CODEC``).
    encoder : EncoderOptions
        AQ encoder settings.
    strict : bool
        A conversion that would not make the file smaller than the model's tensors is an
        error (default: a warning).
    workers : int, optional
        Local worker processes that train codebook groups and code tensors
        (:mod:`aqformat.converters.parallel`); None: everything in this process.
    ray : str, optional
        Run those tasks on a Ray cluster instead: ``"auto"`` or its address.
    device : str, optional
        Where codebooks are trained and codes searched (``"cpu"``, ``"cuda"``);
        default: CUDA when present, else the CPU.
    """

    bits_per_weight: float = 4.0
    target_size: int | None = None
    target_text: str | None = None
    allocate: bool = False
    permute: bool = False
    grouping: str = "by-kind"
    keep: tuple[str, ...] = ()
    keep_half: tuple[tuple[str, str], ...] = ()
    min_elements: int = DEFAULT_MIN_ELEMENTS
    seed: int = 0
    progress: bool = True
    codec: str = DEFAULT_CODEC
    codec_for: tuple[tuple[str, str], ...] = ()
    encoder: EncoderOptions = field(default_factory=EncoderOptions)
    strict: bool = False
    workers: int | None = None
    ray: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise AqmInputError(f"workers must be a number of processes >= 1, got {self.workers!r}")
        if self.device is not None and str(self.device).split(":")[0] not in ("cpu", "cuda"):
            raise AqmInputError(f"device must be cpu or cuda, got {self.device!r}")
        bits = self.bits_per_weight
        if isinstance(bits, bool) or not isinstance(bits, numbers.Real) or not 0 < bits <= 64:
            raise AqmInputError(f"bits must be a number of bits per weight in (0, 64], got {bits!r}")
        if self.grouping not in GROUPINGS:
            raise AqmInputError(f"grouping must be one of {', '.join(GROUPINGS)}, not {self.grouping!r}")
        if self.codec not in CODECS:
            raise AqmInputError(f"codec must be one of {', '.join(CODECS)}, not {self.codec!r}")
        if self.codec_for and self.codec != AUTO:
            raise AqmInputError("--codec-for forces codecs within the per-tensor choice: use it with --codec auto")
        if self.codec in CODEBOOK_CODECS:
            self.encoder.config(self.bits_per_weight)  # invalid settings fail before any work
        if self.codec == AUTO and (self.permute or self.allocate):
            raise AqmInputError("--permute and --allocate are AQ options (auto allocates by itself): "
                                "use them with --codec aq, or leave --codec out")
        elif self.codec == lattice_codec.NAME and (self.target_size is not None or self.allocate or self.permute):
            raise AqmInputError("the lattice codec codes every tensor at one rate: "
                                "target size, allocation and permutation are AQ options")
        elif self.codec == lattice_codec.NAME and not 0 < self.bits_per_weight < 32:
            raise AqmInputError(f"lattice bits must be in (0, 32), got {self.bits_per_weight}")

    @classmethod
    def build(cls, *, bits: float, target_size: int | str | None, keep: Iterable[str],
              encoder: EncoderOptions | Mapping[str, Any] | None, codec_for: Iterable[str] = (),
              codec: str | None = None, **rest: Any) -> ConvertOptions:
        """From the public keyword arguments: ``codec`` resolved (:func:`resolve_codec`),
        ``target_size`` parsed, ``encoder`` typed, ``keep``
        patterns split into raw and 16-bit ones (:func:`aqformat.converters.half.split_keep`),
        ``codec_for`` ``PATTERN:CODEC`` strings parsed
        (:func:`aqformat.converters.codec_choice.parse_codec_for`)."""
        from .codec_choice import parse_codec_for
        from .half import split_keep
        plain, halves = split_keep(keep)
        return cls(bits_per_weight=bits, keep=plain, keep_half=halves, encoder=EncoderOptions.of(encoder),
                   codec_for=parse_codec_for(codec_for),
                   codec=resolve_codec(codec, permute=rest.get("permute", False),
                                       allocate=rest.get("allocate", False)),
                   target_size=parse_size(target_size) if target_size is not None else None,
                   target_text=None if target_size is None else str(target_size), **rest)


@dataclass(frozen=True)
class FinetuneOptions:
    """Distillation of a coded file (see :func:`aqformat.converters.finetune`).

    ``steps`` 0 means no fine-tuning; the other fields are as in ``finetune``.
    """

    steps: int = 0
    lr: float = 1e-3
    train_raw: str = "all"
    refresh_every: int = 0
    seed: int = 0
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise AqmInputError(f"finetune steps must be >= 0, got {self.steps}")
        if self.refresh_every < 0:
            raise AqmInputError("refresh_every must be >= 0")
        if self.train_raw not in ("all", "1d"):
            raise AqmInputError(f"train_raw must be 'all' or '1d', got {self.train_raw!r}")
