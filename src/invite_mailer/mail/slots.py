"""Which recipient data the templates use, and whether only as whole values.

Mails of one mailing differ per recipient in a few strings: the contact's
fields, the salutation and the unsubscribe link. When every use of such a
string in every template of the folder is either

(a) the whole expression of an output ``{{ … }}``, with no filter, or
(b) a truthiness test (``{% if x %}``, ``not x``, ``x and …`` in a test),

a template renders the same text around it whatever the value, and only the
truthiness of the value picks branches. Then a mail can be rendered once per
*shape* with markers in place of these strings, and each recipient's values
put in afterwards (:mod:`invite_mailer.mail.shapes`). Anything else (a
filter, a comparison, ``~``, ``set``, a macro argument, ``contact`` printed
or passed whole, output captured by a macro, a ``set`` or ``filter`` block)
makes the template set *not compilable*: :func:`analyse` says why, and mails
are rendered per recipient, as before.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from jinja2 import nodes

__all__ = ["CONTACT_FIELDS", "SLOT_FAMILIES", "SLOT_NAMES", "Analysis", "analyse", "slot_of"]

#: The contact's string fields templates may print as slots.
CONTACT_FIELDS = frozenset({"anrede", "titel", "vorname", "nachname", "organisation", "email"})
#: Per-recipient strings that are template variables of their own.
SLOT_NAMES = frozenset({"salutation", "unsubscribe_url"})
#: Per-recipient strings per date: ``register_links[event.id]`` is a slot
#: (one per date of the series); the mapping itself only in a truthiness test.
SLOT_FAMILIES = frozenset({"register_links", "withdraw_links"})
# Names whose every appearance is per-recipient data.
_RECIPIENT = SLOT_NAMES | SLOT_FAMILIES | {"contact"}
# Names that give a block's output as a value.
_BLOCK_CALLS = frozenset({"self", "super"})
# Constructs whose body output is captured and may be changed before it is
# written (a filter block, {% set %}...{% endset %}, a macro, a call block)
# or written under other escaping rules.
_CAPTURING = (
    nodes.FilterBlock,
    nodes.AssignBlock,
    nodes.Macro,
    nodes.CallBlock,
    nodes.EvalContextModifier,
)


@dataclass(frozen=True)
class Analysis:
    """What the templates do with recipient data.

    ``slots`` are the per-recipient strings in use ("salutation",
    "contact.email", "contact.extra[Spalte]", ...); ``reason`` is None when
    the set is compilable, else the first use that is not slot-safe.
    """

    slots: frozenset[str]
    reason: str | None

    @property
    def compilable(self) -> bool:
        return self.reason is None


class _NotSafe(Exception):
    pass


def slot_of(node: nodes.Node) -> str | None:
    """The slot *node* reads as a whole (``contact.email``, ``salutation``), or None."""
    if isinstance(node, nodes.Name) and node.ctx == "load" and node.name in SLOT_NAMES:
        return node.name
    if isinstance(node, nodes.Getitem) and _is_family(node.node):
        assert isinstance(node.node, nodes.Name)
        return node.node.name
    if isinstance(node, nodes.Getattr) and _is_contact(node.node):
        return f"contact.{node.attr}" if node.attr in CONTACT_FIELDS else None
    if isinstance(node, nodes.Getitem):
        key = node.arg
        if not isinstance(key, nodes.Const) or not isinstance(key.value, str):
            return None
        if _is_contact(node.node):
            return f"contact.{key.value}" if key.value in CONTACT_FIELDS else None
        if _is_extra(node.node):
            return f"contact.extra[{key.value}]"
    if isinstance(node, nodes.Getattr) and _is_extra(node.node):
        return f"contact.extra[{node.attr}]"
    return None


def _is_family(node: nodes.Node) -> bool:
    return isinstance(node, nodes.Name) and node.ctx == "load" and node.name in SLOT_FAMILIES


def _is_contact(node: nodes.Node) -> bool:
    return isinstance(node, nodes.Name) and node.name == "contact" and node.ctx == "load"


def _is_extra(node: nodes.Node) -> bool:
    if isinstance(node, nodes.Getattr) and node.attr == "extra":
        return _is_contact(node.node)
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
        return node.arg.value == "extra" and _is_contact(node.node)
    return False


def analyse(trees: Mapping[str, nodes.Template]) -> Analysis:
    """Whether every use of recipient data in *trees* is slot-safe, and which slots exist."""
    slots: set[str] = set()
    for name in sorted(trees):
        try:
            _check_loads(trees[name], trees)
            _visit(trees[name], slots, captured=False)
        except _NotSafe as exc:
            return Analysis(frozenset(slots), f"{name}: {exc}")
    return Analysis(frozenset(slots), None)


def _check_loads(tree: nodes.Template, trees: Mapping[str, nodes.Template]) -> None:
    """Every template *tree* extends, includes or imports is one of *trees*: a
    template named at render time (or a hidden file) was never analysed."""
    for node in tree.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        target = getattr(node, "template", None)
        names = target.value if isinstance(target, nodes.Const) else None
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list | tuple) or not all(n in trees for n in names):
            raise _NotSafe(f"{_where(node)}: uses a template that is not known before rendering")


def _where(node: nodes.Node) -> str:
    return f"line {node.lineno}"


def _visit(node: nodes.Node, slots: set[str], *, captured: bool) -> None:
    """Check *node* and everything below it; *captured*: inside a capturing construct."""
    if isinstance(node, _CAPTURING):
        captured = True
    if isinstance(node, nodes.Include) and captured:
        raise _NotSafe(f"{_where(node)}: a template is included where its output is captured")
    if isinstance(node, nodes.Output):
        for written in node.nodes:
            _output(written, slots, captured=captured)
        return
    if isinstance(node, nodes.If | nodes.CondExpr):
        _test(node.test, slots)
        for branch in _children(node, skip=node.test):
            _visit(branch, slots, captured=captured)
        return
    if isinstance(node, nodes.Name) and node.ctx == "load" and node.name in _RECIPIENT:
        raise _NotSafe(f"{_where(node)}: {node.name!r} is used other than printed or tested")
    if isinstance(node, nodes.Name) and node.ctx == "load" and node.name in _BLOCK_CALLS:
        # {{ self.footer() | upper }} would change a block's output, slots included.
        raise _NotSafe(f"{_where(node)}: the output of a block is used other than printed")
    for child in node.iter_child_nodes():
        _visit(child, slots, captured=captured)


def _output(node: nodes.Node, slots: set[str], *, captured: bool) -> None:
    slot = slot_of(node)
    if _is_super(node):
        return  # {{ super() }}: the parent block, written as it is
    if slot is None:
        _visit(node, slots, captured=captured)
    elif captured:
        raise _NotSafe(f"{_where(node)}: {slot} is printed where the output is captured")
    else:
        slots.add(slot)
        if slot in SLOT_FAMILIES and isinstance(node, nodes.Getitem):
            _visit(node.arg, slots, captured=captured)  # the date it picks: no recipient data


def _test(node: nodes.Node, slots: set[str]) -> None:
    """A truthiness test: slots as a whole, ``not``, ``and`` and ``or`` of tests."""
    slot = slot_of(node)
    if slot is not None:
        slots.add(slot)
        if slot in SLOT_FAMILIES and isinstance(node, nodes.Getitem):
            _visit(node.arg, slots, captured=False)
    elif isinstance(node, nodes.Name) and _is_family(node):
        slots.add(node.name)  # {% if register_links %}: whether links are on
    elif isinstance(node, nodes.Not):
        _test(node.node, slots)
    elif isinstance(node, nodes.And | nodes.Or):
        _test(node.left, slots)
        _test(node.right, slots)
    else:
        _visit(node, slots, captured=False)


def _is_super(node: nodes.Node) -> bool:
    return (
        isinstance(node, nodes.Call)
        and isinstance(node.node, nodes.Name)
        and node.node.name == "super"
        and not (node.args or node.kwargs or node.dyn_args or node.dyn_kwargs)
    )


def _children(node: nodes.Node, *, skip: nodes.Node) -> Iterator[nodes.Node]:
    for child in node.iter_child_nodes():
        if child is not skip:
            yield child
