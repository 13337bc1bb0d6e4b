"""The composition message-passing network (``CompositionMPNN``).

A composition is a complete directed graph over its elements, weighted by
the atomic fractions. The model embeds each element from its standardised
descriptors, adds a learned encoding of the element's fraction (optional,
on by default), applies L weighted soft-attention message-passing layers with
residuals, pools the nodes with a weighted attention and maps the pooled
vector through an MLP head to the target in eV/atom. docs/architecture.md
("Model" and "Flat parameter buffer") gives the equations and the layout.

Everything after the embedding runs in one call of ``dvmrl.ops.model_forward``
(the fused kernels) or ``dvmrl.reference.model_forward`` (plain PyTorch),
which read the parameters from the single flat buffer ``flat``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dvmrl import defaults
from dvmrl.layout import ModelDims, is_integral, parameter_count, parameter_layout

# Standard deviation of the residual branch's last weight (msg_w2) relative
# to a fan-in initialisation: small, so that each fresh layer starts close to
# the identity and deep stacks train stably.
RESIDUAL_INIT_SCALE = 0.1

# Bounds of the log-variance output (standardised units) inside the Gaussian
# negative log-likelihood: variances between e^-12 and e^12 times the target
# variance, which keeps the loss finite for any output.
LOG_VARIANCE_MIN = -12.0
LOG_VARIANCE_MAX = 12.0

# The fraction encoder reads [w, ln(w) / FRACTION_LOG_SCALE]: dividing by 5
# keeps both inputs of order 1 for fractions down to about e^-5 = 0.007.
FRACTION_LOG_SCALE = 5.0
# Fractions below this floor (padded slots hold 0) enter the logarithm as
# the floor, so ln(w) stays finite.
FRACTION_LOG_FLOOR = 1e-6
# Standard deviation of the encoder's output weight relative to a fan-in
# initialisation: the fraction term starts small beside the element embedding.
FRACTION_INIT_SCALE = 0.5

# Parameters of the embedding stage, outside the flat buffer.
ELEMENT_EMBEDDING_NAMES = ("emb_w", "emb_b", "emb_offset")
FRACTION_ENCODER_NAMES = ("frac_w1", "frac_b1", "frac_w2", "frac_b2")
# ModelConfig fields that ModelDims checks and stores as ints.
SIZE_FIELDS = ("hidden", "layers", "gate_hidden", "msg_hidden", "head_hidden", "head_layers")


@dataclass
class ModelConfig:
    """Sizes and regularisation of a ``CompositionMPNN``.

    Defaults come from ``dvmrl.defaults.MODEL``.

    Attributes:
        hidden (int): node state width H.
        layers (int): message-passing layers L (>= 0).
        gate_hidden (int): width Hg of the attention-gate MLPs.
        msg_hidden (int): width Hm of the message MLPs.
        head_hidden (int): width Hh of the head's hidden layers.
        head_layers (int): hidden layers D of the head (>= 0).
        dropout (float): dropout probability in the head's hidden layers,
            in [0, 1).
        heteroscedastic (bool): predict a mean and a log-variance and train
            with the Gaussian negative log-likelihood.
        fraction_hidden (int): width F of the fraction encoder, an MLP on
            [v_i, ln(v_i) / 5] with v_i = max(w_i, 1e-6), whose output is
            added to element i's initial node state; 0 turns it off, and
            node states then start from the element alone.
    """

    hidden: int = defaults.MODEL["hidden"]
    layers: int = defaults.MODEL["layers"]
    gate_hidden: int = defaults.MODEL["gate_hidden"]
    msg_hidden: int = defaults.MODEL["msg_hidden"]
    head_hidden: int = defaults.MODEL["head_hidden"]
    head_layers: int = defaults.MODEL["head_layers"]
    dropout: float = defaults.MODEL["dropout"]
    heteroscedastic: bool = defaults.MODEL["heteroscedastic"]
    fraction_hidden: int = defaults.MODEL["fraction_hidden"]

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(
                f"ModelConfig.dropout must lie in [0, 1), got {self.dropout!r}"
            )
        self.dropout = float(self.dropout)
        # bool("false") is True, so only real booleans (and 0 or 1) pass.
        if self.heteroscedastic not in (True, False):
            raise ValueError(
                "ModelConfig.heteroscedastic must be true or false, got "
                f"{self.heteroscedastic!r}"
            )
        self.heteroscedastic = bool(self.heteroscedastic)
        if not is_integral(self.fraction_hidden) or self.fraction_hidden < 0:
            raise ValueError(
                "ModelConfig.fraction_hidden must be an integer >= 0 (0 turns the "
                f"fraction encoder off), got {self.fraction_hidden!r}"
            )
        self.fraction_hidden = int(self.fraction_hidden)
        # ModelDims checks the integer sizes and turns integral floats (16.0
        # from a hand-written JSON file) into ints.
        dims = self.dims
        for name in SIZE_FIELDS:
            setattr(self, name, getattr(dims, name))

    @property
    def dims(self) -> ModelDims:
        """Sizes of the flat parameter buffer."""
        return ModelDims(
            hidden=self.hidden,
            gate_hidden=self.gate_hidden,
            msg_hidden=self.msg_hidden,
            layers=self.layers,
            head_hidden=self.head_hidden,
            head_layers=self.head_layers,
            n_out=2 if self.heteroscedastic else 1,
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @property
    def embedding_names(self) -> tuple[str, ...]:
        """Names of the parameters outside the flat buffer."""
        if self.fraction_hidden > 0:
            return ELEMENT_EMBEDDING_NAMES + FRACTION_ENCODER_NAMES
        return ELEMENT_EMBEDDING_NAMES

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build a config from ``to_dict`` output; missing keys take defaults.

        A dict without ``fraction_hidden`` describes a model saved before
        the fraction encoder existed, so that field becomes 0 rather than the
        default.

        Raises:
            ValueError: for an unknown key or an invalid value.
        """
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown ModelConfig keys {unknown}; expected a subset of "
                f"{sorted(known)}"
            )
        values = {"fraction_hidden": 0, **values}
        return cls(**values)


def _fan_in_normal(
    shape: tuple[int, ...], fan_in: int, scale: float, generator: torch.Generator
) -> torch.Tensor:
    std = scale / math.sqrt(fan_in)
    return torch.randn(shape, generator=generator, dtype=torch.float64) * std


def init_parameter(
    name: str, shape: tuple[int, ...], generator: torch.Generator
) -> torch.Tensor:
    """Draw the initial value of one entry of the flat buffer (float64).

    Weights are normal with standard deviation 1 / sqrt(fan-in), counting
    both halves of a split first layer (``*_i`` and ``*_j`` act on the
    concatenated [h_i; h_j], so their fan-in is 2H). The residual branch's
    last weight ``msg_w2`` is scaled by ``RESIDUAL_INIT_SCALE``. Biases and
    the gate offsets ``*gate_d`` start at 0.

    Args:
        name (str): parameter name from :func:`dvmrl.layout.parameter_layout`.
        shape (tuple): its shape.
        generator (torch.Generator): CPU generator for the draws.
    """
    base = name.split(".")[-1]
    if len(shape) == 1 and base not in ("gate_u", "pool_gate_u"):
        return torch.zeros(shape, dtype=torch.float64)
    if base in ("gate_u", "pool_gate_u"):
        return _fan_in_normal(shape, shape[0], 1.0, generator)
    fan_in = shape[1]
    if base in ("gate_w_i", "gate_w_j", "msg_w1_i", "msg_w1_j"):
        fan_in *= 2
    scale = RESIDUAL_INIT_SCALE if base == "msg_w2" else 1.0
    return _fan_in_normal(shape, fan_in, scale, generator)


def init_flat(dims: ModelDims, generator: torch.Generator) -> torch.Tensor:
    """Return a freshly initialised flat buffer (float64) for ``dims``."""
    parts = [
        init_parameter(spec.name, spec.shape, generator).reshape(-1)
        for spec in parameter_layout(dims)
    ]
    return torch.cat(parts)


def fraction_encoder_shapes(width: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """Return the fraction encoder's parameter shapes; empty for width 0."""
    if width == 0:
        return {}
    return {
        "frac_w1": (width, 2),
        "frac_b1": (width,),
        "frac_w2": (hidden, width),
        "frac_b2": (hidden,),
    }


def init_fraction_encoder(
    width: int, hidden: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Draw the fraction encoder's parameters (float64); empty for width 0.

    ``frac_w1`` [F, 2] is normal with a fan-in standard deviation,
    ``frac_w2`` [H, F] the same times ``FRACTION_INIT_SCALE``, the biases 0.
    """
    shapes = fraction_encoder_shapes(width, hidden)
    if not shapes:
        return {}
    return {
        "frac_w1": _fan_in_normal(shapes["frac_w1"], 2, 1.0, generator),
        "frac_b1": torch.zeros(shapes["frac_b1"], dtype=torch.float64),
        "frac_w2": _fan_in_normal(
            shapes["frac_w2"], width, FRACTION_INIT_SCALE, generator
        ),
        "frac_b2": torch.zeros(shapes["frac_b2"], dtype=torch.float64),
    }


def orthogonal_embedding(
    descriptors: np.ndarray | torch.Tensor, hidden: int, generator: torch.Generator
) -> torch.Tensor:
    """Return ``emb_w`` [H, F0] (float64) with orthonormal rows or columns.

    With H >= F0 the columns are orthonormal (a random isometry), so the
    initial node table keeps every distance between element descriptor
    vectors. With H < F0 the rows are a random rotation of the H leading
    principal directions of the descriptor matrix, the orthogonal projection
    that keeps the most descriptor variance.
    """
    table = torch.as_tensor(np.asarray(descriptors), dtype=torch.float64)
    n_features = table.shape[1]
    gaussian = torch.randn(
        (hidden, min(hidden, n_features)), generator=generator, dtype=torch.float64
    )
    q, r = torch.linalg.qr(gaussian)
    # Fixing the signs by diag(R) makes Q uniformly distributed.
    q = q * torch.sign(torch.diagonal(r))
    if hidden >= n_features:
        return q  # [H, F0], q.T @ q = I
    centred = table - table.mean(dim=0)
    _, _, v_t = torch.linalg.svd(centred, full_matrices=False)
    return q @ v_t[:hidden]  # [H, F0], rows orthonormal


def _default_descriptors() -> np.ndarray:
    from dvmrl import elements

    return elements.descriptor_matrix()


# Largest deviation from 1 that the forward accepts in a composition's
# fraction sum. Float32 rounding of featurized fractions moves it by about
# 1e-6 at most (an estimate for 8 elements), far below this bound.
SUM_TOLERANCE = 1e-3


def check_dtype(dtype: torch.dtype) -> None:
    """Raise TypeError unless ``dtype`` is float32 or float64.

    The fused kernels and the fraction checks exist for these two only.
    """
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"dtype must be torch.float32 or torch.float64, got {dtype}; use "
            "torch.float32 (float64 for gradient checks)"
        )


class CompositionMPNN(nn.Module):
    """Weighted soft-attention message passing over alloy compositions.

    Parameters: ``emb_w`` [H, F0], ``emb_b`` [H], ``emb_offset`` [E, H],
    with a fraction encoder (``fraction_hidden`` F > 0) ``frac_w1`` [F, 2],
    ``frac_b1`` [F], ``frac_w2`` [H, F] and ``frac_b2`` [H], and the flat
    buffer ``flat`` (layout in :mod:`dvmrl.layout`). Buffers:
    ``descriptors`` [E, F0] (standardised element descriptors), and
    ``target_mean``, ``target_std`` (eV/atom), which map the network's
    standardised output to eV/atom. E = 103 element-table rows.

    Dropout acts only in the head's hidden layers, in training mode or
    while ``mc_dropout(True)`` is in force. Its mask comes from
    ``dropout_generator`` when one is set (a ``torch.Generator`` on the
    model's device), else from PyTorch's global generator.

    Args:
        config (ModelConfig, optional): sizes; default ``ModelConfig()``.
        descriptors (array, optional): [E, F0] standardised descriptors;
            default ``dvmrl.elements.descriptor_matrix()``.
        seed (int): seed of the initialisation. Default: 0.
        dtype (torch.dtype, optional): torch.float32 or torch.float64, the
            dtype of parameters and buffers; default
            ``torch.get_default_dtype()``. The initial values are drawn in
            float64 and rounded once to it.

    Raises:
        TypeError: for another dtype.
    """

    def __init__(
        self,
        config: ModelConfig | None = None,
        descriptors: np.ndarray | torch.Tensor | None = None,
        seed: int = 0,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = ModelConfig() if config is None else config
        if descriptors is None:
            descriptors = _default_descriptors()
        table = torch.as_tensor(np.asarray(descriptors), dtype=torch.float64)
        if table.dim() != 2:
            raise ValueError(
                f"descriptors must be a 2-D [elements, features] array, got shape "
                f"{list(table.shape)}"
            )
        if not torch.isfinite(table).all():
            raise ValueError("descriptors contain NaN or infinite values")
        dims = self.config.dims
        generator = torch.Generator().manual_seed(int(seed))
        dtype = torch.get_default_dtype() if dtype is None else dtype
        check_dtype(dtype)

        self.register_buffer("descriptors", table.to(dtype))
        self.register_buffer("target_mean", torch.zeros((), dtype=dtype))
        self.register_buffer("target_std", torch.ones((), dtype=dtype))
        emb_w = orthogonal_embedding(table, dims.hidden, generator)
        self.emb_w = nn.Parameter(emb_w.to(dtype))
        self.emb_b = nn.Parameter(torch.zeros(dims.hidden, dtype=dtype))
        self.emb_offset = nn.Parameter(
            torch.zeros(table.shape[0], dims.hidden, dtype=dtype)
        )
        self.flat = nn.Parameter(init_flat(dims, generator).to(dtype))
        for name, value in init_fraction_encoder(
            self.config.fraction_hidden, dims.hidden, generator
        ).items():
            setattr(self, name, nn.Parameter(value.to(dtype)))

        self.use_fused = True
        self.dropout_generator: torch.Generator | None = None
        self._mc_dropout = False

    # -- configuration ---------------------------------------------------

    @property
    def dims(self) -> ModelDims:
        """Sizes of the flat buffer (from ``config``)."""
        return self.config.dims

    @property
    def has_uncertainty(self) -> bool:
        """Whether predictions can carry an uncertainty.

        True with the heteroscedastic head or with head dropout (sampled by
        MC dropout).
        """
        return self.config.heteroscedastic or self.has_mc_dropout

    @property
    def has_mc_dropout(self) -> bool:
        """Whether the head has dropout, so that MC-dropout samples differ."""
        return self.config.dropout > 0.0 and self.config.head_layers > 0

    def set_dropout(self, p: float) -> None:
        """Set the head's dropout probability, in [0, 1)."""
        self.config = dataclasses.replace(self.config, dropout=p)

    def mc_dropout(self, enabled: bool = True) -> CompositionMPNN:
        """Keep dropout active in evaluation mode (MC dropout) or stop it.

        Returns:
            CompositionMPNN: ``self``, for chaining.
        """
        self._mc_dropout = bool(enabled)
        return self

    @property
    def mc_dropout_enabled(self) -> bool:
        """Whether MC dropout is on."""
        return self._mc_dropout

    def set_target_scaling(self, mean: float, std: float) -> None:
        """Set the eV/atom mean and standard deviation of the targets.

        Raises:
            ValueError: if ``std`` is not a positive finite number or ``mean``
                is not finite.
        """
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0.0):
            raise ValueError(
                f"target scaling needs a finite mean and a positive finite std, "
                f"got mean={mean!r}, std={std!r}"
            )
        self.target_mean.fill_(float(mean))
        self.target_std.fill_(float(std))

    # -- forward ---------------------------------------------------------

    def node_table(self) -> torch.Tensor:
        """Return the element part of the initial node state [E, H]."""
        return self.descriptors @ self.emb_w.T + self.emb_b + self.emb_offset

    def fraction_encoding(self, frac: torch.Tensor) -> torch.Tensor:
        """Return the fraction term of the initial node states [B, K, H].

        Raises:
            RuntimeError: if the model has no fraction encoder.
        """
        if self.config.fraction_hidden == 0:
            raise RuntimeError(
                "the model has no fraction encoder; build it with "
                "ModelConfig(fraction_hidden=F) with F > 0"
            )
        w = frac.clamp_min(FRACTION_LOG_FLOOR)
        inputs = torch.stack([w, torch.log(w) / FRACTION_LOG_SCALE], dim=-1)
        hidden = torch.nn.functional.silu(inputs @ self.frac_w1.T + self.frac_b1)
        return hidden @ self.frac_w2.T + self.frac_b2

    def node_inputs(
        self, element_index: torch.Tensor, frac: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the node table and row indices that the forward reads.

        Without a fraction encoder these are ``node_table()`` [E, H] and
        ``element_index`` itself. With one, each node gets its own row
        (element part plus fraction term) of a per-node table [B * K, H],
        read through identity indices [B, K], and autograd carries the
        table's gradient back to the encoder and to ``frac``.
        """
        table = self.node_table()
        if self.config.fraction_hidden == 0:
            return table, element_index
        batch, slots = element_index.shape
        nodes = table[element_index] + self.fraction_encoding(frac)
        rows = torch.arange(batch * slots, device=element_index.device)
        return nodes.reshape(batch * slots, -1), rows.reshape(batch, slots)

    def _dropout_active(self) -> bool:
        dims = self.dims
        return (
            self.config.dropout > 0.0
            and dims.head_layers > 0
            and (self.training or self._mc_dropout)
        )

    def draw_dropout_mask(self, batch_size: int) -> torch.Tensor | None:
        """Draw the head's dropout mask [D, B, Hh], or None when inactive.

        Entries are 0 with probability p and 1 / (1 - p) otherwise.
        """
        if not self._dropout_active():
            return None
        dims = self.dims
        p = self.config.dropout
        shape = (dims.head_layers, batch_size, dims.head_hidden)
        generator = self.dropout_generator
        device = self.flat.device
        draw_device = generator.device if generator is not None else device
        uniform = torch.rand(
            shape, generator=generator, device=draw_device, dtype=self.flat.dtype
        )
        keep = (uniform >= p).to(self.flat.dtype) * (1.0 / (1.0 - p))
        return keep.to(device)

    def _check_inputs(
        self, element_index: torch.Tensor, frac: torch.Tensor, mask: torch.Tensor
    ) -> None:
        if element_index.dtype != torch.int64:
            raise TypeError(f"element_index must be int64, got {element_index.dtype}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool, got {mask.dtype}")
        if frac.dtype != self.flat.dtype:
            raise TypeError(
                f"frac has dtype {frac.dtype} but the model has {self.flat.dtype}; "
                f"convert the batch with .to(device, dtype)"
            )
        if (
            element_index.dim() != 2
            or frac.shape != element_index.shape
            or (mask.shape != element_index.shape)
        ):
            raise ValueError(
                "element_index, frac and mask must share one [B, K] shape, got "
                f"{list(element_index.shape)}, {list(frac.shape)}, {list(mask.shape)}"
            )
        if element_index.shape[1] == 0 and element_index.shape[0] > 0:
            raise ValueError(
                f"element_index has shape {list(element_index.shape)}: a batch of "
                "compositions needs at least one slot (K >= 1) for their elements; "
                "build batches with dvmrl.featurize"
            )
        # NOTE: CUDA tensors are not checked, so there a row of -1 still reads
        # the last element and bad fractions still give a prediction.
        if element_index.device.type == "cpu" and element_index.numel():
            self._check_values(element_index, frac, mask)

    def _check_values(
        self, element_index: torch.Tensor, frac: torch.Tensor, mask: torch.Tensor
    ) -> None:
        """Raise ValueError for element rows or fractions that no composition has.

        Only the real slots count. Tensor indexing would read -1 as the last
        element, so a bad row would give a prediction instead of an error.
        Runs on CPU tensors only, where it costs a few small reductions. On a
        GPU it would wait for the device at every forward.
        """
        rows = self.descriptors.shape[0]
        index_low, index_high = torch.aminmax(torch.where(mask, element_index, 0))
        if index_low < 0 or index_high >= rows:
            bad = element_index[mask & ((element_index < 0) | (element_index >= rows))]
            raise ValueError(
                f"element_index contains rows outside 0 .. {rows - 1}, such as "
                f"{bad[:5].tolist()}; build batches with dvmrl.featurize, whose rows "
                "are atomic numbers minus 1"
            )
        filled = mask.any(dim=1)
        if not bool(filled.all()):
            empty = torch.nonzero(~filled).flatten()
            raise ValueError(
                f"rows {empty[:5].tolist()} of mask have no real slot (all false), "
                "so they contain no composition; drop them or build batches with "
                "dvmrl.featurize"
            )
        real = torch.where(mask, frac, 0)
        frac_low, frac_high = torch.aminmax(real)
        sum_low, sum_high = torch.aminmax(real.sum(dim=1))
        # NaN fails every comparison, so it is caught here too.
        valid = frac_low >= 0 and frac_high <= 1
        if not (valid and sum_low > 1 - SUM_TOLERANCE and sum_high < 1 + SUM_TOLERANCE):
            raise ValueError(
                "frac must contain atomic fractions of the real slots, each in [0, 1] "
                f"and summing to 1 within {SUM_TOLERANCE:g} per composition; got "
                f"values in [{float(frac_low):.10g}, {float(frac_high):.10g}] and "
                f"sums in [{float(sum_low):.10g}, {float(sum_high):.10g}]; build "
                "batches with dvmrl.featurize, which normalises the amounts"
            )

    def forward_standardised(
        self, element_index: torch.Tensor, frac: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Return the raw network output [B, n_out] in standardised units.

        Column 0 is (prediction - target_mean) / target_std; with the
        heteroscedastic head column 1 is the log-variance in the same units.
        """
        self._check_inputs(element_index, frac, mask)
        if element_index.shape[0] == 0:
            # The kernels need at least one composition; an empty batch has
            # an empty output. Adding the empty sum of the weights keeps it in
            # the graph, so backward() gives zero gradients as for any batch.
            return frac.new_zeros((0, self.dims.n_out)) + self.flat[:0].sum()
        if self.config.fraction_hidden > 0:
            # The fraction encoder computes on every slot, so a NaN or an index
            # out of range in a padded slot would reach the outputs or the
            # gradients. The kernels skip padded slots, and the reference path
            # replaces them itself.
            frac = torch.where(mask, frac, 0)
            element_index = torch.where(mask, element_index, 0)
        from dvmrl import ops

        dropout_mask = self.draw_dropout_mask(element_index.shape[0])
        table, element_index = self.node_inputs(element_index, frac)
        # The fused kernels read raw buffers, so slices must be made contiguous.
        # Both paths go through ops.model_forward, whose checks (K <= 8, index
        # range) then hold for the reference path too.
        return ops.model_forward(
            table,
            self.flat,
            element_index.contiguous(),
            frac.contiguous(),
            mask.contiguous(),
            self.dims,
            dropout_mask,
            use_fused=self.use_fused,
        )

    def forward(
        self, element_index: torch.Tensor, frac: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Predict the target in eV/atom [B] (the mean for the heteroscedastic head).

        Args:
            element_index (Tensor): int64 [B, K] element-table rows.
            frac (Tensor): atomic fractions [B, K], the model's dtype.
            mask (Tensor): bool [B, K], true for real elements.
        """
        out = self.forward_standardised(element_index, frac, mask)
        return out[:, 0] * self.target_std + self.target_mean

    def forward_with_variance(
        self, element_index: torch.Tensor, frac: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict mean [B] in eV/atom and variance [B] in (eV/atom)^2.

        Raises:
            RuntimeError: if the head is not heteroscedastic.
        """
        if not self.config.heteroscedastic:
            raise RuntimeError(
                "forward_with_variance needs the heteroscedastic head; build the "
                "model with ModelConfig(heteroscedastic=True)"
            )
        out = self.forward_standardised(element_index, frac, mask)
        mean = out[:, 0] * self.target_std + self.target_mean
        log_variance = out[:, 1].clamp(LOG_VARIANCE_MIN, LOG_VARIANCE_MAX)
        return mean, torch.exp(log_variance) * self.target_std**2

    # -- state -----------------------------------------------------------

    def named_parameter_tensors(self) -> dict[str, torch.Tensor]:
        """Return every parameter by name: the flat entries and the embedding.

        The flat entries are views of ``flat`` (names from
        :func:`dvmrl.layout.parameter_layout`); the embedding parameters
        (``ModelConfig.embedding_names``) are the parameters themselves.
        """
        from dvmrl.layout import unflatten

        named = dict(unflatten(self.flat.detach(), self.dims))
        for name in self.config.embedding_names:
            named[name] = getattr(self, name).detach()
        return named

    @torch.no_grad()
    def load_named_parameters(self, named: dict[str, torch.Tensor]) -> None:
        """Copy named tensors (as from ``named_parameter_tensors``) into the model.

        Raises:
            ValueError: when a name is missing or a shape differs.
        """
        expected = {spec.name: spec for spec in parameter_layout(self.dims)}
        embedding_names = self.config.embedding_names
        missing = sorted((set(expected) | set(embedding_names)) - set(named))
        if missing:
            raise ValueError(f"missing parameters {missing} for {self.dims}")
        parts = []
        for name, spec in expected.items():
            value = named[name]
            if tuple(value.shape) != spec.shape:
                raise ValueError(
                    f"parameter {name}: expected shape {list(spec.shape)}, "
                    f"got {list(value.shape)}"
                )
            parts.append(value.reshape(-1).to(self.flat.dtype))
        flat = torch.cat(parts).to(self.flat.device)
        if flat.numel() != parameter_count(self.dims):
            raise ValueError("assembled flat buffer has the wrong length")
        for name in embedding_names:
            target = getattr(self, name)
            if tuple(named[name].shape) != tuple(target.shape):
                raise ValueError(
                    f"parameter {name}: expected shape {list(target.shape)}, "
                    f"got {list(named[name].shape)}"
                )
            target.copy_(named[name])
        self.flat.copy_(flat)

    @torch.no_grad()
    def rebuild(self, config: ModelConfig, named: dict[str, torch.Tensor]) -> None:
        """Replace the sizes and all parameters in place (architecture moves).

        The parameters become new ``nn.Parameter`` objects on the same device
        and dtype, so an optimiser built on the old ones must be rebuilt.

        Args:
            config (ModelConfig): the new sizes.
            named (dict): every parameter of the new sizes by name.
        """
        device, dtype = self.flat.device, self.flat.dtype
        dims = config.dims
        n_elements, n_features = self.descriptors.shape
        self.config = config
        # The same memory layout as orthogonal_embedding returns, so a rebuilt
        # model and a model built from its config run the same matrix-product
        # kernels and agree bit for bit: column-major (the QR factor) when
        # H >= F0, row-major (a matrix product) when H < F0.
        if dims.hidden >= n_features:
            emb_w = torch.empty(n_features, dims.hidden, device=device, dtype=dtype).T
        else:
            emb_w = torch.empty(dims.hidden, n_features, device=device, dtype=dtype)
        self.emb_w = nn.Parameter(emb_w)
        self.emb_b = nn.Parameter(torch.empty(dims.hidden, device=device, dtype=dtype))
        self.emb_offset = nn.Parameter(
            torch.empty(n_elements, dims.hidden, device=device, dtype=dtype)
        )
        self.flat = nn.Parameter(
            torch.empty(parameter_count(dims), device=device, dtype=dtype)
        )
        for name in FRACTION_ENCODER_NAMES:
            if hasattr(self, name):
                delattr(self, name)
        shapes = fraction_encoder_shapes(config.fraction_hidden, dims.hidden)
        for name, shape in shapes.items():
            value = torch.empty(shape, device=device, dtype=dtype)
            setattr(self, name, nn.Parameter(value))
        self.load_named_parameters(named)

    def extra_repr(self) -> str:
        """Describe the sizes for ``repr``."""
        return f"{self.dims}, use_fused={self.use_fused}"
