"""The block arguments shared by the backbone and the keypoint head: checked once, turned into a
function ``channels -> block``; and how their errors read for a YAML config.

Python and LazyConfig users pass explicit ``nonlocal_*`` arguments and see them named in errors;
the YAML builders map ``MODEL.NONLOCAL`` onto the same arguments (:func:`config_block_args`) and,
inside :func:`config_wording`, errors name the config keys instead.
"""

import contextlib
import inspect
import re
from typing import Callable, Iterator, Mapping, Optional

from torch import nn

from ..layers import BLOCK_TYPES, NORMS, PAIRWISE_FUNCTIONS, NonLocalBlock, check_choice

__all__ = ["CONFIG_NODES", "block_factory", "config_block_args", "config_wording"]

# MODEL.NONLOCAL.TYPE -> the config node holding that type's options (the non-local block's are
# MODEL.NONLOCAL.{PAIRWISE, INNER_RATIO, SUBSAMPLE, USE_SCALE, NORM, THETA_PHI_INIT, OUT_INIT_STD,
# WHITEN}, the last three its nonlocal_options).
CONFIG_NODES = {
    "simplified": "SNL",
    "global_context": "GC",
    "disentangled": "DNL",
    "criss_cross": "CC",
    "generalized_attention": "GA",
}
# NonLocalBlock's arguments block_factory passes explicitly (the rest: nonlocal_options)
_EXPLICIT = ("in_channels", "inner_channels", "pairwise", "dim", "subsample", "use_scale", "norm")


def block_factory(
    owner: str,
    *,
    type: str = "nonlocal",
    options: Optional[Mapping] = None,
    pairwise: str = "embedded_gaussian",
    inner_ratio: float = 0.5,
    subsample: bool = True,
    use_scale: bool = True,
    norm: str = "",
) -> Callable[[int], nn.Module]:
    """Check the ``nonlocal_*`` arguments of ``owner`` and return ``channels -> block``.

    Args:
        type: a key of :data:`nonlocal_det.layers.BLOCK_TYPES`.
        options: for the other types, arguments of their class (e.g. ``{"ratio": 1 / 4}`` for
            ``GlobalContextBlock``); the class's defaults are its authors'. For ``"nonlocal"``,
            ``NonLocalBlock``'s other arguments (``theta_phi_init``, ``out_init_std``, ``whiten``).
        pairwise, inner_ratio, subsample, use_scale, norm: the non-local block (type
            ``"nonlocal"``), C_inner = ``inner_ratio`` x C (at least 1).

    Raises:
        ValueError: ``"{owner}: nonlocal_<arg>=<value> is not supported; allowed: ..."``.
    """
    check_choice(owner, "nonlocal_type", type, BLOCK_TYPES)
    options = dict(options or {})
    if type != "nonlocal":
        cls = BLOCK_TYPES[type]
        allowed = [p for p in inspect.signature(cls).parameters if p != "in_channels"]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(
                f"{owner}: nonlocal_options={options} has unknown keys {unknown} for "
                f"nonlocal_type={type!r} ({cls.__name__}); allowed: {allowed}"
            )
        return lambda channels: cls(channels, **options)
    # the non-local block's other arguments (its initialisation options) come as options
    allowed = [p for p in inspect.signature(NonLocalBlock).parameters if p not in _EXPLICIT]
    if set(options) - set(allowed):
        raise ValueError(
            f"{owner}: nonlocal_options={options} has unknown keys "
            f"{sorted(set(options) - set(allowed))} for nonlocal_type='nonlocal' (the others are "
            f"nonlocal_pairwise, nonlocal_inner_ratio, ...); allowed: {allowed}"
        )
    check_choice(owner, "nonlocal_pairwise", pairwise, PAIRWISE_FUNCTIONS)
    check_choice(owner, "nonlocal_norm", norm, NORMS)
    if isinstance(inner_ratio, bool) or not isinstance(inner_ratio, (int, float)):
        inner_ratio = None
    if inner_ratio is None or not 0 < inner_ratio <= 1:
        raise ValueError(
            f"{owner}: nonlocal_inner_ratio={inner_ratio!r} is not supported; allowed: a number "
            "in (0, 1]"
        )
    for name, value in (("nonlocal_subsample", subsample), ("nonlocal_use_scale", use_scale)):
        check_choice(owner, name, value, (True, False))

    def build(channels: int) -> nn.Module:
        inner = max(1, int(round(channels * inner_ratio)))
        return NonLocalBlock(channels, inner, pairwise, 2, subsample, use_scale, norm, **options)

    return build


def config_block_args(cfg) -> dict:
    """The ``nonlocal_*`` block arguments given by ``cfg.MODEL.NONLOCAL``."""
    if "NONLOCAL" not in cfg.MODEL:
        raise KeyError(
            "cfg.MODEL.NONLOCAL is missing: call nonlocal_det.add_nonlocal_config(cfg) before "
            f"merge_from_file (MODEL.BACKBONE.NAME={cfg.MODEL.BACKBONE.NAME!r}, "
            f"MODEL.ROI_KEYPOINT_HEAD.NAME={cfg.MODEL.ROI_KEYPOINT_HEAD.NAME!r})"
        )
    nl = cfg.MODEL.NONLOCAL
    node = CONFIG_NODES.get(nl.TYPE)
    return {
        "nonlocal_type": nl.TYPE,
        "nonlocal_options": (
            {k.lower(): v for k, v in nl[node].items()}
            if node
            else {k.lower(): nl[k] for k in ("THETA_PHI_INIT", "OUT_INIT_STD", "WHITEN")}
        ),
        "nonlocal_pairwise": nl.PAIRWISE,
        "nonlocal_inner_ratio": nl.INNER_RATIO,
        "nonlocal_subsample": nl.SUBSAMPLE,
        "nonlocal_use_scale": nl.USE_SCALE,
        "nonlocal_norm": nl.NORM,
    }


# Explicit argument -> the config key it comes from (nonlocal_<key> -> MODEL.NONLOCAL.<KEY>).
_KEY_OF = {"nonlocal_after": "KEYPOINT_HEAD_BLOCKS"}
_NODE_OF_CLASS = {BLOCK_TYPES[t].__name__: node for t, node in CONFIG_NODES.items()}
_NODE_OF_CLASS["NonLocalBlock"] = ""  # its options: MODEL.NONLOCAL.<KEY>


def _reword(message: str) -> str:
    message = re.sub(r"^(NonLocalResNet|NonLocalKRCNNHead): ", "", message)
    message = re.sub(  # an option of a block type: its key in the type's node
        r"^(\w+): ([a-z_]+)=",
        lambda m: (
            ".".join(filter(None, ("MODEL.NONLOCAL", _NODE_OF_CLASS[m[1]], m[2].upper()))) + "="
            if m[1] in _NODE_OF_CLASS
            else m[0]
        ),
        message,
    )
    message = re.sub(
        r"nonlocal_blocks\['(res\d)'\]", lambda m: f"MODEL.NONLOCAL.{m[1].upper()}_BLOCKS", message
    )
    return re.sub(
        r"\bnonlocal_(?!det\b)([a-z_]+)",
        lambda m: "MODEL.NONLOCAL." + _KEY_OF.get(m[0], m[1].upper()),
        message,
    )


@contextlib.contextmanager
def config_wording() -> Iterator[None]:
    """Inside, a ``ValueError`` about ``nonlocal_*`` arguments or block options is re-raised
    naming the ``MODEL.NONLOCAL`` keys they come from (for the YAML builders and checks)."""
    try:
        yield
    except ValueError as e:
        raise ValueError(_reword(str(e))) from None
