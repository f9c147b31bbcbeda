"""Reading organisers' templates: the confined loader, the sandboxed environment,
the check of every template file and the rendering with its error mapping.

A kind of mail is three templates: ``<kind>.subject.j2``, ``<kind>.txt.j2``
and ``<kind>.html.j2`` (see :mod:`invite_mailer.mail.compose` for what they
can use).
"""

from __future__ import annotations

import itertools
import os
import stat
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.loaders import split_template_path

from invite_mailer.errors import ConfigError, ProblemCollector
from invite_mailer.inputs.filters import add_filters
from invite_mailer.inputs.sandbox import (
    MAX_RENDER_CHARS,
    MAX_RENDER_SECONDS,
    Sandbox,
    TemplateLimitError,
)
from invite_mailer.inputs.series import Kind

#: The three templates of every kind of mail.
PARTS = ("subject", "txt", "html")
#: The largest template file that is read.
MAX_TEMPLATE_BYTES = 1024 * 1024

CONFINED_HINT = (
    "templates run in a sandbox: they can use the documented variables and filters "
    "and include files of the templates folder, nothing of Python's internals "
    "(names with __) and no other files"
)
#: The variables every template can use (named in the hint for an unknown one).
VARIABLES = (
    "contact, salutation, series, events, event, next_event, relative_day, registered_events, "
    "registered, attended, attachments, unsubscribe_url, unsubscribe_mailto, "
    "unsubscribe_address, subject, kind, sequence, changes"
)


class UnreadableTemplate(jinja2.TemplateNotFound):
    """A template that exists but cannot be opened (its modes, a vanished target)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(name)
        self.reason = reason


class ConfinedLoader(jinja2.FileSystemLoader):
    """Loads regular files of the templates folder only: a name with "..", an
    absolute one or a symlink leading elsewhere is refused."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder, encoding="utf-8")
        self._folder = folder

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str, Callable[[], bool]]:
        path = self._folder.joinpath(*split_template_path(template))
        try:
            resolved = path.resolve(strict=True)
            root = self._folder.resolve(strict=True)
        except (OSError, RuntimeError):
            raise jinja2.TemplateNotFound(template) from None
        if not resolved.is_relative_to(root):
            raise SecurityError(
                f"the template {template!r} leads outside the templates folder ({resolved})"
            )
        try:
            # O_NONBLOCK: a FIFO put here must not block the open.
            fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            with os.fdopen(fd, "rb") as file:
                info = os.fstat(file.fileno())
                if not stat.S_ISREG(info.st_mode):
                    raise SecurityError(f"the template {template!r} is not a regular file")
                data = file.read(MAX_TEMPLATE_BYTES + 1)
        except OSError as exc:
            reason = (exc.strerror or type(exc).__name__).lower()
            raise UnreadableTemplate(template, reason) from None
        if len(data) > MAX_TEMPLATE_BYTES:
            raise SecurityError(
                f"the template {template!r} is larger than {MAX_TEMPLATE_BYTES // 1024} KB"
            )
        return data.decode("utf-8"), str(path), lambda: False


def environment(templates_dir: Path) -> Sandbox:
    """The sandboxed environment templates of *templates_dir* are compiled in."""
    env = Sandbox(
        loader=ConfinedLoader(templates_dir),
        autoescape=jinja2.select_autoescape(
            enabled_extensions=("html.j2",), default_for_string=False, default=False
        ),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
        auto_reload=False,
    )
    add_filters(env)
    return env


def is_subject(name: str) -> bool:
    """Whether the template *name* is the subject of a kind (and so names one)."""
    return name.endswith(".subject.j2")


@dataclass(frozen=True)
class Templates:
    """The compiled templates of one templates folder."""

    folder: Path
    environment: Sandbox
    compiled: Mapping[str, jinja2.Template]
    #: The syntax tree of every compiled template, for analyses of how they use data.
    trees: Mapping[str, nodes.Template] = field(default_factory=dict)

    @property
    def kinds(self) -> tuple[str, ...]:
        """Every kind that has templates (the built-in ones and any added)."""
        return tuple(sorted({name.split(".", 1)[0] for name in self.compiled if is_subject(name)}))

    def __contains__(self, name: object) -> bool:
        return name in self.compiled

    def render(self, name: str, context: Mapping[str, Any]) -> str:
        """The template *name* rendered with *context*, within the time and size budget.

        Whatever goes wrong is a :class:`ConfigError` naming the template file
        and line.
        """
        env = self.environment
        out: list[str] = []
        size = 0
        try:
            with env.budget(MAX_RENDER_SECONDS):
                # Chunk by chunk, so that a template writing without end is
                # stopped at the limit instead of filling the memory.
                chunks = self.compiled[name].generate(context)
                while batch := list(itertools.islice(chunks, 256)):
                    size += sum(map(len, batch))
                    if size > MAX_RENDER_CHARS:
                        raise TemplateLimitError(
                            f"the template writes more than {MAX_RENDER_CHARS // 1024 // 1024} "
                            "million characters"
                        )
                    out += batch
                    env.check_time()
        except (Exception, MemoryError, RecursionError) as exc:
            raise self.render_error(name, exc) from exc
        return "".join(out)

    def render_error(self, name: str, exc: Exception) -> ConfigError:
        """*exc*, raised while rendering *name*, as the organiser's problem to fix."""
        path, line = self.folder / name, None
        # Jinja rewrites tracebacks so template frames carry the template file
        # and line; the innermost one is where the problem is.
        for frame, lineno in traceback.walk_tb(exc.__traceback__):
            filename = frame.f_code.co_filename
            if filename.endswith(".j2"):
                path, line = Path(filename), lineno
        if isinstance(exc, TemplateLimitError | MemoryError | RecursionError | OverflowError):
            what = str(exc) if isinstance(exc, TemplateLimitError) else type(exc).__name__
            if isinstance(exc, OverflowError):
                what = f"a number or range is too large ({exc})"
            elif isinstance(exc, RecursionError):
                what = "a macro or loop calls itself without end"
            return ConfigError.single(
                path,
                f"the template is too large to render: {what}",
                line=line,
                hint="a mail is at most a few pages: check loops (range() is limited to "
                "100000 steps) and repeated text on this line",
            )
        if isinstance(exc, SecurityError):
            return ConfigError.single(
                path,
                f"the template uses something templates may not use: {exc}",
                line=line,
                hint=CONFINED_HINT,
            )
        if isinstance(exc, jinja2.UndefinedError):
            return ConfigError.single(
                path,
                f"unknown variable or attribute: {exc.message}",
                line=line,
                hint=f"check the spelling; templates can use: {VARIABLES}",
            )
        return ConfigError.single(
            path,
            f"the template failed while rendering: {type(exc).__name__}: {exc}",
            line=line,
            hint="check the expression on this line",
        )


def load_templates(folder: Path, problems: ProblemCollector) -> Templates:
    """Every template of *folder*, compiled; what is wrong goes to *problems*.

    Each file is checked on its own (readable, UTF-8, valid syntax, the files
    it uses exist) and every kind must have all three parts, so one run
    reports every broken template.
    """
    env = environment(folder)
    if not folder.is_dir():
        problems.add(
            folder,
            "the templates folder does not exist",
            hint="point to the folder with <kind>.subject.j2, <kind>.txt.j2, <kind>.html.j2",
        )
        return Templates(folder, env, {})
    # Hidden files (editor swap files, macOS "._" copies) are not templates.
    names = sorted(
        name
        for name in env.list_templates(extensions=["j2"])
        if not any(piece.startswith(".") for piece in name.split("/"))
    )
    compiled: dict[str, jinja2.Template] = {}
    trees: dict[str, nodes.Template] = {}
    for name in names:
        tree = _compile(env, folder, name, compiled, problems)
        if tree is not None:
            trees[name] = tree
            _check_uses(tree, folder, name, names, problems)
    _check_parts(folder, names, problems)
    return Templates(folder, env, compiled, trees)


def _compile(
    env: Sandbox,
    folder: Path,
    name: str,
    compiled: dict[str, jinja2.Template],
    problems: ProblemCollector,
) -> nodes.Template | None:
    """Compile *name* into *compiled*; its syntax tree, or None with the problem added."""
    path = folder / name
    try:
        assert env.loader is not None
        source, _, _ = env.loader.get_source(env, name)
        tree = env.parse(source, name, str(path))
        compiled[name] = env.get_template(name)
    except UnicodeDecodeError:
        problems.add(path, "the file is not UTF-8 text", hint="save it as UTF-8")
    except SecurityError as exc:
        problems.add(path, str(exc), hint=CONFINED_HINT)
    except UnreadableTemplate as exc:
        problems.add(
            path,
            f"the file cannot be read: {exc.reason}",
            hint="make it readable for the user invite-mailer runs as (chmod a+r)",
        )
    except jinja2.TemplateNotFound:
        problems.add(
            path,
            "the file cannot be read (a broken link?)",
            hint="replace it by an ordinary file, or delete it",
        )
    except jinja2.TemplateSyntaxError as exc:
        problems.add(
            path,
            f"template syntax error: {exc.message}",
            line=exc.lineno,
            hint=_syntax_hint(exc.message or ""),
        )
    else:
        return tree
    return None


def _check_uses(
    tree: nodes.Template, folder: Path, name: str, names: list[str], problems: ProblemCollector
) -> None:
    """The templates *tree* (of *name*) extends, includes or imports exist."""
    path = folder / name
    for node in tree.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        target = getattr(node, "template", None)
        if getattr(node, "ignore_missing", False) or not isinstance(target, nodes.Const):
            continue
        if isinstance(target.value, str) and target.value not in names:
            problems.add(
                path,
                f"uses the template {target.value!r}, which does not exist in {folder}",
                line=node.lineno,
                hint="check the file name, or copy the file from the shipped templates",
            )


def _check_parts(folder: Path, names: list[str], problems: ProblemCollector) -> None:
    """Every kind (the built-in ones and any added) has all three templates."""
    kinds = {str(k) for k in Kind} | {n.split(".", 1)[0] for n in names if is_subject(n)}
    for kind in sorted(kinds):
        for part in PARTS:
            name = f"{kind}.{part}.j2"
            if name not in names:
                problems.add(
                    folder / name,
                    f"the template for the {part} of {kind!r} mails is missing",
                    hint=f"every kind needs {kind}.subject.j2, {kind}.txt.j2 and "
                    f"{kind}.html.j2; copy the shipped one and adapt it",
                )


def _syntax_hint(message: str) -> str:
    if "end of template" in message or "endif" in message or "endfor" in message:
        return (
            "every {% if %}, {% for %} and {% block %} needs its {% endif %}, "
            "{% endfor %} or {% endblock %}"
        )
    if "unknown tag" in message:
        return "check the spelling of the tag between {% and %}"
    return "check the {{ }} and {% %} pairs on this line and the line before"
