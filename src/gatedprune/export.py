"""Export pruned (plain) models to ONNX for deployment, checked against ONNX Runtime.

``prune`` returns plain PyTorch modules (``nn.Conv1d``/``nn.Linear``/``nn.LSTM``/... and fx
graphs of the user's own modules), so they export with PyTorch's own ONNX exporter
(``torch.onnx.export(..., dynamo=True)``, the ``torch.export``-based one; models with
``nn.LSTM``/``nn.GRU``/``nn.RNN`` through the TorchScript-based one, which keeps ONNX's own
recurrent operators and a dynamic sequence length). :func:`export_onnx`
adds what deployment needs around it: gated models are refused, the chosen input dimensions
stay dynamic (batch size, sequence length), the file is written atomically, and the exported
graph is run in ONNX Runtime on the example input and a differently sized one and compared
with the PyTorch model. Needs the extra ``onnx`` (``onnx``, ``onnxscript``, ``onnxruntime``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.jit._trace import TracerWarning

from .base import GatedModule
from .hooks import computed_weight_memo
from .io import atomic_write
from .layout import check_flag
from .plain import PlainShortcutNet

__all__ = ["export_onnx", "onnx_session"]


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"ONNX export needs the {module} package: pip install 'gatedprune[onnx]'"
        ) from e


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's informational logging and torch-internal deprecation noise."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            # nn.LSTM/GRU re-assign their flat weight list while traced (torch's own code)
            warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights")
            # shape checks traced as constants; the runtime check runs other shapes instead
            warnings.filterwarnings("ignore", category=TracerWarning)
            warnings.filterwarnings("ignore", message=r"Exporting a model to ONNX with a batch")
            yield
    finally:
        log.setLevel(level)


def onnx_session(path: str | Path | bytes, *, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for an exported model (a file or its bytes), with
    ``threads`` intra-op threads (default: ONNX Runtime's own choice).

    >>> import torch, gatedprune
    >>> s = onnx_session(gatedprune.export_onnx(torch.nn.Linear(3, 2), torch.zeros(1, 3),
    ...                                         "/tmp/gp_linear.onnx"), threads=1)
    >>> s.run(None, {"x": torch.zeros(5, 3).numpy()})[0].shape
    (5, 2)
    """
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int):
            raise TypeError(f"threads must be a positive int or None, got {threads!r}")
        if threads < 1:
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    if not isinstance(path, bytes | str | os.PathLike):
        raise TypeError(
            f"onnx_session expects a path or the model's bytes, got {type(path).__name__}"
        )
    if not isinstance(path, bytes) and not Path(path).is_file():
        raise FileNotFoundError(f"onnx_session: no ONNX file at {str(path)!r}")
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _check_dims(example: Tensor, dynamic_dims: Sequence[int]) -> tuple[int, ...]:
    if isinstance(dynamic_dims, str | bytes) or not isinstance(dynamic_dims, Sequence):
        raise TypeError(
            f"dynamic_dims must be a sequence of input dimensions such as (0,), got "
            f"{dynamic_dims!r}"
        )
    dims: list[int] = []
    for d in dynamic_dims:
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < example.dim():
            raise ValueError(
                f"dynamic_dims must be dimensions of the {example.dim()}-dim example input, "
                f"got {d!r}"
            )
        dims.append(d)
    return tuple(sorted(set(dims)))


def _resized(example: Tensor, dims: tuple[int, ...]) -> Tensor:
    """A random input whose dynamic dimensions differ from the example's (size + 2): normal
    values for a floating input; for integer or bool inputs (token ids) values drawn from the
    example's own, so they stay in the range the model takes.

    >>> _resized(torch.tensor([[3, 7]]), (0, 1)).unique().tolist()
    [3, 7]
    """
    shape = [s + 2 if d in dims else s for d, s in enumerate(example.shape)]
    gen = torch.Generator().manual_seed(0)
    if example.is_floating_point():
        return torch.randn(shape, dtype=example.dtype, generator=gen).to(example.device)
    values = example.detach().reshape(-1).cpu()  # (N,)
    if values.numel() == 0:
        return example.new_zeros(shape)
    pick = torch.randint(values.numel(), shape, generator=gen)  # same shape as the result
    return values[pick].to(example.device)


def export_onnx(
    model: nn.Module,
    example_input: Tensor | tuple[Tensor],
    path: str | Path,
    *,
    dynamic_dims: Sequence[int] = (0,),
    check: bool = True,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> Path:
    """Export a plain (pruned) ``model`` to an ONNX file at ``path`` and return the path.

    The input dimensions in ``dynamic_dims`` (default: the batch, dim 0; add 1 for the
    sequence length of batch-first recurrent models) stay dynamic in the graph, and the same
    dimensions of the output are named dynamic. The file is written atomically (a temporary
    file renamed into place). With ``check`` the graph is run in ONNX Runtime on
    ``example_input`` and on an input whose dynamic dimensions are 2 larger (for an integer
    input such as token ids, with values drawn from the example's), and a
    ``ValueError`` is raised if an output differs from the model's by more than
    ``atol + rtol * max|output|`` (ONNX Runtime fuses and reorders float32 operations, e.g.
    BatchNorm into the convolution, so its rounding grows with the outputs' scale).
    The model is exported in eval mode; its train/eval mode is restored afterwards.

    ``check`` must be a bool (``TypeError`` otherwise). The folder of ``path`` must exist
    (``FileNotFoundError`` naming it, ``NotADirectoryError`` for a file, as
    :func:`gatedprune.save`; it is not created) and a
    path ending in ``/`` is a ``ValueError``, both checked before exporting. The model is
    first run on ``example_input``: if that fails (say, a wrong shape), a ``ValueError``
    names the input's shape.

    >>> import torch, gatedprune
    >>> net = gatedprune.ShortcutConv1d(1, [[8], [8]], 3, input_length=16)
    >>> small = gatedprune.prune(net.eval())
    >>> gatedprune.export_onnx(small, torch.randn(2, 1, 16), "/tmp/gp_small.onnx").name
    'gp_small.onnx'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx expects a torch.nn.Module, got {type(model).__name__}")
    gated = [type(m).__name__ for m in model.modules() if isinstance(m, GatedModule)]
    if gated:
        raise TypeError(
            f"{type(model).__name__} still has gates ({gated[0]}): export the pruned model, "
            "gatedprune.prune(model.eval())"
        )
    if type(example_input) is tuple and len(example_input) == 1:
        example_input = example_input[0]  # a tuple of one tensor is that tensor
    if type(example_input) is tuple:
        raise TypeError(
            "export_onnx exports models with one input tensor; example_input is a tuple of "
            f"{len(example_input)} inputs (multi-input models are not supported)"
        )
    if not isinstance(example_input, Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    if example_input.is_complex():
        raise TypeError(
            f"example_input must be a real (floating, integer or bool) tensor, got dtype "
            f"{example_input.dtype}"
        )
    dims = _check_dims(example_input, dynamic_dims)
    for name, tol in (("atol", atol), ("rtol", rtol)):
        if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 <= tol < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0, got {tol!r}")
    spatial = [m for m in model.modules() if isinstance(m, PlainShortcutNet) and m.spec.spatial]
    if spatial and any(d >= 2 for d in dims):  # its pooled read-out follows the length
        raise ValueError(
            f"dynamic_dims {dims}: the length of a pruned ShortcutConv1d cannot be dynamic in "
            "ONNX (its pooling windows and read-out are traced at the example's length, so the "
            "graph would be wrong at another one); export at the length you run, with "
            "dynamic_dims=(0,)"
        )
    check = check_flag("check", check)  # "no" would be truthy: run the check
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    raw = os.fspath(path)
    raw = os.fsdecode(raw) if isinstance(raw, bytes) else raw
    if raw.endswith(("/", os.sep)):  # Path() would drop the slash and name a file
        raise ValueError(f"path {raw!r} names a folder; give a file name such as model.onnx")
    _require("onnxscript")
    onnx = _require("onnx")
    path = Path(raw)
    if path.is_dir():
        raise ValueError(f"path {str(path)!r} is a directory; give a file name such as model.onnx")
    folder = Path(os.path.realpath(path)).parent if path.is_symlink() else path.parent
    if not folder.is_dir():  # refused like gatedprune.save, before the (slow) export
        if folder.exists():
            raise NotADirectoryError(f"cannot write {path}: {folder} is not a directory")
        raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist")
    modes = [(m, m.training) for m in model.modules()]  # submodules may differ from the root
    model.eval()
    try:
        out_dims = _output_dynamic_dims(model, example_input, dims)
        proto = _export_proto(model, example_input, dims, out_dims, onnx)
        for out in proto.graph.output[:1]:  # name the dynamic dims of the output as well
            for d, dim in enumerate(out.type.tensor_type.shape.dim):
                if d in out_dims:
                    dim.dim_param = f"dim{d}"
        data = proto.SerializeToString()
        if check:
            _check_against_runtime(model, data, example_input, dims, atol, rtol)
        onnx.checker.check_model(proto)
        atomic_write(path, data)
    finally:
        for m, training in modes:
            m.training = training
    return path


def _output_dynamic_dims(model: nn.Module, example: Tensor, dims: tuple[int, ...]) -> set[int]:
    """The dimensions in ``dims`` of the model's (first) output whose size follows the input's:
    those that change when the dynamic input dimensions do. A dimension of fixed size (say,
    the classes after pooling over the sequence) stays fixed in the graph.

    A ``ValueError`` naming the example's shape if the model fails on the example itself
    (rather than an exporter error deep inside ``torch.export``)."""
    try:
        with torch.no_grad():
            first_out = model(example)
    except Exception as e:  # any failure of the user's forward on the user's input
        raise ValueError(
            f"export_onnx: the model fails on example_input of shape {tuple(example.shape)} "
            f"(dtype {example.dtype}): {type(e).__name__}: {e}; pass an input the model "
            "accepts"
        ) from e
    try:
        with torch.no_grad():
            outs = [first_out, model(_resized(example, dims))]
    except (RuntimeError, ValueError, TypeError, IndexError):
        return set(dims)  # a model that only runs at the example's size: name the dims as asked
    first = [o[0] if isinstance(o, tuple | list) and o else o for o in outs]
    if not all(isinstance(o, Tensor) for o in first):
        return set(dims)  # unknown output structure: name the dims as asked
    a, b = cast(list[Tensor], first)
    if a.dim() != b.dim():
        return set(dims)
    return {d for d in dims if d < a.dim() and a.shape[d] != b.shape[d]}


class _OneZeroFeature(nn.Module):
    """Runs recurrent module ``rnn`` (``input_size=1``, zero ``W_ih``) on its input of width 0
    widened by one zero feature: the same function as the ``input_size=0`` module it replaces
    in the exported copy (ONNX Runtime's GRU operator aborts the process on an input of width
    0)."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: Tensor, hx: Any = None) -> Any:
        if x.shape[-1] != 0:
            raise ValueError(f"expected an input of width 0, got shape {tuple(x.shape)}")
        zero = x.new_zeros((*x.shape[:-1], 1))  # (B, T, 1) / (T, B, 1)
        return self.rnn(zero, hx)


def _widen_zero_inputs(model: nn.Module) -> nn.Module:
    """``model``, or a copy of it whose recurrent modules with ``input_size=0`` read one zero
    input feature through a zero weight column instead (:class:`_OneZeroFeature`)."""
    if not any(isinstance(m, nn.RNNBase) and m.input_size == 0 for m in model.modules()):
        return model
    model = copy.deepcopy(model, computed_weight_memo(model))
    targets: list[tuple[str, nn.RNNBase]] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.RNNBase) and m.input_size == 0:
            targets.append((name, m))
    for name, rnn in targets:
        for sfx in ("", "_reverse") if rnn.bidirectional else ("",):
            w = getattr(rnn, f"weight_ih_l0{sfx}")  # (G H, 0)
            column = nn.Parameter(w.new_zeros((w.shape[0], 1)))  # (G H, 1)
            setattr(rnn, f"weight_ih_l0{sfx}", column)  # RNNBase.__setattr__ refreshes its list
        rnn.input_size = 1
        if name == "":
            return _OneZeroFeature(rnn)
        model.set_submodule(name, _OneZeroFeature(rnn))
    return model


def _export_proto(
    model: nn.Module,
    example: Tensor,
    dims: tuple[int, ...],
    out_dims: set[int],
    onnx: Any,
) -> Any:
    """The ONNX graph of ``model``: the ``torch.export``-based exporter, except for models with
    recurrent modules. Those go through the TorchScript-based exporter, which emits ONNX's own
    ``LSTM``/``GRU``/``RNN`` operators with a dynamic sequence length; the ``torch.export``
    path decomposes them into one step per time step and fixes the length."""
    with _quiet_exporter(), torch.no_grad():
        if any(isinstance(m, nn.RNNBase) for m in model.modules()):
            axes = {d: f"dim{d}" for d in dims}
            y_axes = {d: f"dim{d}" for d in sorted(out_dims)}
            buffer = io.BytesIO()
            torch.onnx.export(
                _widen_zero_inputs(model),
                (example,),
                cast(Any, buffer),  # the exporter writes to file objects too
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": axes, "y": y_axes},
                dynamo=False,
            )
            return onnx.load_from_string(buffer.getvalue())
        shapes = ({d: torch.export.Dim(f"dim{d}", min=1) for d in dims},)
        program = torch.onnx.export(
            model,
            (example,),
            input_names=["x"],
            output_names=["y"],
            dynamic_shapes=shapes,
            dynamo=True,
            verbose=False,
        )
    if program is None:  # only with dynamo=False
        raise RuntimeError("torch.onnx.export returned no program")
    return program.model_proto


def _check_against_runtime(
    model: nn.Module,
    data: bytes,
    example: Tensor,
    dims: tuple[int, ...],
    atol: float,
    rtol: float,
) -> None:
    session = onnx_session(data)
    for x in (example, _resized(example, dims)):
        with torch.no_grad():
            expected = model(x)
        if not isinstance(expected, Tensor):
            raise TypeError(
                f"export_onnx checks models with one tensor output; got {type(expected).__name__}"
                " (pass check=False to export without the check)"
            )
        got = torch.from_numpy(session.run(None, {"x": x.detach().cpu().numpy()})[0])
        if got.shape != expected.shape:
            raise ValueError(
                f"the exported graph gives shape {tuple(got.shape)} for input "
                f"{tuple(x.shape)}, the model {tuple(expected.shape)}"
            )
        diff = float((got - expected.cpu()).abs().max()) if got.numel() else 0.0
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        if not diff <= atol + rtol * scale:
            raise ValueError(
                f"the exported graph differs from the model by {diff:.3g} > atol + rtol * "
                f"max|output| = {atol:g} + {rtol:g} * {scale:.3g} on an input of shape "
                f"{tuple(x.shape)}"
            )
