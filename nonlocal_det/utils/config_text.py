"""Read an mmcv / mmengine config from its text (the ``meta['config']`` or ``meta['cfg']`` string
of an mmdetection checkpoint) without running it: only literals, ``dict``/``list``/``tuple``
calls, names assigned before and arithmetic on numbers and strings are evaluated; an assignment
with anything else (a function call, an import) is left out of the result."""

import ast
import operator
from typing import Any, Dict

__all__ = ["read_config_text"]

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow,
           ast.Mod: operator.mod}  # fmt: skip
_CONTAINERS = {"dict": dict, "list": list, "tuple": tuple}


class _NotALiteral(Exception):
    pass


def _value(node: ast.AST, names: Dict[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_value(e, names) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        return _dict(zip(node.keys, node.values), names)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        kind = _CONTAINERS.get(node.func.id)
        if kind is dict and not node.args:
            return _dict(((kw.arg, kw.value) for kw in node.keywords), names)
        if kind in (list, tuple) and len(node.args) <= 1 and not node.keywords:
            return kind(_value(node.args[0], names)) if node.args else kind()
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _value(node.operand, names)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left, names), _value(node.right, names)
        try:
            return _BINARY[type(node.op)](left, right)
        except (TypeError, ZeroDivisionError, OverflowError):
            pass
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    raise _NotALiteral(ast.dump(node)[:80])


def _dict(items, names: Dict[str, Any]) -> dict:
    """A dict of (key: a node, a keyword or None for ``**other``, value node) pairs."""
    out = {}
    for key, node in items:
        value = _value(node, names)
        if key is None and not isinstance(value, dict):
            raise _NotALiteral(f"** of a {type(value).__name__}")
        if key is None:
            out.update(value)
        else:
            out[key if isinstance(key, str) else _value(key, names)] = value
    return out


def read_config_text(text: str) -> Dict[str, Any]:
    """name -> value of the top-level assignments of an mmcv / mmengine config's Python ``text``
    whose values are literals (``dict(...)`` calls become dicts; other names are absent).
    Raises ValueError when the text is not Python."""
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        raise ValueError(f"the config text is not Python (line {e.lineno}: {e.msg})") from None
    names: Dict[str, Any] = {}
    for stmt in tree.body:
        if not isinstance(stmt, ast.Assign):
            continue
        try:
            value = _value(stmt.value, names)
        except _NotALiteral:
            continue
        for target in stmt.targets:
            if isinstance(target, ast.Name):
                names[target.id] = value
    return names
