"""How a module becomes matrices (layer 2 of the package): layers, conv filters and attention
heads as the operators of arXiv 2512.00880 §2.1 / §3.1, with a registry for custom layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from torch_qmprune.spectral import operator_matrix

__all__ = [
    "OperatorView",
    "UnsupportedModuleError",
    "bert_head_matrices",
    "channel_matrices",
    "head_matrices",
    "layer_matrices",
    "operator_views",
    "register_operator",
    "unregister_operator",
]

HEAD_KINDS = ("head-qk", "head-vo")
BUILTIN_KINDS = ("linear", "conv", "embedding", *HEAD_KINDS)

Handler = Callable[[nn.Module], "OperatorView | Iterable[OperatorView]"]
ModuleFilter = Callable[[str, nn.Module], bool]
_H = TypeVar("_H", bound=Callable[..., Any])

# Modules that own parameters but are elementwise / diagonal (not operators in the paper's
# sense): skipped silently by the model walk instead of raising UnsupportedModuleError.
_PASSIVE: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.PReLU,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


class UnsupportedModuleError(TypeError):
    """Raised when a module has parameters but no registered operator handler.

    The message names the module's qualified name and type and how to register a handler.
    """


@dataclasses.dataclass(frozen=True)
class OperatorView:
    """One operator of a module, as a matrix (or a batch of matrices) plus its bias (§2.1).

    Attributes:
        name: qualified name (``layer_matrices`` fills in the module path; handlers give a
            suffix such as ``"qk"`` or ``""``).
        kind: operator family: ``"linear"``, ``"conv"``, ``"embedding"``, ``"head-qk"``,
            ``"head-vo"`` or any string a custom handler chooses (hardware weights key on it).
        matrix: ``(m, n)`` matrix, or ``(B, m, n)`` batch whose members *add up* to the layer
            operator (attention heads: Σ_h W_Q_hᵀ W_K_h = W_Qᵀ W_K).
        bias: ``(m,)`` for a matrix, ``(B, m)`` for a batch, or ``None``.
        shared_bias: ``(m,)`` bias added once after summing a batch (the output projection's
            bias for ``head-vo``), or ``None``.

    Example:
        >>> v = OperatorView("fc", "linear", torch.eye(3), torch.zeros(3))
        >>> v.layer_matrix().shape, v.is_batch
        (torch.Size([3, 3]), False)
    """

    name: str
    kind: str
    matrix: Tensor
    bias: Tensor | None = None
    shared_bias: Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not isinstance(self.kind, str) or not self.kind:
            raise TypeError(
                f"OperatorView name and kind must be strings (kind non-empty), got "
                f"name={self.name!r}, kind={self.kind!r}"
            )
        if not isinstance(self.matrix, Tensor) or self.matrix.ndim not in (2, 3):
            shape = tuple(self.matrix.shape) if isinstance(self.matrix, Tensor) else None
            raise ValueError(
                f"OperatorView {self.name!r}: matrix must be a (m, n) or (B, m, n) tensor, got "
                f"{type(self.matrix).__name__} of shape {shape}"
            )
        rows = tuple(self.matrix.shape[:-1])
        if self.bias is not None and (
            not isinstance(self.bias, Tensor) or tuple(self.bias.shape) != rows
        ):
            got = tuple(self.bias.shape) if isinstance(self.bias, Tensor) else self.bias
            raise ValueError(f"OperatorView {self.name!r}: bias must have shape {rows}, got {got}")
        m = self.matrix.shape[-2]
        if self.shared_bias is not None and (
            not isinstance(self.shared_bias, Tensor) or tuple(self.shared_bias.shape) != (m,)
        ):
            raise ValueError(f"OperatorView {self.name!r}: shared_bias must have shape ({m},)")

    @property
    def is_batch(self) -> bool:
        """``True`` when ``matrix`` is a ``(B, m, n)`` batch (e.g. one matrix per head)."""
        return self.matrix.ndim == 3

    def layer_matrix(self) -> Tensor:
        """The whole operator as one ``(m, n)`` matrix: a batch is summed over its members."""
        return self.matrix.sum(dim=0) if self.is_batch else self.matrix

    def layer_bias(self) -> Tensor | None:
        """Bias of :meth:`layer_matrix`: batch biases summed, plus ``shared_bias``."""
        bias = self.bias
        if bias is not None and self.is_batch:
            bias = bias.sum(dim=0)
        if self.shared_bias is not None:
            bias = self.shared_bias if bias is None else bias + self.shared_bias
        return bias


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------

_REGISTRY: dict[type[nn.Module], Handler] = {}


def register_operator(module_type: type[nn.Module], handler: _H | None = None) -> Any:
    """Teach torch_qmprune how a module type becomes operators (§3.1: the QM-FRG's vertices).

    ``handler(module)`` returns one :class:`OperatorView` or an iterable of them; names are
    suffixes appended to the module's path (``""`` for a single view). Lookup follows the
    MRO, so a handler for a base class covers its subclasses, and registering a type again
    replaces its handler (built-ins included). Usable as a decorator.

    Args:
        module_type: a subclass of ``nn.Module``.
        handler: callable ``(module) -> OperatorView | Iterable[OperatorView]``; omit it to use
            ``register_operator(MyLayer)`` as a decorator.

    Returns:
        ``handler`` (or the decorator when ``handler`` is omitted).

    Example:
        >>> class Scale(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = nn.Parameter(torch.ones(4, 4))
        >>> @register_operator(Scale)
        ... def _scale(module):
        ...     return OperatorView("", "linear", module.w.detach())
        >>> list(layer_matrices(nn.Sequential(Scale())))
        ['0']
        >>> unregister_operator(Scale)
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be a subclass of torch.nn.Module, got {module_type!r}")
    if handler is None:

        def decorator(fn: _H) -> _H:
            register_operator(module_type, fn)
            return fn

        return decorator
    if not callable(handler):
        raise TypeError(f"handler must be callable, got {type(handler).__name__}")
    _REGISTRY[module_type] = handler
    return handler


def unregister_operator(module_type: type[nn.Module]) -> None:
    """Remove the handler registered for exactly ``module_type`` (``KeyError`` if none).

    Example:
        >>> class Tmp(nn.Linear): pass
        >>> _ = register_operator(Tmp, lambda m: OperatorView("", "linear", m.weight))
        >>> unregister_operator(Tmp)
    """
    if module_type not in _REGISTRY:
        raise KeyError(f"no operator handler is registered for {module_type!r}")
    del _REGISTRY[module_type]


def _lookup(module: nn.Module) -> Handler | None:
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    if _bert_parts(module) is not None:
        return _bert_handler
    return None


def _type_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _unsupported(module: nn.Module, name: str | None, what: str = "operator") -> Exception:
    where = f"module {name!r}" if name else "module"
    cls = type(module).__name__
    return UnsupportedModuleError(
        f"{where} of type {_type_name(module)} has no {what} handler; register it with "
        f"torch_qmprune.register_operator({cls}, handler), where handler(module) returns "
        "OperatorView(s)"
    )


def operator_views(module: nn.Module, name: str = "") -> list[OperatorView]:
    """The operators of one module (§2.1), with ``name`` as their path prefix.

    Built-ins: ``nn.Linear`` (``W`` ``(out, in)``), ``nn.Conv1d/2d/3d`` and
    ``nn.ConvTranspose1d/2d/3d`` (``C_out x C_in·∏k``; grouped convs give the block-diagonal
    operator, see :func:`channel_matrices`), ``nn.Embedding`` (``(num, dim)``),
    ``nn.MultiheadAttention`` and BERT-style attention (per-head ``head-qk`` / ``head-vo``
    batches, see :func:`head_matrices`), plus anything registered with
    :func:`register_operator`.

    Raises:
        UnsupportedModuleError: no handler (the message says how to register one).

    Example:
        >>> [v.kind for v in operator_views(nn.MultiheadAttention(8, 2), "attn")]
        ['head-qk', 'head-vo']
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    handler = _lookup(module)
    if handler is None:
        raise _unsupported(module, name)
    with torch.no_grad():
        out = handler(module)
    views = [out] if isinstance(out, OperatorView) else list(out) if out is not None else []
    result = []
    for view in views:
        if not isinstance(view, OperatorView):
            raise TypeError(
                f"operator handler for {_type_name(module)} must return OperatorView(s), got "
                f"{type(view).__name__}"
            )
        full = ".".join(p for p in (name, view.name) if p) or type(module).__name__
        result.append(dataclasses.replace(view, name=full))
    return result


def _walk(
    model: nn.Module, module_filter: ModuleFilter | None, strict: bool
) -> Iterator[tuple[str, nn.Module]]:
    """Outermost supported modules of ``model`` (a handled module consumes its subtree)."""
    consumed: list[str] = []
    for name, module in model.named_modules():
        if any(p == "" or name.startswith(p + ".") for p in consumed):
            continue
        handled = _lookup(module) is not None
        if handled:
            consumed.append(name)
        if module_filter is not None and not module_filter(name, module):
            continue
        if handled:
            yield name, module
        elif (
            strict
            and not isinstance(module, _PASSIVE)
            and next(module.children(), None) is None
            and next(module.parameters(recurse=False), None) is not None
        ):
            raise _unsupported(module, name)


def layer_matrices(
    model: nn.Module, *, module_filter: ModuleFilter | None = None, strict: bool = True
) -> dict[str, OperatorView]:
    """Every supported operator of ``model`` by qualified name (§3.1, layer-level vertices).

    Modules are visited in ``named_modules`` order; a module with a handler consumes its
    subtree (``nn.MultiheadAttention`` covers its ``out_proj``; a BERT-style attention block
    covers ``self.query/key/value`` and ``output.dense``). Parameter-free modules, containers
    and normalization layers (BatchNorm, LayerNorm, GroupNorm, RMSNorm, PReLU: elementwise,
    not operators) are skipped.

    Args:
        model: any ``nn.Module``.
        module_filter: optional ``(name, module) -> bool``; modules it rejects are skipped
            (and never raise).
        strict: raise :class:`UnsupportedModuleError` for a leaf module that owns parameters
            and has no handler (default); ``False`` skips it.

    Returns:
        ``{name: OperatorView}``; attention modules give ``name.qk`` and ``name.vo`` batches.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
        >>> {k: tuple(v.matrix.shape) for k, v in layer_matrices(net).items()}
        {'0': (8, 27), '3': (2, 8)}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    views: dict[str, OperatorView] = {}
    for name, module in _walk(model, module_filter, strict):
        for view in operator_views(module, name):
            views[view.name] = view
    return views


# ---------------------------------------------------------------------------------------------
# linear, conv, embedding
# ---------------------------------------------------------------------------------------------

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _bias(module: nn.Module) -> Tensor | None:
    bias = getattr(module, "bias", None)
    return bias.detach() if isinstance(bias, Tensor) else None


def _conv_groups(module: nn.Module) -> Tensor:
    """Weight as ``(groups, C_out/g, C_in/g, ∏k)`` for both conv and transposed conv."""
    w = module.weight.detach()
    g = module.groups
    if isinstance(module, _CONV_T):  # stored (C_in, C_out/g, *k)
        c_in, c_out_g = w.shape[0], w.shape[1]
        w = w.reshape(g, c_in // g, c_out_g, -1).transpose(1, 2)
        return w
    c_out, c_in_g = w.shape[0], w.shape[1]
    return w.reshape(g, c_out // g, c_in_g, -1)


def _linear_handler(module: nn.Module) -> OperatorView:
    return OperatorView("", "linear", module.weight.detach(), _bias(module))


def _conv_handler(module: nn.Module) -> OperatorView:
    blocks = _conv_groups(module)
    g, c_out_g = blocks.shape[0], blocks.shape[1]
    flat = blocks.reshape(g, c_out_g, -1)
    if g == 1 and not isinstance(module, _CONV_T):
        matrix = operator_matrix(module.weight.detach())
    else:
        matrix = torch.block_diag(*flat.unbind(0))
    return OperatorView("", "conv", matrix, _bias(module))


def _embedding_handler(module: nn.Module) -> OperatorView:
    return OperatorView("", "embedding", module.weight.detach())


def channel_matrices(module: nn.Module) -> Tensor:
    """Per-output-channel matrices of a conv or linear layer (§2.1 applied to channels, §3.1).

    ConvNd: filter ``i`` as a ``C_in/g x ∏k`` matrix (input channels × kernel taps), so the
    result is ``(C_out, C_in/g, ∏k)``. For a grouped conv (``groups=g``) filter ``i`` only
    sees the ``C_in/g`` inputs of its group; at layer level the operator is the
    block-diagonal ``C_out x C_in·∏k`` matrix of the ``g`` groups (its spectrum is the union
    of the groups' spectra), not the stored weight reshaped. ConvTransposeNd: output channel
    ``o`` reads ``weight[:, o]``, giving the same ``(C_out, C_in/g, ∏k)`` layout.

    ``nn.Linear``: ``(C_out, 1, in)``: each row is a ``1 x in`` matrix with a single singular
    value, so its spectral state is degenerate (always ``[1]``); only the bias-augmented
    state carries information (the ratio ``|b_i| / ‖w_i‖``). See SCIENCE.md §2.

    Raises:
        UnsupportedModuleError: any other module type.

    Example:
        >>> channel_matrices(nn.Conv2d(3, 8, 3)).shape
        torch.Size([8, 3, 9])
        >>> channel_matrices(nn.Linear(5, 4)).shape
        torch.Size([4, 1, 5])
    """
    if isinstance(module, nn.Linear):
        return module.weight.detach().unsqueeze(1)
    if isinstance(module, _CONV + _CONV_T):
        blocks = _conv_groups(module)
        return blocks.reshape(-1, blocks.shape[2], blocks.shape[3])
    raise _unsupported(module, None, "channel")


# ---------------------------------------------------------------------------------------------
# attention heads
# ---------------------------------------------------------------------------------------------


def _head_views(
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    bv: Tensor | None,
    wo: Tensor,
    bo: Tensor | None,
    heads: int,
) -> list[OperatorView]:
    """Per-head W_Q_hᵀW_K_h and W_O_h W_V_h from projection weights in torch's (out, in) layout.

    Rows of ``wq``/``wk``/``wv`` are split into ``heads`` blocks of ``head_dim`` and columns of
    ``wo`` likewise, as in ``nn.MultiheadAttention`` and BERT.
    """
    hd = wq.shape[0] // heads
    q = wq.reshape(heads, hd, wq.shape[1])
    k = wk.reshape(heads, hd, wk.shape[1])
    v = wv.reshape(heads, hd, wv.shape[1])
    o = wo.reshape(wo.shape[0], heads, hd).permute(1, 0, 2)  # (H, E_out, hd)
    qk = q.transpose(1, 2) @ k  # (H, E_q, E_k): scores_h = x_qᵀ qk_h x_k / sqrt(hd)
    vo = o @ v  # (H, E_out, E_v): head h's value-to-output map
    vo_bias = None if bv is None else (o @ bv.reshape(heads, hd, 1)).squeeze(-1)
    return [
        OperatorView("qk", "head-qk", qk),
        OperatorView("vo", "head-vo", vo, vo_bias, bo),
    ]


def _mha_handler(module: nn.Module) -> list[OperatorView]:
    e = module.embed_dim
    if module._qkv_same_embed_dim:
        w = module.in_proj_weight.detach()
        wq, wk, wv = w[:e], w[e : 2 * e], w[2 * e :]
    else:
        wq = module.q_proj_weight.detach()
        wk = module.k_proj_weight.detach()
        wv = module.v_proj_weight.detach()
    b = module.in_proj_bias
    bv = None if b is None else b.detach()[2 * e :]
    return _head_views(
        wq, wk, wv, bv, module.out_proj.weight.detach(), _bias(module.out_proj), module.num_heads
    )


def _bert_parts(module: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """``(self_attention, output_dense)`` for a BERT-like attention block, else ``None``."""
    inner = module._modules.get("self")
    output = module._modules.get("output")
    dense = None if output is None else output._modules.get("dense")
    if inner is None or not isinstance(dense, nn.Linear):
        return None
    if not all(isinstance(inner._modules.get(p), nn.Linear) for p in ("query", "key", "value")):
        return None
    if not isinstance(getattr(inner, "num_attention_heads", None), int):
        return None
    return inner, dense


def _bert_handler(module: nn.Module) -> list[OperatorView]:
    parts = _bert_parts(module)
    assert parts is not None
    inner, dense = parts
    heads = inner.num_attention_heads
    size = getattr(inner, "attention_head_size", None)
    if isinstance(size, int) and size * heads != inner.query.out_features:
        raise ValueError(
            f"num_attention_heads={heads} x attention_head_size={size} does not match "
            f"query.out_features={inner.query.out_features}"
        )
    return _head_views(
        inner.query.weight.detach(),
        inner.key.weight.detach(),
        inner.value.weight.detach(),
        _bias(inner.value),
        dense.weight.detach(),
        _bias(dense),
        heads,
    )


def _as_head_dict(views: list[OperatorView], num_heads: int | None, module: nn.Module) -> dict:
    by_kind = {v.kind: v for v in views if v.kind in HEAD_KINDS and v.is_batch}
    if set(by_kind) != set(HEAD_KINDS):  # a handler exists but gives no per-head batches
        raise _unsupported(module, None, "attention-head")
    qk, vo = by_kind["head-qk"], by_kind["head-vo"]
    heads = qk.matrix.shape[0]
    if num_heads is not None and num_heads != heads:
        raise ValueError(f"num_heads={num_heads!r} but {_type_name(module)} has {heads} heads")
    return {"qk": qk.matrix, "vo": vo.matrix, "vo_bias": vo.bias}


def bert_head_matrices(attention_module: nn.Module) -> dict[str, Tensor | None]:
    """Per-head matrices of a Hugging Face BERT-style attention block (§3.1 head vertices).

    ``attention_module`` is the ``BertAttention``-like parent holding ``self`` (with
    ``query``, ``key``, ``value`` ``nn.Linear`` and ``num_attention_heads``) and
    ``output.dense`` (the output projection). The self-attention alone has no output
    projection, so the ``vo`` matrices need the parent. Orientation as in
    :func:`head_matrices`.

    Returns:
        ``{"qk": (H, E, E), "vo": (H, E, E), "vo_bias": (H, E) or None}``.

    Example:
        >>> from transformers import BertConfig, BertModel  # doctest: +SKIP
        >>> cfg = BertConfig(hidden_size=32, num_attention_heads=4)  # doctest: +SKIP
        >>> bert = BertModel(cfg)  # doctest: +SKIP
        >>> bert_head_matrices(bert.encoder.layer[0].attention)["qk"].shape  # doctest: +SKIP
        torch.Size([4, 32, 32])
    """
    if not isinstance(attention_module, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(attention_module).__name__}")
    if _bert_parts(attention_module) is None:
        if all(hasattr(attention_module, p) for p in ("query", "key", "value")):
            raise ValueError(
                f"{_type_name(attention_module)} is the self-attention alone; pass its parent "
                "(BertAttention-like, holding .self and .output.dense) so that the output "
                "projection needed by the 'vo' matrices is available"
            )
        raise _unsupported(attention_module, None, "BERT attention")
    with torch.no_grad():
        views = _bert_handler(attention_module)
    return _as_head_dict(views, None, attention_module)


def head_matrices(module: nn.Module, num_heads: int | None = None) -> dict[str, Tensor | None]:
    """Per-head operators of an attention module (§3.1 head vertices; SCIENCE.md §2).

    In torch's ``(out, in)`` layout with head ``h`` owning rows ``h·d_h:(h+1)·d_h`` of the
    query/key/value projections and the same columns of the output projection:

    - ``qk[h] = W_Q_hᵀ W_K_h`` (``E x kdim``), the bilinear form in the *input* basis:
      ``score_h(x_q, x_k) = x_qᵀ qk[h] x_k / sqrt(d_h)`` (bias-free; the paper's
      ``W_Q·W_Kᵀ`` in its row-vector convention; same singular values).
    - ``vo[h] = W_O[:, h] W_V_h`` (``E x vdim``), head ``h``'s map from value input to
      output (the paper's ``W_V·W_O`` transposed); ``vo_bias[h] = W_O[:, h] b_V_h``.

    Summed over heads these are ``W_Qᵀ W_K`` and ``W_O W_V``. ``batch_first`` does not change
    the weights; ``kdim``/``vdim`` (separate ``q/k/v_proj_weight``) are supported;
    ``bias_k``/``bias_v``/``add_zero_attn`` (extra key/value tokens) are not operators and
    are ignored.

    Args:
        module: ``nn.MultiheadAttention``, a BERT-style attention block (see
            :func:`bert_head_matrices`) or a registered module whose handler returns
            ``head-qk`` and ``head-vo`` batches.
        num_heads: expected head count, checked against the module's (``ValueError``).

    Returns:
        ``{"qk": (H, E, kdim), "vo": (H, E, vdim), "vo_bias": (H, E) or None}``.

    Example:
        >>> hm = head_matrices(nn.MultiheadAttention(16, 4, batch_first=True))
        >>> hm["qk"].shape, hm["vo"].shape
        (torch.Size([4, 16, 16]), torch.Size([4, 16, 16]))
    """
    if num_heads is not None and (
        isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1
    ):
        raise ValueError(f"num_heads must be a positive int or None, got {num_heads!r}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if _lookup(module) is None and all(hasattr(module, p) for p in ("query", "key", "value")):
        return bert_head_matrices(module)  # raises the "pass the parent" error
    if _lookup(module) is None:
        raise _unsupported(module, None, "attention-head")
    return _as_head_dict(operator_views(module), num_heads, module)


register_operator(nn.Linear, _linear_handler)
for _t in _CONV + _CONV_T:
    register_operator(_t, _conv_handler)
register_operator(nn.Embedding, _embedding_handler)
register_operator(nn.MultiheadAttention, _mha_handler)
del _t
