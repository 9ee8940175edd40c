"""OpenMM's Lepton expressions (the energy strings of custom forces) as torch computations."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Expression", "parse_expression"]

Value = float | Tensor


def _as_tensors(args: tuple[Value, ...]) -> tuple[Tensor, ...]:
    """The arguments as tensors, numbers as 0-dim tensors like the first tensor (or float64)."""
    like = next((a for a in args if isinstance(a, Tensor)), None)
    dtype = torch.float64 if like is None else like.dtype
    device = None if like is None else like.device
    return tuple(torch.as_tensor(a, dtype=dtype, device=device) for a in args)


def _indicator(condition: Tensor, like: Tensor) -> Tensor:
    return condition.to(like.dtype)


# Lepton's functions. At their kinks they differentiate as Lepton does: min and max pass the
# derivative to one argument at a tie (min: the second, max: the first), abs has derivative
# +1 at 0; step, delta, floor and ceil have derivative zero.
_FUNCTIONS: dict[str, tuple[int, Callable[..., Tensor]]] = {
    "sqrt": (1, torch.sqrt),
    "exp": (1, torch.exp),
    "log": (1, torch.log),
    "sin": (1, torch.sin),
    "cos": (1, torch.cos),
    "sec": (1, lambda x: 1 / torch.cos(x)),
    "csc": (1, lambda x: 1 / torch.sin(x)),
    "tan": (1, torch.tan),
    "cot": (1, lambda x: 1 / torch.tan(x)),
    "asin": (1, torch.asin),
    "acos": (1, torch.acos),
    "atan": (1, torch.atan),
    "atan2": (2, torch.atan2),
    "sinh": (1, torch.sinh),
    "cosh": (1, torch.cosh),
    "tanh": (1, torch.tanh),
    "erf": (1, torch.special.erf),
    "erfc": (1, torch.special.erfc),
    "step": (1, lambda x: _indicator(x >= 0, x)),
    "delta": (1, lambda x: _indicator(x == 0, x)),
    "square": (1, lambda x: x * x),
    "cube": (1, lambda x: x * x * x),
    "recip": (1, lambda x: 1 / x),
    "min": (2, lambda x, y: torch.where(x >= y, y, x)),
    "max": (2, lambda x, y: torch.where(x >= y, x, y)),
    "abs": (1, lambda x: torch.where(x >= 0, x, -x)),
    "floor": (1, torch.floor),
    "ceil": (1, torch.ceil),
    "select": (3, lambda c, a, b: torch.where(c != 0, a, b)),
}

_OPERATORS: dict[str, Callable[[Value, Value], Value]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
    "^": torch.pow,
}
# Lepton's binding: + - bind weakest, then * /, then unary minus, then ^ (right-associative).
_PRECEDENCE = {"+": 0, "-": 0, "*": 1, "/": 1, "^": 3}
_NEGATE_PRECEDENCE = 2

_TOKEN = re.compile(
    r"\s*(?:(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<symbol>[-+*/^(),]))"
)


@dataclass(eq=False)
class _Node:
    """One node of an expression tree: a constant, a variable, or an operation on children.

    Definitions (``name=...`` after a ';') are inlined as shared nodes, so a value used twice
    is computed once per evaluation.
    """

    kind: str  # "constant", "variable", an operator, "negate", or a function name
    args: tuple[_Node, ...] = ()
    value: Value = 0.0
    name: str = ""


def _tokenize(text: str, expression: str) -> list[str]:
    tokens, position = [], 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise ValueError(
                f"cannot parse {text[position:].strip()!r} in the expression {expression!r}"
            )
        tokens.append(match.group(match.lastgroup))
        position = match.end()
    return tokens


class _Parser:
    def __init__(
        self,
        tokens: list[str],
        expression: str,
        definitions: dict[str, _Node],
        custom: Mapping[str, int],
    ):
        self.tokens = tokens
        self.position = 0
        self.expression = expression
        self.definitions = definitions
        self.custom = custom

    def error(self, message: str) -> ValueError:
        return ValueError(f"{message} in the expression {self.expression!r}")

    def peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise self.error("unexpected end")
        self.position += 1
        return token

    def parse(self) -> _Node:
        node = self.parse_precedence(0)
        if self.peek() is not None:
            raise self.error(f"unexpected {self.peek()!r}")
        return node

    def parse_precedence(self, precedence: int) -> _Node:
        token = self.take()
        if token == "(":
            node = self.parse_precedence(0)
            if self.take() != ")":
                raise self.error("unbalanced parentheses")
        elif token == "-":
            node = _Node("negate", (self.parse_precedence(_NEGATE_PRECEDENCE),))
        elif token[0].isdigit() or token[0] == ".":
            node = _Node("constant", value=float(token))
        elif token[0].isalpha() or token[0] == "_":
            node = self.parse_name(token)
        else:
            raise self.error(f"unexpected {token!r}")
        while (operator := self.peek()) in _PRECEDENCE and _PRECEDENCE[operator] >= precedence:
            self.take()
            right_precedence = _PRECEDENCE[operator] + (operator != "^")
            node = _Node(operator, (node, self.parse_precedence(right_precedence)))
        return node

    def parse_name(self, name: str) -> _Node:
        if self.peek() != "(":
            return self.definitions.get(name) or _Node("variable", name=name)
        self.take()
        args = [self.parse_precedence(0)]
        while (token := self.take()) == ",":
            args.append(self.parse_precedence(0))
        if token != ")":
            raise self.error(f"expected ',' or ')' after an argument of {name}, got {token!r}")
        if name in _FUNCTIONS:
            arity = _FUNCTIONS[name][0]
        elif name in self.custom:
            arity = self.custom[name]
        else:
            raise self.error(f"unknown function {name!r}")
        if len(args) != arity:
            raise self.error(f"{name} takes {arity} arguments, got {len(args)}")
        return _Node(name, tuple(args))


def _program(root: _Node) -> list[tuple[_Node, tuple[int, ...]]]:
    """The nodes in an order that computes each once, after its arguments, as
    (node, positions of its arguments in the list); the root comes last.

    A flat list rather than a recursion with a memo keyed by id(), which torch.compile
    traces cleanly.
    """
    order: list[tuple[_Node, tuple[int, ...]]] = []
    position: dict[int, int] = {}

    def visit(node: _Node) -> int:
        if id(node) not in position:
            args = tuple(visit(arg) for arg in node.args)
            position[id(node)] = len(order)
            order.append((node, args))
        return position[id(node)]

    visit(root)
    return order


def _free_variables(node: _Node, seen: set[int] | None = None) -> set[str]:
    seen = set() if seen is None else seen
    if id(node) in seen:
        return set()
    seen.add(id(node))
    if node.kind == "variable":
        return {node.name}
    names: set[str] = set()
    for arg in node.args:
        names |= _free_variables(arg, seen)
    return names


class Expression:
    """A parsed Lepton expression, evaluated on torch tensors so that autograd differentiates it.

    The syntax is Lepton's, as OpenMM's custom forces use it: numbers, variables, ``+ - * / ^``,
    unary minus, parentheses, Lepton's functions (``sqrt``, ``exp``, ``log``, trigonometric and
    hyperbolic functions, ``erf``, ``erfc``, ``step``, ``delta``, ``select``, ``min``, ``max``,
    ``abs``, ``floor``, ``ceil``, ``square``, ``cube``, ``recip``, ``atan2``) and definitions
    after ';' (``"a*b; a=r^2; b=2"``), each of which may use the definitions that follow it.

    Create one with :func:`parse_expression`.
    """

    def __init__(self, root: _Node, text: str, functions: Mapping[str, Callable[..., Tensor]]):
        self._root = root
        self.text = text
        self._functions = functions
        self.variables = frozenset(_free_variables(root))
        self._program = _program(root)

    def bind(self, values: Mapping[str, Value]) -> Expression:
        """The expression with some variables replaced by values and the constant parts computed.

        Values that do not depend on the configuration (parameters) are bound once, so that
        :meth:`evaluate` only computes what depends on the positions.
        """
        memo: dict[int, _Node] = {}

        def fold(node: _Node) -> _Node:
            if id(node) in memo:
                return memo[id(node)]
            if node.kind == "constant":
                result = node
            elif node.kind == "variable":
                result = _Node("constant", value=values[node.name]) if node.name in values else node
            else:
                args = tuple(fold(arg) for arg in node.args)
                if all(arg.kind == "constant" for arg in args):
                    value = self._apply(node, tuple(arg.value for arg in args))
                    if isinstance(value, Tensor) and value.ndim == 0:
                        value = float(value)
                    result = _Node("constant", value=value)
                else:
                    result = _Node(node.kind, args)
            memo[id(node)] = result
            return result

        return Expression(fold(self._root), self.text, self._functions)

    def evaluate(self, values: Mapping[str, Value]) -> Value:
        """The value of the expression, with a value for each of its free variables.

        Arguments:
            values: Numbers or tensors by variable name; tensors broadcast together.

        Returns:
            A tensor (a number if every value is a number).
        """
        missing = self.variables - set(values)
        if missing:
            raise ValueError(
                f"no value for {sorted(missing)} in the expression {self.text!r}; "
                "every variable must be a parameter, a computed value or a coordinate"
            )
        slots: list[Value] = []
        for node, args in self._program:
            if node.kind == "constant":
                slots.append(node.value)
            elif node.kind == "variable":
                slots.append(values[node.name])
            else:
                slots.append(self._apply(node, tuple(slots[k] for k in args)))
        result = slots[-1]
        if isinstance(result, Tensor) and result.ndim == 0 and not self.variables:
            return float(result)
        return result

    def _apply(self, node: _Node, args: tuple[Value, ...]) -> Value:
        if not any(isinstance(arg, Tensor) for arg in args):
            args = _as_tensors(args)  # numbers as C does them: 1/0 is inf, not a Python error
        if node.kind in _OPERATORS:
            return _OPERATORS[node.kind](*args)
        if node.kind == "negate":
            return -args[0]
        if node.kind in _FUNCTIONS:
            return _FUNCTIONS[node.kind][1](*_as_tensors(args))
        return self._functions[node.kind](*_as_tensors(args))

    def __repr__(self) -> str:
        return f"Expression({self.text!r})"


def parse_expression(
    text: str, functions: Mapping[str, tuple[int, Callable[..., Tensor]]] | None = None
) -> Expression:
    """Parse a Lepton expression such as OpenMM's custom forces take.

    Arguments:
        text: The expression, optionally followed by ``;``-separated definitions
            ``name=expression``; a definition may use the definitions after it, as in Lepton.
        functions: Extra functions by name, each as (number of arguments, a function of that
            many tensors), e.g. a custom force's tabulated functions.

    Returns:
        An :class:`Expression`.

    Example:
        >>> expression = parse_expression("a*r^2 + step(r-1); a=2*b; b=0.5")
        >>> sorted(expression.variables)
        ['r']
        >>> expression.evaluate({"r": torch.tensor([0.5, 2.0])})
        tensor([0.2500, 5.0000])
    """
    if not isinstance(text, str):
        raise TypeError(f"an expression is a string, got {type(text).__name__}")
    functions = dict(functions or {})
    clash = sorted(set(functions) & set(_FUNCTIONS))
    if clash:
        raise ValueError(f"custom functions {clash} would hide Lepton's functions of that name")
    parts = text.split(";")
    definitions: dict[str, _Node] = {}
    for part in reversed(parts[1:]):
        if not part.strip():
            continue
        name, equals, body = part.partition("=")
        name = name.strip()
        if not equals or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(
                f"{part.strip()!r} in the expression {text!r} is not a definition 'name=expression'"
            )
        arities = {key: arity for key, (arity, _) in functions.items()}
        tokens = _tokenize(body, text)
        definitions[name] = _Parser(tokens, text, dict(definitions), arities).parse()
    arities = {key: arity for key, (arity, _) in functions.items()}
    root = _Parser(_tokenize(parts[0], text), text, definitions, arities).parse()
    return Expression(root, text, {key: function for key, (_, function) in functions.items()})
