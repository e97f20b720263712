"""The blocks of an mmdetection checkpoint (mmcv's ``ContextBlock`` and ``GeneralizedAttention``
plugins) as ``MODEL.NONLOCAL`` settings, from the weights and the config."""

from collections import OrderedDict
from typing import Any, List, Optional, Tuple

from .keys import PLUGIN_TYPES, Layout, UnsupportedCheckpoint, refused

__all__ = ["STAGES", "block_settings"]

STAGES = ("res2", "res3", "res4", "res5")
# mmcv's defaults where a config leaves a value out.
_GA_DEFAULTS = dict(spatial_range=-1, num_heads=9, position_embedding_dim=-1, position_magnitude=1,
                    kv_stride=2, q_stride=1, attention_type="1111")  # fmt: skip
_PUBLISHED_GA = dict(num_heads=8)  # configs/empirical_attention: the --assume-defaults values
_PRESETS = {
    frozenset({"res3", "res4", "res5"}): "all_res3_res5",
    frozenset({"res4", "res5"}): "all_res4_res5",
}


def _plugin_config(backbone: dict, kind: str) -> Tuple[Optional[dict], Optional[str]]:
    """(options, position) of the config's plugin of mmcv type ``kind``: mmdetection 2's
    ``plugins=[dict(cfg=..., stages=..., position=...)]`` or the older ``gcb`` /
    ``gen_attention`` keys (``stage_with_*``; GC after conv3, attention after conv2)."""
    mmcv_type = {"context_block": "ContextBlock", "gen_attention_block": "GeneralizedAttention"}
    found = []
    for plugin in backbone.get("plugins") or []:
        cfg = dict(plugin.get("cfg") or {})
        if cfg.get("type") != mmcv_type[kind]:
            why = f"only one plugin type per model is mapped ({mmcv_type[kind]} here)"
            raise refused("model.backbone.plugins", cfg.get("type"), why)
        cfg.pop("type")
        found.append((cfg, plugin.get("position")))
    key, position = {"context_block": ("gcb", "after_conv3")}.get(
        kind, ("gen_attention", "after_conv2"))  # fmt: skip
    if backbone.get(key):
        found.append((dict(backbone[key]), position))  # stage_with_*: the weights say where
    if len({repr(f[0]) for f in found}) > 1 or len({f[1] for f in found}) > 1:
        why = "blocks of different settings in one model are not mapped (one MODEL.NONLOCAL node)"
        raise refused("model.backbone.plugins", [f[0] for f in found], why)
    return found[0] if found else (None, None)


def _gc_options(lay: Layout, options: Optional[dict]) -> "OrderedDict[str, Any]":
    t = lay.plugin_tensors
    if "conv_mask.weight" not in t:
        raise UnsupportedCheckpoint(
            "ContextBlock with pooling_type 'avg' (no conv_mask): this project's "
            "GlobalContextBlock pools by attention only"
        )
    fusions = [f for f in ("add", "mul") if f"channel_{f}_conv.0.weight" in t]
    planes = t[f"channel_{fusions[0]}_conv.0.weight"][0]
    ratio = planes / lay.plugin_channels
    if options is not None:
        if options.get("pooling_type", "att") != "att":
            raise refused("ContextBlock.pooling_type", options["pooling_type"], "attention only")
        if int(lay.plugin_channels * options["ratio"]) != planes:
            why = f"the weights' width is {planes} of {lay.plugin_channels} channels"
            raise refused("ContextBlock.ratio", options["ratio"], why)
        ratio = float(options["ratio"])
    return OrderedDict([("RATIO", ratio), ("FUSION_TYPES", fusions)])


def _ga_options(
    lay: Layout, options: Optional[dict], assume: bool, notes: List[str]
) -> "OrderedDict[str, Any]":
    t, c = lay.plugin_tensors, lay.plugin_channels
    has = {n: f"{n}.weight" in t or n in t for n in ("query_conv", "appr_bias", "geom_bias")}
    if options is None:
        if not assume:
            raise UnsupportedCheckpoint(
                "GeneralizedAttention without a config: its num_heads, kv_stride and "
                "attention_type are not in the weights; pass --assume-defaults for mmdetection's "
                "published values (8 heads, kv_stride 2, '1111' or '0010' as the weights allow)"
            )
        guess = "1111" if has["query_conv"] and has["geom_bias"] else "0010"
        options = dict(_GA_DEFAULTS, **_PUBLISHED_GA, attention_type=guess)
        notes.append(f"assumed GeneralizedAttention {options}")
    o = dict(_GA_DEFAULTS, **options)
    kind = o["attention_type"]
    terms = [ch == "1" for ch in str(kind)]
    if terms[1] and not terms[3]:
        raise refused(
            "GeneralizedAttention.attention_type",
            kind,
            "mmcv computes the query-position term without the position-only term with the "
            "query's height and width swapped; this project's block computes the formula, so the "
            "results differ",
        )
    if o["spatial_range"] >= 0:
        raise refused(
            "GeneralizedAttention.spatial_range",
            o["spatial_range"],
            "mmcv's window (a precomputed map, the first query's window with '0010') is not "
            "reproduced exactly",
        )
    if not (has["appr_bias"] == terms[2] and has["geom_bias"] == terms[3]) or (
        has["query_conv"] != (terms[0] or terms[1])
    ):
        raise refused(
            "GeneralizedAttention.attention_type", kind, "the weights do not have its terms"
        )
    heads, d = o["num_heads"], c // o["num_heads"]
    if t["value_conv.weight"][0] != heads * d:
        why = f"value_conv has {t['value_conv.weight'][0]} outputs, not {heads} x {c} // {heads}"
        raise refused("GeneralizedAttention.num_heads", heads, why)
    out = OrderedDict(ATTENTION_TYPE=[int(v) for v in terms], NUM_HEADS=heads)
    for key in ("kv_stride", "q_stride", "spatial_range", "position_embedding_dim"):
        out[key.upper()] = o[key]
    out["POSITION_MAGNITUDE"] = float(o["position_magnitude"])
    return out


def block_settings(
    lay: Layout, backbone: dict, has_config: bool, assume: bool, notes: List[str]
) -> "OrderedDict[str, Any]":
    out = OrderedDict()
    if not lay.plugins:
        if backbone.get("plugins") or backbone.get("gcb") or backbone.get("gen_attention"):
            raise refused("model.backbone.plugins", backbone.get("plugins"), "no plugin weights")
        out["MODEL.BACKBONE.NAME"] = "build_resnet_fpn_backbone"
        return out
    kind = lay.plugin_kind
    options, position = _plugin_config(backbone, kind) if has_config else (None, None)
    if position is None:
        if has_config:
            raise refused("model.backbone.plugins", None, f"{kind} weights without a plugin")
        if lay.plugin_on_width and not assume:
            raise UnsupportedCheckpoint(
                f"{kind} on the bottleneck width without a config: after conv1 or after conv2 "
                "is not in the weights; pass --assume-defaults for after_conv2 (mmdetection's)"
            )
        position = "after_conv2" if lay.plugin_on_width else "after_conv3"
        if lay.plugin_on_width:
            notes.append(f"assumed {kind} position {position}")
    if position not in ("after_conv1", "after_conv2", "after_conv3"):
        raise refused("plugin position", position, "allowed: after_conv1, after_conv2, after_conv3")
    if (position == "after_conv3") == lay.plugin_on_width:
        raise refused(
            "plugin position", position, f"the weights see {lay.plugin_channels} channels"
        )
    out["MODEL.BACKBONE.NAME"] = "build_resnet_nonlocal_fpn_backbone"
    out["MODEL.NONLOCAL.ENABLED"] = True
    out["MODEL.NONLOCAL.TYPE"] = PLUGIN_TYPES[kind]
    full = all(len(lay.plugins[s]) == lay.stage_lengths[s] for s in lay.plugins)
    placement = _PRESETS.get(frozenset(lay.plugins)) if full else None
    out["MODEL.NONLOCAL.PLACEMENT"] = placement or "custom"
    out["MODEL.NONLOCAL.POSITION"] = position
    for stage in STAGES:
        blocks = [] if placement else sorted(lay.plugins.get(stage, {}))
        out[f"MODEL.NONLOCAL.{stage.upper()}_BLOCKS"] = blocks
    if kind == "context_block":
        node, values = "GC", _gc_options(lay, options)
    else:
        node, values = "GA", _ga_options(lay, options, assume, notes)
    for key, value in values.items():
        out[f"MODEL.NONLOCAL.{node}.{key}"] = value
    return out
