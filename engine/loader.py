"""Loads one stage and one TP shard of a Hugging Face safetensors checkpoint, reading only its tensors."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from hexgen.engine.layers import Linear, Piece
from hexgen.engine.prequantized import PackedError, concat, packed_name, read_grouped
from hexgen.engine.quant import QuantizedWeight, check_scheme
from hexgen.engine.quant_bytes import Prequantized
from hexgen.engine.stage import StageModel


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded: missing files or tensors, wrong shapes."""


ProgressFn = Callable[[int, int], None]
_PROGRESS_MIN_BYTES = 512 << 20


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: those named by ``model.safetensors.index.json`` or every
    ``*.safetensors`` file in the directory."""
    root = Path(model_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    index = root / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: malformed index ({exc})") from None
        files = sorted({root / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{root}: shard files named in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in root.glob("*.bin"))
        hint = f" (found {', '.join(pickles)}: convert them to safetensors)" if pickles else ""
        raise CheckpointError(f"{root}: no *.safetensors weights{hint}")
    return files


def load_weights(
    model: StageModel,
    model_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    progress: ProgressFn | None = None,
    quantize: str | None = None,
) -> None:
    """Fill every parameter of ``model`` from the checkpoint pieces its ``weight_plan`` names.

    ``quantize`` ("int8" or "int4", engine.quant) quantizes each linear layer's weight as it is read, so
    only one layer's weight is ever held in full precision; embeddings, norms, the head and an MoE router
    stay in ``dtype``. A checkpoint that ships its linear weights quantized (GPTQ, AWQ: the config's
    ``prequantized``) is loaded as it ships them, and ``quantize`` must be None.

    Only the named tensors are read, and of those only the slices this shard keeps. ``progress(done,
    total)`` hears the checkpoint bytes this shard has read of those it reads, after each parameter. Raises
    CheckpointError for a missing tensor, a slice outside a tensor, or a shape that does not match.
    """
    plan = model.weight_plan()
    params = dict(model.named_parameters())
    unplanned = sorted(set(params) - set(plan))
    if unplanned:
        raise AssertionError(f"weight plan misses parameters {unplanned}")
    shipped = model.config.prequantized
    if shipped is not None and quantize is not None:
        raise CheckpointError(f"{model_dir}: its weights ship quantized ({shipped.name}); load it without quantize")
    targets = quantized_linears(model) if check_scheme(quantize) else {}
    linears = _linears(model) if shipped is not None else {}
    held = set(quantized_linears(model))  # what a shipped quantized linear stays: all but an MoE router
    device = torch.device(device)
    with ExitStack() as stack:
        files = checkpoint_files(model_dir)
        handles = [stack.enter_context(_open(f)) for f in files]
        where = {name: h for h in handles for name in h.keys()}  # noqa: SIM118 - safe_open is not a mapping
        sizes = {name: sum(_piece_bytes(where, piece, shipped) for piece in pieces) for name, pieces in plan.items()}
        total = sum(sizes.values())
        done = 0
        report = progress or _default_progress(sum(f.stat().st_size for f in files))
        for param_name, pieces in plan.items():
            if shipped is not None and param_name in linears and _has(where, packed_name(pieces[0])):
                keep = param_name in held
                _load_packed(where, pieces, linears[param_name], shipped, keep, dtype, device)
            else:
                tensor = _read_all(where, pieces, tuple(params[param_name].shape), model_dir)
                if quantize and param_name in targets:
                    targets[param_name].quantize(tensor, quantize, dtype, device)
                else:
                    params[param_name].data = tensor.to(device=device, dtype=dtype)
            done += sizes[param_name]
            if report is not None:
                report(done, total)


def _read_all(
    where: dict[str, Any], pieces: list[Piece], shape: tuple[int, ...], model_dir: str | Path
) -> torch.Tensor:
    """The pieces of one parameter read and stacked; CheckpointError where they do not make ``shape``."""
    tensor = torch.cat([_read(where, piece) for piece in pieces]) if len(pieces) > 1 else _read(where, pieces[0])
    if tuple(tensor.shape) != shape:
        names = ", ".join(p.name for p in pieces)
        raise CheckpointError(
            f"{model_dir}: tensor {names} has shape {list(tensor.shape)} where the config implies "
            f"{list(shape)} for this shard"
        )
    return tensor


def _linears(model: StageModel) -> dict[str, Linear]:
    return {f"{name}.weight": module for name, module in model.named_modules() if isinstance(module, Linear)}


def _has(where: dict[str, Any], name: str) -> bool:
    try:
        _resolve(where, name)
    except CheckpointError:
        return False
    return True


def _load_packed(
    where: dict[str, Any],
    pieces: list[Piece],
    linear: Linear,
    shipped: Prequantized,
    keep: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """A linear the checkpoint ships packed: held quantized as it ships where ``keep`` and its pieces share
    their groups, else dequantized (an MoE router; q, k and v with act-order groups of their own)."""

    def fetch(name: str) -> Any:
        handle, found = _resolve(where, name)
        return handle.get_slice(found)

    try:
        parts = [read_grouped(fetch, piece, shipped) for piece in pieces]
    except PackedError as exc:
        raise CheckpointError(str(exc)) from None
    assert linear.weight is not None  # a linear holds its parameter until it is loaded
    shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])
    if shape != tuple(linear.weight.shape) or any(p.shape[1] != shape[1] for p in parts):
        names = ", ".join(packed_name(p) for p in pieces)
        raise CheckpointError(
            f"tensor {names} unpacks to {[list(p.shape) for p in parts]} where the config implies "
            f"{list(linear.weight.shape)} for this shard"
        )
    grouped = concat(parts) if keep else None
    if grouped is None:
        linear.weight.data = torch.cat([p.dequantized() for p in parts]).to(device, dtype)
    else:
        linear.quantized = QuantizedWeight(grouped, shipped.method, dtype, device)
        linear.weight = None


def quantized_linears(model: StageModel) -> dict[str, Linear]:
    """The linear layers a quantized load quantizes, by their weight's parameter name: all but an MoE
    router (a ``gate``), whose top-k choice small errors would change."""
    return {
        f"{name}.weight": module
        for name, module in model.named_modules()
        if isinstance(module, Linear) and name.rpartition(".")[2] != "gate"
    }


def _open(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:  # a corrupt header; a missing or unreadable file
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def _resolve(where: dict[str, Any], name: str) -> tuple[Any, str]:
    for candidate in (name, name.removeprefix("model."), f"model.{name}"):
        if candidate in where:
            return where[candidate], candidate
    raise CheckpointError(f"checkpoint lacks tensor {name!r}")


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2}


def _piece_bytes(where: dict[str, Any], piece: Piece, shipped: Prequantized | None = None) -> int:
    """Checkpoint bytes a piece reads (its slice of the tensor, or of the packed tensors standing for it),
    from the header alone; 0 when the tensor is missing (``_read`` reports that)."""
    try:
        handle, name = _resolve(where, piece.name)
    except CheckpointError:
        return _packed_bytes(where, piece, shipped) if shipped is not None else 0
    view = handle.get_slice(name)
    shape = [int(n) for n in view.get_shape()]
    if piece.dim is not None and piece.dim < len(shape):
        shape[piece.dim] = max(0, min(piece.end, shape[piece.dim]) - piece.start)
    return math.prod(shape) * _DTYPE_BYTES.get(view.get_dtype(), 1)


def _packed_bytes(where: dict[str, Any], piece: Piece, shipped: Prequantized) -> int:
    """What engine.prequantized reads for a piece: its share of ``X.qweight`` (outputs along its dim 1, inputs
    along its dim 0, packed 32 / bits to an int32 along the input in GPTQ, along the output in AWQ) and all of
    ``X.qzeros``, ``X.scales`` and ``X.g_idx``."""
    base = piece.name.removesuffix(".weight")
    rest = sum(_piece_bytes(where, Piece(f"{base}.{part}")) for part in ("qzeros", "scales", "g_idx"))
    whole = _piece_bytes(where, Piece(f"{base}.qweight"))
    if piece.dim is None or whole == 0:
        return whole + rest
    along = 1 - piece.dim
    handle, name = _resolve(where, f"{base}.qweight")
    per = 32 // shipped.bits if (shipped.method == "gptq") == (along == 0) else 1
    size = int(handle.get_slice(name).get_shape()[along]) * per
    return whole * (piece.end - piece.start) // max(size, 1) + rest


def _read(where: dict[str, Any], piece: Piece) -> torch.Tensor:
    handle, name = _resolve(where, piece.name)
    if piece.dim is None:
        whole: torch.Tensor = handle.get_tensor(name)
        return whole
    view = handle.get_slice(name)
    shape = view.get_shape()
    if piece.dim >= len(shape) or piece.end > shape[piece.dim]:
        raise CheckpointError(
            f"tensor {name!r} has shape {list(shape)}; this shard needs [{piece.start}:{piece.end}] along dim {piece.dim}"
        )
    tensor: torch.Tensor = view[piece.start : piece.end] if piece.dim == 0 else view[:, piece.start : piece.end]
    if piece.pad_to > tensor.shape[piece.dim]:
        pad_shape = list(tensor.shape)
        pad_shape[piece.dim] = piece.pad_to - tensor.shape[piece.dim]
        tensor = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=piece.dim)
    return tensor


def _default_progress(size: int) -> ProgressFn | None:
    """A one-line stderr progress bar, only for loads big enough to keep someone waiting."""
    if size < _PROGRESS_MIN_BYTES:
        return None
    start = time.monotonic()

    def report(done: int, total: int) -> None:
        width = 30
        filled = width * done // total
        elapsed = time.monotonic() - start
        sys.stderr.write(f"\rloading weights [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {elapsed:.0f}s")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return report
