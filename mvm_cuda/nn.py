"""Sampling units for a CNN's conv part, and their insertion into a trained model.

A unit sits right after a ReLU and sees that ReLU's NCHW activation h (N, C, H, W).
Every unit has a `mode`, which the detector switches for all units at once:
- "off": the identity (the plain network);
- "record": the clean pass of Alg. 3 (s1). The identity, but an MVM unit also records
  alpha and solves its sampling probabilities p (P, M), once per image of the batch;
- "sample": the stochastic passes (s2). The input is R copies of the recorded batch of
  P images stacked copy-major (`x.repeat(R, 1, 1, 1)`), so sample n belongs to image
  n % P, which is exactly how `sample_rows` pairs samples with rows of p.
A unit that `insert_units` puts in place of a ReLU (`unit.relu = True`) takes the
ReLU's input and applies the ReLU itself, fused with its sampling (one pass over the
activation); it is the identity on relu(h) instead of h. In "sample" mode a unit with
`copies = k > 1` takes a batch of P images and returns k * P samples stacked copy-major,
as if its input had been `h.repeat(k, 1, 1, 1)` (the detector sets it on the first unit,
so that the layers before it run once per image, not once per pass).
Only inserted units are random: the model's own Dropout layers are left in eval mode
by the detector. Units have no parameters or buffers, so a model with units has the
state_dict of the model without them.

Differentiable mode (for attacks that know the defense, e.g. expectation over
transformation): the ops are inference-only, so "sample" mode has no gradient. With
`unit.differentiable = True` (or `set_differentiable(model, True)`) a unit in "sample"
mode instead draws its random per-entry scale with the op, detached (1/pi_i for a drawn
row, 0 otherwise; keep/(1 - p_drop) for dropout), and applies it to h with torch ops, so
autograd reaches h through the fixed random mask. The forward values and the random
draws are those of plain "sample" mode: under the same seed the outputs are equal (bit
for bit in float32 and float64). What is held fixed: the mask itself, the MVM
probabilities p (recorded on a clean pass, although p depends on the input through
alpha), and SAP's p = |h|/sum|h| (computed from h detached). Off by default; in "off"
and "record" mode the flag changes nothing.
"""
from __future__ import annotations

import copy
import importlib
import math
from types import ModuleType
from typing import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops

__all__ = [
    "MODES",
    "SamplingUnit",
    "MVMUnit",
    "SAPUnit",
    "DropoutUnit",
    "insert_units",
    "first_unit_dominates",
    "sampling_units",
    "set_mode",
    "set_differentiable",
]

MODES = ("off", "record", "sample")
"""The modes of a unit, see the module docstring."""


class SamplingUnit(nn.Module):
    """Base class of the units: holds `mode`, `generator`, `keys` and `backend`.

    mode is one of `MODES` ("off" at construction). keys: None, or an (N,) int64 tensor
    on the activations' device, one key per sample of the next batch: sample n's draws
    are then a function of keys[n] alone, whatever the batch holds besides, and the
    generator is not used (the detector sets them, see `mvm_cuda.detector.Detector`).
    Subclasses implement `sample` and `sample_scale`; `forward` maps an NCHW activation
    (N, C, H, W) to one of the same shape.

    Args:
        generator: The source of every random draw, on the activations' device (None:
            the default generator of that device, seeded by torch.manual_seed).
        backend: A module with the op functions: `mvm_cuda.ops` (None, the default) or
            `mvm_cuda.reference`.
    """

    def __init__(self, generator: torch.Generator | None = None, backend: ModuleType | None = None):
        super().__init__()
        self.mode = "off"
        self.differentiable = False
        self.relu = False
        self.copies = 1
        self.generator = generator
        self.keys: Tensor | None = None
        self.backend = backend if backend is not None else ops

    def _random(self) -> dict:
        """The ops' source of randomness: one key per sample (`keys`, (N,) int64 on the
        activations' device) when set, else the generator."""
        # getattr: a unit pickled before keys existed has no such attribute.
        keys = getattr(self, "keys", None)
        return {"keys": keys} if keys is not None else {"generator": self.generator}

    def __getstate__(self):
        # A module object cannot be pickled or deep-copied, its name can: this keeps
        # copy.deepcopy and torch.save of a model with units working.
        state = dict(self.__dict__)
        if isinstance(self.backend, ModuleType):
            state["backend"] = self.backend.__name__
        return state

    def __setstate__(self, state):
        if isinstance(state.get("backend"), str):
            state = {**state, "backend": importlib.import_module(state["backend"])}
        super().__setstate__(state)

    def set_mode(self, mode: str) -> None:
        """Switch the unit to a mode (see the module docstring).

        Args:
            mode: "off", "record" or "sample".

        Raises:
            ValueError: mode is not one of `MODES`.
        """
        if mode not in MODES:
            raise ValueError(f"{type(self).__name__}: mode must be one of {MODES}, got {mode!r}")
        self.mode = mode

    @property
    def fused(self) -> dict:
        """The ops' relu and copies arguments, a dict (see the module docstring)."""
        # getattr: a unit pickled before these existed has neither.
        return {"relu": getattr(self, "relu", False), "copies": getattr(self, "copies", 1)}

    def activation(self, h: Tensor) -> Tensor:
        """What the unit samples, in torch ops (autograd flows).

        Args:
            h: (N, C, H, W) activation (the ReLU's input for a unit in a ReLU's place).

        Returns:
            relu(h) for a unit in place of a ReLU, h otherwise; stacked `copies` times in
            "sample" mode.
        """
        fused = self.fused
        h = h.relu() if fused["relu"] else h
        if self.mode == "sample" and fused["copies"] != 1:
            h = h.repeat(fused["copies"], 1, 1, 1)
        return h

    def forward(self, h: Tensor) -> Tensor:
        """Apply the unit in its mode: `activation` ("off"), `record` ("record") or `sample`.

        Args:
            h: (N, C, H, W) activation.

        Returns:
            (N, C, H, W), or (copies * N, C, H, W) in "sample" mode.
        """
        if self.mode == "sample":
            # getattr: a unit pickled before the flag existed has no such attribute.
            return self.sample_differentiable(h) if getattr(self, "differentiable", False) else self.sample(h)
        h = self.activation(h)
        if self.mode == "record":
            self.record(h)
        return h

    def record(self, h: Tensor) -> None:
        """The clean pass: remember what `sample` needs (nothing, by default).

        Args:
            h: (P, C, H, W) activation of the clean batch (after `activation`).
        """

    def sample(self, h: Tensor) -> Tensor:  # pragma: no cover - abstract
        """One stochastic pass: the unit's random draws applied to `activation(h)`, no gradient.

        Args:
            h: (N, C, H, W) activation.

        Returns:
            (copies * N, C, H, W), h's dtype.
        """
        raise NotImplementedError

    def sample_differentiable(self, h: Tensor) -> Tensor:
        """`sample` with a gradient: a = `activation` of h times `sample_scale` of a, the scale held fixed.

        The scale is drawn exactly as `sample` draws it (same generator use, same values),
        so the gradient w.r.t. a is that scale: exactly zero on the entries not drawn.

        Args:
            h: (N, C, H, W) activation.

        Returns:
            (copies * N, C, H, W), h's dtype.
        """
        h = self.activation(h)
        scale = self.sample_scale(h)
        # A select, like the op: an undrawn entry is 0 even where h is inf or NaN. The
        # product is taken in the scale's dtype (float32 for half h) and rounded once.
        return torch.where(scale != 0, h * scale, torch.zeros((), dtype=scale.dtype, device=h.device)).to(h.dtype)

    def sample_scale(self, h: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The detached random scale of one stochastic pass.

        Args:
            h: (N, C, H, W) activation, after `activation`.

        Returns:
            A tensor broadcastable to h.
        """
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}" + self._differentiable_repr()

    def _differentiable_repr(self) -> str:
        return ", differentiable=True" if self.differentiable else ""


def _scale_dtype(h: Tensor) -> torch.dtype:
    """The dtype of a random scale for h: float32 or h's dtype if wider."""
    return torch.promote_types(h.dtype, torch.float32)


def _check_nchw(unit: str, h: Tensor) -> None:
    if h.dim() != 4:
        raise ValueError(
            f"{unit}: expects an NCHW activation (N, C, H, W) from a conv layer's ReLU, got shape "
            f"{tuple(h.shape)}; units belong before the flatten"
        )


class MVMUnit(SamplingUnit):
    """MVM row sampling (the paper's Alg. 1 with Alg. 2's probabilities) of the pixels.

    The activation h (N, C, H, W) is matricized as its NHWC view `h.permute(0, 2, 3, 1)`,
    M = H*W rows of C channels, read in place (no copy). In "record" mode the unit stores
    alpha = ||row||^2 and p = solve_mvm(alpha, c, solver), both (P, M) float64 for a batch
    of P images, one batched call. In "sample" mode the batch must hold a whole number of
    copies of those P images (N % P == 0), and each sample draws c rows from p[n % P]:
    kept rows are scaled by 1/pi, the others are zero. The output has h's shape and
    memory format.

    Args:
        c: The number of draws, an integer in [1, 2**63); give c or c_rel.
        c_rel: Draws per reference pixel, finite and > 0: c = max(1, round(c_rel *
            ref_pixels)) (the paper's c = c_rel * N_pixel).
        ref_pixels: The pixels c_rel counts (the detector sets the input's H*W); None:
            the unit's own M.
        solver: `solve_mvm`'s method, "kkt" or "pgd".
        generator: As in `SamplingUnit`.
        backend: As in `SamplingUnit`.

    Raises:
        ValueError: both or neither of c and c_rel, or either out of its range.
    """

    def __init__(
        self,
        c: int | None = None,
        *,
        c_rel: float | None = None,
        ref_pixels: int | None = None,
        solver: str = "kkt",
        generator: torch.Generator | None = None,
        backend: ModuleType | None = None,
    ):
        super().__init__(generator, backend)
        if (c is None) == (c_rel is None):
            raise ValueError(f"MVMUnit: give exactly one of c and c_rel, got c={c}, c_rel={c_rel}")
        if c is not None and (not math.isfinite(c) or int(c) != c or c < 1):
            raise ValueError(f"MVMUnit: c must be an integer >= 1, got {c}")
        if c is not None and c >= 2**63:
            raise ValueError(f"MVMUnit: c must be below 2**63 (the ops take int64), got {c}")
        if c_rel is not None and not c_rel > 0:
            raise ValueError(f"MVMUnit: c_rel must be > 0, got {c_rel}")
        if c_rel is not None and not math.isfinite(c_rel):
            raise ValueError(f"MVMUnit: c_rel must be finite, got {c_rel}")
        self.c = None if c is None else int(c)
        self.c_rel = c_rel
        self.ref_pixels = ref_pixels
        self.solver = solver
        self.alpha: Tensor | None = None
        self.p: Tensor | None = None

    def draws(self, rows: int) -> int:
        """The number of draws c for an activation of H*W pixels.

        Args:
            rows: H*W, the activation's pixels (used when c_rel is set and ref_pixels is None).

        Returns:
            c, an int >= 1.
        """
        if self.c is not None:
            return self.c
        ref = self.ref_pixels if self.ref_pixels is not None else rows
        return max(1, round(self.c_rel * ref))

    def record(self, h: Tensor) -> None:
        """Record alpha and solve p for the clean batch.

        Args:
            h: (P, C, H, W) activation of the clean batch.

        Raises:
            ValueError: h is not 4-d.
            RuntimeError: from `solve_mvm` (e.g. a NaN in h on the CPU).
        """
        _check_nchw("MVMUnit", h)
        rows = h.shape[2] * h.shape[3]
        # float64 from alpha to the sampler: p is (P, M), small, and the sampler then
        # computes 1/pi from the solver's own values, not from a float32 rounding of them.
        self.alpha = self.backend.row_alpha(h.permute(0, 2, 3, 1)).double()
        self.p = self.backend.solve_mvm(self.alpha, self.draws(rows), self.solver)

    def _check_recorded(self, h: Tensor) -> None:
        """h (N, C, H, W) is a stack of copies of the recorded images: p exists, N % P == 0
        and H*W = M."""
        _check_nchw("MVMUnit", h)
        if self.p is None:
            raise RuntimeError("MVMUnit: no recorded p; run a clean pass in 'record' mode before 'sample'")
        if h.shape[0] % self.p.shape[0] or h.shape[2] * h.shape[3] != self.p.shape[1]:
            raise ValueError(
                f"MVMUnit: the batch {tuple(h.shape)} is not a stack of copies of the {self.p.shape[0]} "
                f"recorded images with {self.p.shape[1]} pixels each"
            )

    def sample(self, h: Tensor) -> Tensor:
        """Draw c pixels per sample from the recorded p and scale them by 1/pi.

        Args:
            h: (N, C, H, W) activation, a stack of copies of the recorded images.

        Returns:
            (copies * N, C, H, W), h's dtype and memory format.

        Raises:
            RuntimeError: no p was recorded.
            ValueError: h is not 4-d, or not a stack of copies of the recorded images.
        """
        self._check_recorded(h)
        # sample_rows writes its output with the strides of its input, so permuting the
        # result back gives h's own layout, again without a copy.
        out = self.backend.sample_rows(h.permute(0, 2, 3, 1), self.p, self.draws(self.p.shape[1]),
                                       **self.fused, **self._random())
        return out.permute(0, 3, 1, 2)

    def sample_scale(self, h: Tensor) -> Tensor:
        """1/pi_i on the pixels drawn from the recorded p, 0 elsewhere.

        The op samples a (N, M, 1) tensor of ones, whose draws are those it makes for
        h itself (they depend on p, c and N only). p stays the recorded one: the
        gradient treats it as a constant, although it is a function of the clean
        pass's activation (the usual choice of an expectation-over-transformation
        attack).

        Args:
            h: (N, C, H, W) activation, a stack of copies of the recorded images.

        Returns:
            (N, 1, H, W), float32 or h's dtype if wider (1/pi overflows float16 where
            h/pi does not).

        Raises:
            RuntimeError: no p was recorded.
            ValueError: h is not a stack of copies of the recorded images.
        """
        self._check_recorded(h)
        n, _, rows_h, rows_w = h.shape
        ones = torch.ones(n, self.p.shape[1], 1, dtype=_scale_dtype(h), device=h.device)
        with torch.no_grad():
            scale = self.backend.sample_rows(ones, self.p.detach(), self.draws(self.p.shape[1]),
                                             **self._random())
        return scale.view(n, 1, rows_h, rows_w)

    def extra_repr(self) -> str:
        c = f"c={self.c}" if self.c is not None else f"c_rel={self.c_rel}, ref_pixels={self.ref_pixels}"
        return f"{c}, solver={self.solver!r}, mode={self.mode!r}" + self._differentiable_repr()


def _dense_order(h: Tensor) -> tuple[int, ...] | None:
    """A permutation of h's dims under which h is contiguous (None if there is none)."""
    for order in ((0, 1, 2, 3), (0, 2, 3, 1)):
        if h.permute(order).is_contiguous():
            return order
    return None


class SAPUnit(SamplingUnit):
    """Stochastic activation pruning (Dhillon et al. 2018) of every entry of h.

    Each sample's K = C*H*W entries are rows of width 1 with p_j = |h_j| / sum |h|,
    recomputed from the activation the unit sees on every pass (nothing is recorded),
    drawn r = max(1, round(frac * K)) times; kept entries are scaled by 1/pi. Since
    every entry is its own row, their order does not matter: the op gets h in whichever
    of NCHW or NHWC order it is dense, so the flat view is free. h: (N, C, H, W) ->
    (N, C, H, W), the identity unless mode == "sample".

    Args:
        frac: Draws per entry, > 0.
        generator: As in `SamplingUnit`.
        backend: As in `SamplingUnit`.

    Raises:
        ValueError: frac is not > 0.
    """

    def __init__(self, frac: float, *, generator: torch.Generator | None = None,
                 backend: ModuleType | None = None):
        super().__init__(generator, backend)
        if not frac > 0:
            raise ValueError(f"SAPUnit: frac must be > 0, got {frac}")
        self.frac = float(frac)

    def sample(self, h: Tensor) -> Tensor:
        """Prune h with `mvm_cuda.ops.sap_sample`.

        Args:
            h: (N, C, H, W) activation.

        Returns:
            (copies * N, C, H, W), h's dtype and memory format.

        Raises:
            ValueError: h is not 4-d.
            RuntimeError: from the op (e.g. a NaN in h on the CPU).
        """
        _check_nchw("SAPUnit", h)
        order = _dense_order(h) or (0, 1, 2, 3)  # a strided h is copied by the reshape
        out = self.backend.sap_sample(h.permute(order), self.frac, **self.fused, **self._random())
        return out.permute(tuple(order.index(d) for d in range(4)))

    def sample_scale(self, h: Tensor) -> Tensor:
        """1/pi_j on the entries drawn with p = |h|/sum|h| (h detached), 0 elsewhere.

        The entries are flattened in the same order as in `sample`, so the draws land on
        the same entries.

        Args:
            h: (N, C, H, W) activation.

        Returns:
            (N, C, H, W), float32 or h's dtype if wider (see `mvm_cuda.ops.sap_scale`).

        Raises:
            ValueError: h is not 4-d.
        """
        _check_nchw("SAPUnit", h)
        order = _dense_order(h) or (0, 1, 2, 3)
        with torch.no_grad():
            scale = self.backend.sap_scale(h.detach().permute(order), self.frac, **self._random())
        return scale.permute(tuple(order.index(d) for d in range(4)))

    def extra_repr(self) -> str:
        return f"frac={self.frac}, mode={self.mode!r}" + self._differentiable_repr()


class DropoutUnit(SamplingUnit):
    """Test-time inverted dropout: in "sample" mode each entry is zeroed with probability p_drop.

    The rest are scaled by 1/(1 - p_drop), whatever the module's training flag;
    otherwise the identity. p_drop = 0 is the identity always. The uniforms come from
    torch.rand, or from the backend's `keyed_uniform` when `keys` are set.

    Args:
        p_drop: Drop probability in [0, 1).
        generator: As in `SamplingUnit`.
        backend: As in `SamplingUnit`.

    Raises:
        ValueError: p_drop is outside [0, 1).
    """

    def __init__(self, p_drop: float = 0.5, *, generator: torch.Generator | None = None,
                 backend: ModuleType | None = None):
        super().__init__(generator, backend)
        if not 0 <= p_drop < 1:
            raise ValueError(f"DropoutUnit: p_drop must be in [0, 1), got {p_drop}")
        self.p_drop = float(p_drop)

    def _keep(self, h: Tensor) -> Tensor:
        # 1 with probability 1 - p_drop, else 0, in h's dtype: uniforms compared in place
        # (on the CPU twice as fast as bernoulli_, whose per-entry cost dominated a pass),
        # drawn in float32 or better so that half types do not round p_drop.
        dtype = torch.promote_types(h.dtype, torch.float32)
        keys = getattr(self, "keys", None)
        if keys is not None:  # sample n's mask from keys[n] alone, entries in NCHW order
            u = self.backend.keyed_uniform(keys, math.prod(h.shape[1:]), dtype=dtype).view(h.shape)
        else:
            u = torch.rand(h.shape, dtype=dtype, device=h.device, generator=self.generator)
        keep = u.ge_(self.p_drop)
        return keep if keep.dtype == h.dtype else keep.to(h.dtype)

    def sample(self, h: Tensor) -> Tensor:
        keys = getattr(self, "keys", None)
        if keys is not None:  # one fused pass: the ReLU, the keyed mask and the scale
            return self.backend.keyed_dropout(h, keys, self.p_drop, **self.fused)
        h = self.activation(h)
        keep = self._keep(h)
        return keep.mul_(h).div_(1.0 - self.p_drop)  # in place: one activation-sized buffer

    def sample_differentiable(self, h: Tensor) -> Tensor:
        # The same operations as `sample`, out of place, so that the values stay equal
        # bit for bit (h / q and h * (1/q) can differ in the last bit).
        h = self.activation(h)
        keep = self._keep(h)
        return (keep * h) / (1.0 - self.p_drop)

    def sample_scale(self, h: Tensor) -> Tensor:
        """1/(1 - p_drop) on the kept entries, 0 on the dropped ones.

        Args:
            h: (N, C, H, W) activation.

        Returns:
            (N, C, H, W), float32 or h's dtype if wider (1/(1 - p_drop) overflows float16
            near p_drop = 1).
        """
        return self._keep(h).to(_scale_dtype(h)).div_(1.0 - self.p_drop)

    def extra_repr(self) -> str:
        return f"p_drop={self.p_drop}, mode={self.mode!r}" + self._differentiable_repr()


def sampling_units(model: nn.Module) -> list[SamplingUnit]:
    """The sampling units of a model.

    Args:
        model: Any module, typically the result of `insert_units`.

    Returns:
        Its `SamplingUnit` submodules, in registration (= insertion) order.
    """
    return [m for m in model.modules() if isinstance(m, SamplingUnit)]


def set_mode(model: nn.Module, mode: str) -> None:
    """Put every sampling unit of a model into one mode.

    Args:
        model: Any module.
        mode: "off", "record" or "sample".

    Raises:
        ValueError: mode is not one of `MODES`.
    """
    for unit in sampling_units(model):
        unit.set_mode(mode)


def set_differentiable(model: nn.Module, differentiable: bool = True) -> None:
    """Switch the differentiable mode of every sampling unit of a model (see the module docstring).

    It matters only in "sample" mode.

    Args:
        model: Any module.
        differentiable: On or off.

    Raises:
        TypeError: differentiable is not a bool.
    """
    if not isinstance(differentiable, bool):
        raise TypeError(f"set_differentiable: differentiable must be a bool, got {differentiable!r}")
    for unit in sampling_units(model):
        unit.differentiable = differentiable


_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_FLATTEN_FUNCTIONS = {torch.flatten}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}


def _is_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_flatten(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.Flatten)
    if node.op == "call_function":
        return node.target in _FLATTEN_FUNCTIONS
    return node.op == "call_method" and node.target in _FLATTEN_METHODS


def insert_units(model: nn.Module, make_unit: Callable[[], nn.Module]) -> torch.fx.GraphModule:
    """A copy of `model` with a new unit, `make_unit()`, right after every ReLU of its conv part.

    The model is traced with torch.fx (`symbolic_trace`) on a deepcopy, so the original
    model and its weights are never touched and the copy runs its layers in the traced
    execution order. Found as ReLUs: nn.ReLU modules (also nested inside submodules,
    and a ReLU module called several times gets a unit per call), F.relu, torch.relu and
    Tensor.relu. "The conv part" is everything before the first flatten in execution
    order: an nn.Flatten module, torch.flatten, or a Tensor.flatten / .view / .reshape
    call. A `SamplingUnit` takes the ReLU's place and applies the ReLU itself, fused with
    its sampling (`unit.relu = True`), where nothing else reads the ReLU's input; any
    other module from make_unit (and a unit where something else does) goes right after
    the ReLU.

    Args:
        model: The trained network (not modified).
        make_unit: Called once per ReLU; returns the module to insert (a new one each call).

    Returns:
        A torch.fx.GraphModule whose state_dict equals the model's (units have no state);
        its units are `sampling_units(result)`, in execution order.

    Raises:
        TypeError: torch.fx cannot trace the model (e.g. control flow that depends on
            tensor values).
        ValueError: the model has no flatten, or no ReLU before it.
    """
    try:
        graph_module = torch.fx.symbolic_trace(copy.deepcopy(model))
    except Exception as e:
        raise TypeError(
            f"insert_units: torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e}); "
            "units are inserted into the traced graph, so the model's forward must be traceable "
            "(no Python control flow that depends on tensor values)"
        ) from e
    graph = graph_module.graph
    modules = dict(graph_module.named_modules())
    relus = []
    for node in graph.nodes:
        if _is_flatten(node, modules):
            break
        if _is_relu(node, modules):
            relus.append(node)
    else:
        raise ValueError(
            f"insert_units: found no flatten in {type(model).__name__} (an nn.Flatten module, "
            "torch.flatten or a .flatten/.view/.reshape call), so its conv part is unknown"
        )
    if not relus:
        raise ValueError(
            f"insert_units: {type(model).__name__} has no ReLU before its first flatten; "
            "sampling units go after the ReLUs of the conv part (nn.ReLU, F.relu, torch.relu or "
            "Tensor.relu; other activations such as LeakyReLU or GELU are not ReLUs here)"
        )
    for k, node in enumerate(relus):
        name = f"sampling_unit_{k}"
        unit = make_unit()
        graph_module.add_submodule(name, unit)
        pre = node.args[0] if node.args else None
        # A sampling unit takes the ReLU's place (and applies it, fused) when nothing
        # else reads the ReLU's input, which an in-place ReLU would have changed.
        if isinstance(unit, SamplingUnit) and isinstance(pre, torch.fx.Node) and len(pre.users) == 1:
            unit.relu = True
            with graph.inserting_after(node):
                unit_node = graph.call_module(name, (pre,))
            node.replace_all_uses_with(unit_node)
            graph.erase_node(node)
            continue
        with graph.inserting_after(node):
            unit_node = graph.call_module(name, (node,))
        node.replace_all_uses_with(unit_node, delete_user_cb=lambda user: user is not unit_node)
    graph.lint()
    graph_module.recompile()
    return graph_module


def first_unit_dominates(model: torch.fx.GraphModule) -> bool:
    """Whether every path from the model's inputs to its output passes through its first sampling unit.

    Then the layers before that unit (in graph order) see only the input, and the unit
    may stack the batch's copies itself (`copies`).

    Args:
        model: A result of `insert_units`.

    Returns:
        False for a model without units, or whose later layers also read the input, or
        anything computed from it, around that unit.
    """
    units = [n for n in model.graph.nodes
             if n.op == "call_module" and isinstance(model.get_submodule(n.target), SamplingUnit)]
    if not units:
        return False
    seen, stack = set(), [n for n in model.graph.nodes if n.op == "placeholder"]
    while stack:
        node = stack.pop()
        if node is units[0] or node in seen:
            continue
        if node.op == "output":
            return False
        seen.add(node)
        stack.extend(node.users)
    return True

