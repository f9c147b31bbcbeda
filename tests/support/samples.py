"""One mail of every kind, composed from a copy of the shipped config and templates.

Used by the tests that hand finished mails to real mail software (SpamAssassin,
Postfix). The copy gets result materials so that follow-ups have something to
send: the first date links its slides and attaches a small PDF, the second
date only links its slides and recording.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from zoneinfo import ZoneInfo

from invite_mailer.core.plan import MailRequest
from invite_mailer.inputs.config import Config, load_config
from invite_mailer.inputs.contacts import Contact
from invite_mailer.inputs.series import Event, Kind
from invite_mailer.mail import mime
from invite_mailer.mail.compose import Composer
from support.project import copy_project, shipped_environment

BERLIN = ZoneInfo("Europe/Berlin")

# A small but well-formed PDF (what an organiser would attach, only shorter).
PDF = (
    b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"
    b"1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n"
    b"2 0 obj\n<< /Type /Pages /Kids [3 0 R] /Count 1 >>\nendobj\n"
    b"3 0 obj\n<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] >>\nendobj\n"
    b"trailer\n<< /Root 1 0 R >>\n%%EOF\n"
)
PDF_NAME = "protokoll-verwaltung.pdf"

# A join link as video services hand them out: long, without a place to break.
LONG_OLD_LINK = (
    "https://konferenz.example.org/j/0123456789?pwd=aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789"
)

FIRST_DATE = "      entlasten – Erfahrungen aus den Projekten und Diskussion.\n    materials: []\n"
SECOND_DATE = "      Auftraggeberinnen und Impulsgeberinnen.\n    materials: []\n"


def set_materials(config: Path, date: str, materials: str) -> None:
    """Give one date of the shipped ``series.yaml`` under *config* result materials.

    *date* is :data:`FIRST_DATE` or :data:`SECOND_DATE` (the end of that date's
    entry); *materials* are the YAML list items, indented as in the file.
    """
    path = config / "series.yaml"
    text = path.read_text(encoding="utf-8")
    assert date in text, "the shipped series.yaml changed"
    path.write_text(text.replace(date, date.replace(" []", "") + materials), encoding="utf-8")


def sample_project(target: Path) -> Path:
    """The shipped ``config/`` and ``templates/`` under *target*, with materials.

    Returns the config folder.
    """
    config = copy_project(target) / "config"
    (config / "materials").mkdir()
    (config / "materials" / PDF_NAME).write_bytes(PDF)
    set_materials(
        config,
        FIRST_DATE,
        "      - title: Folien der Vorträge\n"
        "        url: https://example.org/transferreihe/verwaltung/folien.pdf\n"
        "      - title: Protokoll\n"
        f"        file: materials/{PDF_NAME}\n",
    )
    set_materials(
        config,
        SECOND_DATE,
        "      - title: Folien der Vorträge\n"
        "        url: https://example.org/transferreihe/kreislaufwirtschaft/folien.pdf\n"
        "      - title: Aufzeichnung\n"
        "        url: https://example.org/transferreihe/kreislaufwirtschaft/aufzeichnung\n",
    )
    return config


def second_series(config: Path, *, genus: str | None = "m") -> Path:
    """Turn the series under *config* into "Klimadialog Kommunen", a masculine
    title (``title_genus: m``; *genus* None leaves the key out). Returns *config*."""
    path = config / "series.yaml"
    text = path.read_text(encoding="utf-8")
    assert "title: Online-Transferreihe\n" in text, "the shipped series.yaml changed"
    text = re.sub(r"^title_genus: .*\n", "", text, flags=re.M)
    genus_line = f"title_genus: {genus}\n" if genus is not None else ""
    text = text.replace(
        "title: Online-Transferreihe\n", f"title: Klimadialog Kommunen\n{genus_line}"
    )
    text = text.replace("In der Online-Transferreihe", "Im Klimadialog Kommunen")
    path.write_text(text, encoding="utf-8")
    return config


def load_sample_config(config_dir: Path) -> Config:
    """The config under *config_dir* with the shipped settings only."""
    with shipped_environment():
        return load_config(config_dir, env_file=None)


@dataclass(frozen=True)
class Sample:
    """One composed mail and what it is."""

    name: str
    kind: str
    message: EmailMessage
    attachment: bool  # carries a material file


def sample_mails(
    config: Config, contact: Contact, *, composer: Composer | None = None
) -> list[Sample]:
    """Every kind for *contact*, each at the moment it would go out."""
    composer = composer or Composer.from_config(config)
    first = config.series.event("verwaltung")
    second = config.series.event("kreislaufwirtschaft")
    moved = {
        **first.fingerprint(),
        "start": first.starts_at.replace(hour=10).isoformat(),
        "end": first.ends_at.replace(hour=12).isoformat(),
    }
    relinked = {**first.fingerprint(), "join_url": LONG_OLD_LINK}
    changed = datetime(2024, 11, 1, 9, 0, tzinfo=BERLIN)

    def make(
        name: str,
        kind: Kind,
        event: Event | None,
        now: datetime,
        *,
        attended: bool | None = None,
        sequences: Mapping[str, int] | None = None,
        previous: Mapping[str, str] | None = None,
    ) -> Sample:
        message = composer.compose(
            kind,
            contact,
            event=event,
            now=now,
            attended=attended,
            sequences=sequences,
            previous=previous,
        )
        return Sample(name, str(kind), message, name == "followup-attachment")

    def confirm(name: str, event: Event, dates: tuple[str, ...]) -> Sample:
        # The Anmeldebestätigung of the *dates* just registered, *event* the first of them.
        at = datetime(2024, 10, 28, 9, 30, tzinfo=BERLIN)
        request = MailRequest(str(Kind.CONFIRMATION), contact, event, at, dates=dates)
        return Sample(name, str(Kind.CONFIRMATION), mime.build(composer.render(request)), False)

    return [
        make("invitation", Kind.INVITATION, None, datetime(2024, 10, 24, 10, 0, tzinfo=BERLIN)),
        make("reminder", Kind.REMINDER, first, datetime(2024, 11, 13, 14, 0, tzinfo=BERLIN)),
        make("followup-links", Kind.FOLLOWUP, second, datetime(2024, 11, 22, 10, 0, tzinfo=BERLIN)),
        make(
            "followup-attachment",
            Kind.FOLLOWUP,
            first,
            datetime(2024, 11, 15, 10, 0, tzinfo=BERLIN),
            attended=True,
        ),
        make(
            "followup-absent",
            Kind.FOLLOWUP,
            first,
            datetime(2024, 11, 15, 10, 0, tzinfo=BERLIN),
            attended=False,
        ),
        make("update", Kind.UPDATE, first, changed, sequences={first.id: 1}, previous=moved),
        make(
            "update-link",
            Kind.UPDATE,
            first,
            changed,
            sequences={first.id: 2},
            previous=relinked,
        ),
        make("cancellation", Kind.CANCELLATION, first, changed, sequences={first.id: 1}),
        confirm("confirmation", first, (first.id,)),
        confirm("confirmation-several", second, tuple(e.id for e in config.series.events[1:])),
    ]
