"""The block spec: which block goes into a model, the same everywhere (backbone, keypoint head,
LazyConfig helper, YAML), and how its errors read for a YAML config.

A spec is a mapping ``{"type": <key of nonlocal_det.layers.BLOCK_TYPES>, "options": {...}}``. The
options are keyword arguments of that type's class (``NonLocalBlock``, ``GlobalContextBlock``,
...), checked against its signature, so a new constructor option is a new option here with no
other change; ``in_channels`` comes from where the block sits. A class that takes
``inner_channels`` also takes ``inner_ratio`` (``inner_channels = max(1, round(inner_ratio x C))``
for the C of each place: one spec serves blocks of every width; ``MODEL.NONLOCAL.INNER_RATIO``).

The YAML builders read the spec from ``MODEL.NONLOCAL`` (:func:`config_block_spec`): ``TYPE``, and
the type's node (``GC``, ``DNL``, ...) or, for the non-local block, the keys of ``MODEL.NONLOCAL``
named like its arguments (``PAIRWISE``, ``SUBSAMPLE``, ``USE_SCALE``, ``NORM``, ...). Inside
:func:`config_wording` errors name those keys instead of the Python arguments.
"""

import contextlib
import inspect
import re
from typing import Callable, Dict, Iterator, List, Mapping, Optional

from torch import nn

from ..layers import BLOCK_TYPES

__all__ = [
    "CONFIG_NODES",
    "DEFAULT_SPEC",
    "block_builder",
    "block_options",
    "config_block_spec",
    "config_wording",
    "legacy_spec",
]

# MODEL.NONLOCAL.TYPE -> the config node holding that type's options ("" : MODEL.NONLOCAL itself).
CONFIG_NODES = {
    "nonlocal": "",
    "simplified": "SNL",
    "global_context": "GC",
    "disentangled": "DNL",
    "criss_cross": "CC",
    "generalized_attention": "GA",
}
DEFAULT_SPEC = {"type": "nonlocal", "options": {}}
_RATIO = "inner_ratio"  # the one option derived from a class argument (inner_channels)


def block_options(cls: type) -> List[str]:
    """The options a spec may give for a block class: its keyword arguments but ``in_channels``
    (plus ``inner_ratio`` where it takes ``inner_channels``)."""
    names = [p for p in inspect.signature(cls).parameters if p != "in_channels"]
    return names + ([_RATIO] if "inner_channels" in names else [])


def _check_spec(owner: str, spec) -> Dict:
    allowed = (
        f"allowed: a mapping {{'type': one of {list(BLOCK_TYPES)}, 'options': {{keyword "
        "arguments of that type's class}}"
    )
    if not isinstance(spec, Mapping) or set(spec) - {"type", "options"} or "type" not in spec:
        raise ValueError(f"{owner}: nonlocal_spec={spec!r} is not supported; {allowed}")
    kind, options = spec["type"], spec.get("options") or {}
    if kind not in BLOCK_TYPES:
        raise ValueError(
            f"{owner}: nonlocal_spec['type']={kind!r} is not supported; allowed: "
            f"{list(BLOCK_TYPES)}"
        )
    if not isinstance(options, Mapping):
        raise ValueError(
            f"{owner}: nonlocal_spec['options']={options!r} is not a mapping; {allowed}"
        )
    return dict(options)


def block_builder(owner: str, spec: Optional[Mapping] = None) -> Callable[[int], nn.Module]:
    """Check a block spec and return ``channels -> block``.

    Args:
        owner: who asks (named in errors), e.g. ``"NonLocalKRCNNHead"``.
        spec: ``{"type": ..., "options": {...}}``; None: :data:`DEFAULT_SPEC` (the paper's
            non-local block with its defaults).

    Raises:
        ValueError: naming the spec's entry, its value and what is allowed. Errors of an option's
            value are raised by the class when a block is built (``"GlobalContextBlock:
            ratio=0.0 is not supported ..."``).
    """
    spec = DEFAULT_SPEC if spec is None else spec
    options = _check_spec(owner, spec)
    cls = BLOCK_TYPES[spec["type"]]
    allowed = block_options(cls)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"{owner}: nonlocal_spec['options']={options} has unknown keys {unknown} for type "
            f"{spec['type']!r} ({cls.__name__}); allowed: {allowed}"
        )
    defaults = inspect.signature(cls).parameters
    for name, value in options.items():
        if (
            name in defaults
            and isinstance(defaults[name].default, bool)
            and not isinstance(value, bool)
        ):
            raise ValueError(
                f"{cls.__name__}: {name}={value!r} is not supported; allowed: True or False"
            )
    ratio = options.pop(_RATIO, None)
    if ratio is not None:
        if "inner_channels" in options:
            raise ValueError(
                f"{cls.__name__}: inner_channels={options['inner_channels']!r} and "
                f"inner_ratio={ratio!r} are both given; allowed: one of them"
            )
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(
                f"{cls.__name__}: {_RATIO}={ratio!r} is not supported; allowed: a number in (0, 1]"
            )

    def build(channels: int) -> nn.Module:
        if ratio is None:
            return cls(channels, **options)
        return cls(channels, inner_channels=max(1, int(round(channels * ratio))), **options)

    return build


def legacy_spec(owner: str, spec: Optional[Mapping], legacy: Mapping, others) -> Optional[Mapping]:
    """The spec given the old way: ``nonlocal_type``, ``nonlocal_options`` and one
    ``nonlocal_<option>`` argument per option of the non-local block (``nonlocal_pairwise``,
    ``nonlocal_inner_ratio``, ...), as :class:`NonLocalResNet` and :class:`NonLocalKRCNNHead`
    took them before ``nonlocal_spec``. Returns ``spec`` when there is none.

    Raises:
        TypeError: an argument that is none of these (``others``: the owner's other ones), or
            these beside ``nonlocal_spec``.
    """
    if not legacy:
        return spec
    legacy = dict(legacy)
    kind = legacy.pop("nonlocal_type", "nonlocal")
    options = dict(legacy.pop("nonlocal_options", None) or {})
    allowed = block_options(BLOCK_TYPES[kind]) if kind in BLOCK_TYPES else []
    bad = sorted(k for k in legacy if k[len("nonlocal_") :] not in allowed)
    if bad or spec is not None:
        old = ["nonlocal_type", "nonlocal_options"] + [f"nonlocal_{o}" for o in allowed]
        raise TypeError(
            f"{owner}: unexpected arguments {bad or ['nonlocal_spec'] + sorted(legacy)}; "
            f"allowed: {list(others)}, or instead of nonlocal_spec the older {old}"
        )
    options.update({k[len("nonlocal_") :]: v for k, v in legacy.items()})
    return {"type": kind, "options": options}


def config_block_spec(cfg) -> Dict:
    """The block spec given by ``cfg.MODEL.NONLOCAL``: ``TYPE`` and that type's node, lower-cased
    (the non-local block: the keys of ``MODEL.NONLOCAL`` named like its options)."""
    if "NONLOCAL" not in cfg.MODEL:
        raise KeyError(
            "cfg.MODEL.NONLOCAL is missing: call nonlocal_det.add_nonlocal_config(cfg) before "
            f"merge_from_file (MODEL.BACKBONE.NAME={cfg.MODEL.BACKBONE.NAME!r}, "
            f"MODEL.ROI_KEYPOINT_HEAD.NAME={cfg.MODEL.ROI_KEYPOINT_HEAD.NAME!r})"
        )
    nl = cfg.MODEL.NONLOCAL
    node = CONFIG_NODES.get(nl.TYPE)
    if node is None:  # block_builder names the allowed types
        return {"type": nl.TYPE, "options": {}}
    allowed = block_options(BLOCK_TYPES[nl.TYPE])
    options = {k.lower(): v for k, v in (nl[node] if node else nl).items()}
    return {"type": nl.TYPE, "options": {k: v for k, v in options.items() if k in allowed}}


# Explicit argument -> the config key it comes from (nonlocal_<key> -> MODEL.NONLOCAL.<KEY>).
_KEY_OF = {"nonlocal_after": "KEYPOINT_HEAD_BLOCKS", "nonlocal_base": "BASE_BACKBONE"}
_NODE_OF_CLASS = {BLOCK_TYPES[t].__name__: node for t, node in CONFIG_NODES.items()}


def _option_key(m: re.Match) -> str:
    node = _NODE_OF_CLASS[m[1]]
    return f"MODEL.NONLOCAL.{node + '.' if node else ''}{m[2].upper()}="


def _reword(message: str) -> str:
    message = re.sub(r"^[\w ]+: (?=nonlocal_)", "", message)  # "NonLocalResNet: ", ...
    message = re.sub(  # an option of a block type: its key in the type's node
        r"^(\w+): ([a-z_]+)=",
        lambda m: _option_key(m) if m[1] in _NODE_OF_CLASS else m[0],
        message,
    )
    message = message.replace("nonlocal_spec['type']", "MODEL.NONLOCAL.TYPE")
    message = re.sub(
        r"nonlocal_blocks\['(\w+)'\]", lambda m: f"MODEL.NONLOCAL.{m[1].upper()}_BLOCKS", message
    )
    return re.sub(
        r"\bnonlocal_(?!det\b|block\b)([a-z_]+)",
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
