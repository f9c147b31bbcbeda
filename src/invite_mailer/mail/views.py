"""What templates see: frozen records of plain data, built once per composer."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any

from invite_mailer.core import german
from invite_mailer.core.tokens import REGISTER, WITHDRAW, link_url, make_link_token
from invite_mailer.inputs.materials import File, size_text
from invite_mailer.inputs.sandbox import View
from invite_mailer.inputs.series import Event, Material, Series


@dataclass(frozen=True, slots=True)
class OrganiserView(View):
    name: str
    email: str


@dataclass(frozen=True, slots=True)
class SeriesView(View):
    id: str
    title: str
    subtitle: str
    description: str
    audience: str
    registration_url: str | None
    privacy_url: str | None
    imprint: str
    organiser: OrganiserView
    # The title with its article (core.german.title_phrases): "zur
    # Online-Transferreihe", "zum Klimadialog Kommunen", "zur Reihe „…“".
    title_genus: str | None
    title_nominativ: str
    title_akkusativ: str
    title_dativ: str
    title_zu: str
    title_von: str


@dataclass(frozen=True, slots=True)
class MaterialView(View):
    title: str
    description: str
    url: str | None
    filename: str | None
    size: str | None


@dataclass(frozen=True, slots=True)
class EventView(View):
    id: str
    title: str
    description: str
    speakers: tuple[str, ...]
    date_long: str
    date_short: str
    date_day_month: str
    date_numeric: str
    weekday: str
    start: str
    end: str
    time_range: str
    join_url: str | None
    ics_filename: str
    materials: tuple[MaterialView, ...]
    cancelled: bool
    cancel_reason: str = ""


@dataclass(frozen=True, slots=True)
class Change(View):
    """One detail of a date that changed, for the "Änderung" mail."""

    label: str
    old: str
    new: str
    # For a subject that leads with what changed: "Neue Uhrzeit", "Neues Thema".
    headline: str = "Geänderter Termin"
    # The old value cut at its dashes, so a strike-through can leave each
    # dash visible ("14:00–16:00" struck through whole reads "14:00 16:00").
    old_parts: tuple[str, ...] = ()
    # The values are links: in HTML they may break anywhere to fit a phone.
    link: bool = False


def _dash_parts(text: str) -> tuple[str, ...]:
    return tuple(re.split("[–—]", text))


def event_view(event: Event, files: Mapping[str, File], ics_filename: str) -> EventView:
    """What templates see of a date; *files* are its attached materials by name."""
    return EventView(
        id=event.id,
        title=event.title,
        description=event.description,
        speakers=tuple(event.speakers),
        date_long=german.date_long(event.date),
        date_short=german.date_short(event.date),
        date_day_month=german.date_day_month(event.date),
        date_numeric=german.date_numeric(event.date),
        weekday=german.weekday(event.date),
        start=german.clock(event.start),
        end=german.clock(event.end),
        time_range=german.time_range(event.start, event.end),
        join_url=str(event.join_url) if event.join_url is not None else None,
        ics_filename=ics_filename,
        materials=tuple(material_view(m, files) for m in event.materials),
        cancelled=event.cancelled,
        cancel_reason=event.cancel_reason,
    )


def series_view(series: Series) -> SeriesView:
    """What templates see of the series."""
    genus = str(series.title_genus) if series.title_genus is not None else None
    phrases = german.title_phrases(series.title, genus)
    return SeriesView(
        id=series.id,
        title=series.title,
        subtitle=series.subtitle,
        description=series.description.strip(),
        audience=series.audience.strip(),
        registration_url=str(series.registration_url) if series.registration_url else None,
        privacy_url=str(series.privacy_url) if series.privacy_url else None,
        imprint=series.imprint.strip(),
        organiser=OrganiserView(series.organiser.name, str(series.organiser.email)),
        title_genus=genus,
        title_nominativ=phrases["nominativ"],
        title_akkusativ=phrases["akkusativ"],
        title_dativ=phrases["dativ"],
        title_zu=phrases["zu"],
        title_von=phrases["von"],
    )


def material_view(material: Material, files: Mapping[str, File]) -> MaterialView:
    """What templates see of a material: a link, or an attached file of *files*."""
    if material.file is not None:
        file = files.get(material.file.name)
        return MaterialView(
            title=material.title,
            description=material.description,
            url=None,
            filename=material.file.name,
            size=size_text(len(file.data)) if file is not None else None,
        )
    return MaterialView(
        title=material.title,
        description=material.description,
        url=str(material.url),
        filename=None,
        size=None,
    )


def changes(previous: Mapping[str, str], event: Event) -> tuple[Change, ...]:
    """What differs between the version a recipient saw and the current one."""
    current = event.fingerprint()
    changes = []

    def when(fingerprint: Mapping[str, str]) -> str:
        start = datetime.fromisoformat(fingerprint["start"])
        end = datetime.fromisoformat(fingerprint["end"])
        return f"{german.date_long(start.date())}, {german.time_range(start.time(), end.time())}"

    def change(label: str, headline: str, old: str, new: str, *, link: bool = False) -> None:
        changes.append(Change(label, old, new, headline, _dash_parts(old), link))

    if (previous.get("start"), previous.get("end")) != (current["start"], current["end"]):
        same_day = previous.get("start", "")[:10] == current["start"][:10]
        change(
            "Datum und Uhrzeit",
            "Neue Uhrzeit" if same_day else "Neues Datum",
            when(previous),
            when(current),
        )
    if previous.get("title") != current["title"]:
        change("Thema", "Neues Thema", previous.get("title", ""), current["title"])
    if previous.get("join_url") != current["join_url"]:
        change(
            "Zugangslink",
            "Neuer Zugangslink",
            previous.get("join_url") or "–",
            current["join_url"] or "–",
            link=True,
        )
    return tuple(changes)


_NO_LINKS: Mapping[str, str] = MappingProxyType({})


def links_of(series: Series, links: tuple[str, str] | None, email: str) -> dict[str, Any]:
    """The registration links of one recipient, per active date (empty unless
    ``registration.mode`` is links; *links* is the secret and the web app's URL).

    ``register_links[event.id]`` registers, ``withdraw_links[event.id]``
    withdraws; each link is signed for this series, address and date.
    """
    if links is None:
        return {
            "registration_links": False,
            "register_links": _NO_LINKS,
            "withdraw_links": _NO_LINKS,
        }
    secret, base = links
    found: dict[str, dict[str, str]] = {REGISTER: {}, WITHDRAW: {}}
    for event in series.active_events:
        for action, urls in found.items():
            token = make_link_token(secret, action, series.id, email, event.id)
            urls[event.id] = link_url(base, action, token)
    return {
        "registration_links": True,
        "register_links": MappingProxyType(found[REGISTER]),
        "withdraw_links": MappingProxyType(found[WITHDRAW]),
    }
