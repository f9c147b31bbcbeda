"""From (kind, contact, date) to a rendered mail, and on to an :class:`~email.message.EmailMessage`.

A kind of mail is three templates in ``templates/email/``:
``<kind>.subject.j2`` (one line), ``<kind>.txt.j2`` (the plain-text part,
written for reading) and ``<kind>.html.j2`` (the HTML part; HTML-escaped
automatically). They usually extend the shared ``layout.txt.j2`` and
``layout.html.j2``, which hold the greeting, signature and footer (reason for
the mail, unsubscribe notice, imprint).

Variables every template can use
--------------------------------
``contact``
    The recipient: ``anrede``, ``titel``, ``vorname``, ``nachname``,
    ``organisation``, ``email``; further columns of the contact list as
    ``contact.extra["Spaltenname"]``.
``salutation``
    The complete first line with comma: "Sehr geehrte Frau Dr. Müller,",
    "Sehr geehrter Herr Schmidt,", "Guten Tag Alex Meyer,",
    "Sehr geehrte Damen und Herren,".
``series``
    ``title`` (with its article: ``title_zu``, ``title_von``, ...), ``subtitle``,
    ``description``, ``audience``, ``registration_url``, ``privacy_url``, ``imprint``, ``id`` and
    ``organiser`` (``organiser.name``, ``organiser.email``).
``events``
    All dates that are not cancelled, in order. Each has ``id``, ``title``,
    ``description``, ``speakers``, ``date_long`` ("Donnerstag, 14. November
    2024"), ``date_short`` ("Do., 14.11.2024"), ``date_day_month``
    ("14. November 2024"), ``date_numeric`` ("14.11.2024"), ``weekday``,
    ``start`` / ``end`` ("14:00"), ``time_range`` ("14:00–16:00 Uhr"),
    ``join_url``, ``ics_filename`` and ``materials`` (each: ``title``,
    ``description``, ``url`` for links, ``filename`` and ``size`` for
    attached files).
``event``
    The date a reminder or follow-up is about (``None`` in the invitation).
``next_event``
    The next date after ``event`` (``None`` if it was the last one).
``relative_day``
    ``event``'s day seen from the sending day: "heute", "morgen",
    "übermorgen" or "am Donnerstag, 14. November 2024".
``registered_events``
    The dates this contact is registered for; ``registered`` is true when the
    contact is registered for ``event``.
``for_registered``
    True in an invitation for the registered only (``audience: registered``).
``attended``
    Follow-up only: ``True`` (took part), ``False`` (registered, but not on
    the attendance list) or ``None`` (no attendance list).
``attachments``
    File names attached to this mail (calendar files and materials).
``unsubscribe_url``
    The one-click link, or "" when the operator has not set one up.
``unsubscribe_mailto`` / ``unsubscribe_address``
    ``mailto:`` link with subject, and the bare address, to unsubscribe by mail.
``subject``
    The rendered subject (in the text and HTML templates).
``kind``
    "invitation", "reminder", "followup", ...

Filters: ``paragraphs`` (text -> list of paragraphs, line breaks inside a
paragraph joined), ``wrap`` (plain text wrapped at 72 characters, paragraphs
kept), ``heading`` (plain-text heading, underlined), ``typeset`` (HTML:
escaped, no line break before a dash), ``nobreak`` (HTML: no-break spaces),
``shorten`` (a title cut to a length, for subjects), ``zahlwort`` (4 -> "vier").

The plain-text part is tidied after rendering: lines longer than 72
characters are wrapped (URLs never broken), trailing blanks and repeated blank
lines removed, so organisers can write one paragraph per line.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import UTC, date, datetime
from email.message import EmailMessage
from email.utils import parseaddr
from pathlib import Path
from typing import Any

import css_inline

from invite_mailer.core import german
from invite_mailer.core.calendar import METHOD as CALENDAR_METHOD
from invite_mailer.core.calendar import METHOD_CANCEL, METHOD_UPDATE, CalendarFiles
from invite_mailer.core.plan import MailRequest, calendar_dates
from invite_mailer.core.tokens import mailto_url, make_token, unsubscribe_url
from invite_mailer.errors import ConfigError, ProblemCollector
from invite_mailer.inputs.config import Config, load_mail_files
from invite_mailer.inputs.contacts import Contact
from invite_mailer.inputs.materials import File, Materials, size_text
from invite_mailer.inputs.series import SERIES_FILE, Audience, Event, Kind, Series
from invite_mailer.inputs.settings import Settings
from invite_mailer.inputs.templates import Templates, load_templates
from invite_mailer.inputs.typeset import tidy_text
from invite_mailer.mail import mime
from invite_mailer.mail.mime import RenderedMail
from invite_mailer.mail.sizes import message_size, octet_counts
from invite_mailer.mail.views import EventView, changes, event_view, links_of, series_view

# The kinds that attach calendar files, for the dates core.plan.calendar_dates
# names (the others attach none).
_CALENDARS: frozenset[str] = frozenset(
    {Kind.INVITATION, Kind.REMINDER, Kind.UPDATE, Kind.CANCELLATION, Kind.CONFIRMATION}
)
# The iTIP method of each kind's calendar files (default PUBLISH).
_METHODS: dict[str, str] = {Kind.UPDATE: METHOD_UPDATE, Kind.CANCELLATION: METHOD_CANCEL}
_MATERIALS: frozenset[str] = frozenset({Kind.FOLLOWUP})
#: Kinds about the whole series (event=None); every other kind is about one date.
SERIES_KINDS: frozenset[str] = frozenset({Kind.INVITATION})


class Composer:
    """Renders and assembles mails for one loaded configuration.

    Everything that does not depend on the recipient (compiled templates,
    calendar files, attachment bytes, the CSS inliner, formatted dates) is
    prepared once here; build a new composer when the configuration changes.
    """

    def __init__(
        self,
        settings: Settings,
        series: Series,
        templates: Templates,
        materials: Materials,
        *,
        config_dir: Path,
    ) -> None:
        self._settings = settings
        self._series = series
        self._templates = templates
        self._templates_dir = templates.folder
        self._config_dir = config_dir
        self._files = materials
        # The header values were checked when the files were loaded: parsing
        # the sender address fails on a line break.
        self._domain = settings.sender.domain

        self._calendars = CalendarFiles(series, domain=self._domain)
        self._inliner = css_inline.CSSInliner(
            keep_style_tags=False,
            # @media rules cannot be inlined; they stay in a <style> block.
            keep_at_rules=True,
            load_remote_stylesheets=False,
            # width="600" attributes for Outlook, which ignores CSS widths on tables.
            apply_width_attributes=True,
        )
        self._series_view = series_view(series)
        self._events = {e.id: self._event_view(e) for e in series.events}
        # The calendar files and materials of a mailing at a moment, the same
        # for every recipient (the materials list may change with a reload).
        self._attached: dict[tuple[object, ...], tuple[Event | None, list[File]]] = {}
        self._abouts: dict[tuple[str, date], tuple[Event, EventView, EventView | None, str]] = {}
        self._active = tuple(self._events[e.id] for e in series.active_events)
        invitation = series.mailings.invitation
        self._to_registered = invitation is not None and invitation.audience is Audience.REGISTERED
        self._unsubscribe_address = (
            settings.sender.unsubscribe_mailto
            or parseaddr(settings.sender.reply_to)[1]
            or settings.sender.from_address.addr_spec
        )
        self._unsubscribe_mailto = mailto_url(self._unsubscribe_address, f"Abmeldung {series.id}")
        self._secret = settings.unsubscribe.secret.get_secret_value()
        # Registration links: (secret, web app's address), when they are on.
        self._links = (self._secret, settings.sender.web_url) if series.registration.links else None
        self._reply_to = mime.reply_to_address(settings.sender.reply_to)
        self._sender = settings.sender.from_address
        self._list_id = f"{series.title} <{series.id}.{self._domain}>"

    @classmethod
    def from_config(cls, config: Config) -> Composer:
        """The composer of a loaded configuration (nothing is read again)."""
        return cls(
            config.settings,
            config.series,
            config.templates,
            config.materials,
            config_dir=config.config_dir,
        )

    @classmethod
    def load(
        cls, settings: Settings, series: Series, *, templates_dir: Path, config_dir: Path
    ) -> Composer:
        """Read the templates and material files, then build the composer.

        Every problem of those files is raised together, as one
        :class:`ConfigError`; :func:`load_config` does the same for all files.
        """
        problems = ProblemCollector()
        templates = load_templates(templates_dir, problems)
        materials = load_mail_files(settings, series, config_dir, problems)
        problems.raise_if_any()
        return cls(settings, series, templates, materials, config_dir=config_dir)

    @property
    def kinds(self) -> tuple[str, ...]:
        """Every kind that has templates (the built-in ones and any added)."""
        return self._templates.kinds

    # -- public API --

    def compose(
        self,
        kind: Kind | str,
        contact: Contact,
        *,
        event: Event | None,
        now: datetime,
        attended: bool | None = None,
        sequences: Mapping[str, int] | None = None,
        previous: Mapping[str, str] | None = None,
        message_id: str | None = None,
    ) -> EmailMessage:
        """The complete message, ready for the transport: ``mime.build(render(...))``.

        The arguments are those of :class:`MailRequest`. *message_id* replaces
        the delivery's own Message-ID, for a sample that is not the delivery
        (see :meth:`fresh_message_id`).
        """
        request = MailRequest(str(kind), contact, event, now, attended, sequences or {}, previous)
        rendered = self.render(request)
        if message_id is not None:
            rendered = replace(rendered, message_id=message_id)
        return mime.build(rendered)

    def render(
        self, request: MailRequest, *, inline: Callable[[str], str] | None = None
    ) -> RenderedMail:
        """Render the mail *request* describes: the only renderer of mails.

        *inline* replaces the CSS inliner (:meth:`inline_css`) with one that
        gives the same result, such as a cache of its results.
        """
        request, attachments, context = self.prepare(request)
        subject, text, html = self.render_templates(request.kind, context, inline=inline)
        text = tidy_text(text)
        self.check_size(request.kind, request.event, text, html, attachments)
        return self.assemble(request, context, subject, text, html, attachments)

    def prepare(self, request: MailRequest) -> tuple[MailRequest, list[File], dict[str, Any]]:
        """The checked request (``now`` in the series' zone), its attachments
        and what its templates see: everything :meth:`render` renders from."""
        kind, event = request.kind, request.event
        if f"{kind}.subject.j2" not in self._templates:
            raise ValueError(f"no templates for the kind {kind!r} (known: {self.kinds})")
        if (event is None) != (kind in SERIES_KINDS):
            need = "event=None" if kind in SERIES_KINDS else "the event it is about"
            raise ValueError(f"composing a {kind!r} mail needs {need}")
        if kind == Kind.CONFIRMATION and not request.dates and event is not None:
            request = replace(request, dates=(event.id,))  # a sample: the date alone
        now, zone = request.now, self._series.zone
        if now.tzinfo is not zone:  # already in the series' zone: nothing to change
            if now.tzinfo is None:
                now = now.replace(tzinfo=zone)
            request = replace(request, now=now.astimezone(zone))
        attachments = self._attachments(request)
        return request, attachments, self._context(request, attachments)

    def render_templates(
        self, kind: str, context: dict[str, Any], *, inline: Callable[[str], str] | None = None
    ) -> tuple[str, str, str]:
        """Subject, text (not yet tidied) and HTML (CSS inlined) of a *kind* mail.

        Sets ``context["subject"]`` for the text and HTML templates.
        """
        subject = german.clean(self._templates.render(f"{kind}.subject.j2", context))
        if not subject:
            raise ConfigError.single(
                self._templates_dir / f"{kind}.subject.j2",
                "the subject is empty",
                hint="write the subject line into this file",
            )
        context["subject"] = subject
        text = self._templates.render(f"{kind}.txt.j2", context)
        html = (inline or self.inline_css)(self._templates.render(f"{kind}.html.j2", context))
        return subject, text, html

    def assemble(
        self,
        request: MailRequest,
        context: Mapping[str, Any],
        subject: str,
        text: str,
        html: str,
        attachments: Iterable[File],
    ) -> RenderedMail:
        """The rendered mail of *request* from its finished parts."""
        link = context["unsubscribe_url"]
        return RenderedMail(
            request=request,
            message_id=self.message_id(
                request.kind, request.contact, request.event, version=self._version(request)
            ),
            subject=subject,
            text=text,
            html=html,
            to=mime.recipient(request.contact),
            sender=self._sender,
            reply_to=self._reply_to,
            list_id=self._list_id,
            unsubscribe=", ".join(f"<{u}>" for u in (self._unsubscribe_mailto, link) if u),
            one_click=bool(link),
            attachments=tuple(attachments),
        )

    @property
    def templates(self) -> Templates:
        """The compiled templates this composer renders."""
        return self._templates

    @property
    def max_message_bytes(self) -> int:
        """``limits.max_message_bytes``: what :meth:`check_size` compares with."""
        return self._settings.limits.max_message_bytes

    def inline_css(self, html: str) -> str:
        """*html* with its CSS inlined into style attributes, for Outlook."""
        inlined: str = self._inliner.inline(html)
        return inlined

    @property
    def series(self) -> Series:
        """The series this composer renders mails of."""
        return self._series

    @staticmethod
    def _version(request: MailRequest) -> int:
        # The content version of an update or cancellation is its SEQUENCE:
        # each one is a mail of its own.
        if request.kind in (Kind.UPDATE, Kind.CANCELLATION) and request.event is not None:
            return request.sequences.get(request.event.id, 0)
        return 0

    def message_id(
        self, kind: Kind | str, contact: Contact, event: Event | None, *, version: int = 0
    ) -> str:
        """Deterministic, so a re-send after a crash carries the same Message-ID.

        *version* is the content version (the calendar SEQUENCE for updates).
        """
        key = "\n".join(
            (
                self._series.id,
                str(kind),
                event.id if event is not None else "",
                contact.email.strip().lower(),
                str(version),
            )
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        return f"<{digest}@{self._domain}>"

    def fresh_message_id(self) -> str:
        """A Message-ID of its own, for a test mail: never one of a delivery."""
        return f"<test.{uuid.uuid4().hex}@{self._domain}>"

    def check_size(
        self, kind: str, event: Event | None, text: str, html: str, attachments: Iterable[File]
    ) -> None:
        """Refuse a mail larger than ``limits.max_message_bytes`` on the wire (about)."""
        size = message_size(octet_counts(text), octet_counts(html), attachments)
        if size > self._settings.limits.max_message_bytes:
            raise self.size_error(kind, event, size)

    def size_error(self, kind: str, event: Event | None, size: int) -> ConfigError:
        """The problem of a *kind* mail about *event* of *size* octets: too large."""
        limit = self._settings.limits.max_message_bytes
        about = f"of {event.id!r}" if event is not None else "of the series"
        return ConfigError.single(
            self._config_dir / SERIES_FILE,
            f"the {kind} mail {about} would be about {size_text(size)}, more than the "
            f"limit of {size_text(limit)} for one mail (limits.max_message_bytes)",
            hint="shorten the descriptions in series.yaml (or the templates), and "
            "link large files with url: instead of file:",
        )

    # -- context --

    def _context(self, request: MailRequest, attachments: list[File]) -> dict[str, Any]:
        kind, contact, event, now = request.kind, request.contact, request.event, request.now
        view, next_event, relative_day = self._about(event, now.date())
        link = ""
        if self._settings.sender.unsubscribe_url and self._secret:
            token = make_token(self._secret, self._series.id, contact.email)
            link = unsubscribe_url(self._settings.sender.unsubscribe_url, token)
        return {
            "kind": kind,
            "contact": contact,
            "salutation": german.salutation(
                contact.anrede, contact.titel, contact.vorname, contact.nachname
            ),
            "series": self._series_view,
            "events": self._active,
            "event": view,
            "next_event": next_event,
            "relative_day": relative_day,
            "registered_events": tuple(e for e in self._active if contact.is_registered(e.id)),
            "unregistered_events": tuple(
                e for e in self._active if not contact.is_registered(e.id)
            ),
            "registered": event is not None and contact.is_registered(event.id),
            "for_registered": event is None and self._to_registered,
            "attended": request.attended,
            "attachments": tuple(f.filename for f in attachments),
            "unsubscribe_url": link,
            "unsubscribe_mailto": self._unsubscribe_mailto,
            "unsubscribe_address": self._unsubscribe_address,
            "subject": "",
            "sequence": request.sequences.get(event.id, 0) if event is not None else 0,
            "changes": (
                changes(request.previous, event)
                if request.previous is not None and event is not None
                else ()
            ),
            "confirmed_events": tuple(self._events[d] for d in request.dates),
            "join_link": self._series.mailings.confirmation.join_link,
            **links_of(self._series, self._links, contact.email),
        }

    def _about(
        self, event: Event | None, today: date
    ) -> tuple[EventView | None, EventView | None, str]:
        """The date's view, the next date's and how *today* names the day: the
        same for every recipient of a mailing, so worked out once."""
        if event is None:
            return None, None, ""
        key = (event.id, today)
        found = self._abouts.get(key)
        if found is None or found[0] is not event:
            view = self._events.get(event.id) or self._event_view(event)
            next_event = None
            later = [e for e in self._series.active_events if e.starts_at > event.starts_at]
            if later:
                next_event = self._events[min(later, key=lambda e: e.starts_at).id]
            if len(self._abouts) > 256:
                self._abouts.clear()
            relative = german.relative_day(event.date, today)
            found = self._abouts[key] = (event, view, next_event, relative)
        return found[1], found[2], found[3]

    def _attachments(self, request: MailRequest) -> list[File]:
        if _METHODS.get(request.kind, CALENDAR_METHOD) != CALENDAR_METHOD:
            return self._files_of(request)  # calendar files that name the recipient
        event = request.event
        key = (
            request.kind,
            event.id if event is not None else "",
            tuple(d.id for d in calendar_dates(request, self._series)),
            # The calendar files' DTSTAMP is the minute (see CalendarFiles.get).
            request.now.astimezone(UTC).replace(second=0, microsecond=0),
            tuple(sorted(request.sequences.items())),
        )
        found = self._attached.get(key)
        if found is None or found[0] is not event:
            if len(self._attached) > 64:
                self._attached.clear()
            found = self._attached[key] = (event, self._files_of(request))
        return list(found[1])

    def _files_of(self, request: MailRequest) -> list[File]:
        kind, event, contact, sequences = (
            request.kind,
            request.event,
            request.contact,
            request.sequences,
        )
        files: list[File] = []
        method = _METHODS.get(kind, CALENDAR_METHOD)
        attendee = None
        if method != CALENDAR_METHOD:
            name = german.full_name("", contact.vorname, contact.nachname)
            attendee = (name, contact.email)
        dates = calendar_dates(request, self._series) if kind in _CALENDARS else []
        # A confirmation without the join link leaves it out of its calendar files too.
        join_link = kind != Kind.CONFIRMATION or self._series.mailings.confirmation.join_link
        for day in dates:
            ics = self._calendars.get(
                day,
                now=request.now,
                sequence=sequences.get(day.id, 0),
                method=method,
                attendee=attendee,
                join_link=join_link,
            )
            files.append(File(self._calendars.filename(day), ics, "text", "calendar", method))
        if kind in _MATERIALS and event is not None:
            files.extend(self._files.get(event.id, ()))
        return files

    def _event_view(self, event: Event) -> EventView:
        files = {f.filename: f for f in self._files.get(event.id, ())}
        return event_view(event, files, self._calendars.filename(event))
