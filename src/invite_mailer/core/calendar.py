"""Calendar files (RFC 5545): one ``.ics`` per date of the series.

The files do not depend on the recipient, so :class:`CalendarFiles` builds each
one once per (date, sequence) and hands out the same bytes for every mail.
"""

from __future__ import annotations

import calendar as _gregorian
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

import icalendar

from invite_mailer.inputs.series import Event, Series

PRODID = "-//invite-mailer//Online-Transferreihe//DE"

# METHOD:PUBLISH makes the file a plain "add to calendar" item. REQUEST would
# turn every recipient into an invited attendee whose client offers to answer,
# flooding the organiser with RSVPs from thousands of recipients. Outlook only
# correlates later changes by UID + SEQUENCE reliably for REQUEST/CANCEL
# messages that name an organiser: so the "update" kind sends REQUEST and the
# "cancellation" kind CANCEL, each with the same UID, a raised SEQUENCE, the
# ORGANIZER and the recipient as ATTENDEE with RSVP=FALSE (no answers asked
# for). See docs/calendar.md.
METHOD = "PUBLISH"
METHOD_UPDATE = "REQUEST"
METHOD_CANCEL = "CANCEL"


def ics_filename(series: Series, event: Event) -> str:
    """ "transferreihe-2024-verwaltung.ics": ids are slugs, so always ASCII."""
    return f"{series.id}-{event.id}.ics"


def event_uid(series: Series, event: Event, domain: str) -> str:
    """Stable per date, so an update replaces the calendar entry instead of duplicating it."""
    return f"{series.id}-{event.id}@{domain}"


def build_event_calendar(
    series: Series,
    event: Event,
    *,
    domain: str,
    now: datetime,
    sequence: int = 0,
    method: str = METHOD,
    attendee: tuple[str, str] | None = None,
    join_link: bool = True,
) -> bytes:
    """The ``.ics`` bytes (CRLF lines, folded at 75 octets) for one date.

    Without *join_link* (a confirmation with ``join_link: false``) the file
    does not carry the date's join link either: it says the link follows by
    e-mail, as the mail does.
    """
    cal = icalendar.Calendar()
    cal.add("PRODID", PRODID)
    cal.add("VERSION", "2.0")
    cal.add("CALSCALE", "GREGORIAN")
    cal.add("METHOD", method)
    cal.add_component(series_timezone(series))

    item = icalendar.Event()
    item.add("UID", event_uid(series, event, domain))
    item.add("SEQUENCE", sequence)
    item.add("DTSTAMP", now.astimezone(UTC))
    item.add("DTSTART", event.starts_at)
    item.add("DTEND", event.ends_at)
    item.add("SUMMARY", f"{series.title}: {event.title}")
    join_url = str(event.join_url) if join_link and event.join_url is not None else None
    item.add("DESCRIPTION", _description(series, event, join_url))
    link = join_url or series.registration_url
    if link is not None:
        item.add("URL", str(link))
    item.add("LOCATION", "Online")
    organizer = icalendar.vCalAddress(f"mailto:{series.organiser.email}")
    organizer.params["CN"] = icalendar.vText(series.organiser.name)
    item.add("ORGANIZER", organizer)
    if attendee is not None:
        # iTIP REQUEST/CANCEL name the attendee the message is for; RSVP=FALSE
        # so no client asks the recipient to answer the organiser.
        name, address = attendee
        person = icalendar.vCalAddress(f"mailto:{address}")
        if name:
            person.params["CN"] = icalendar.vText(name)
        person.params["ROLE"] = icalendar.vText("OPT-PARTICIPANT")
        person.params["PARTSTAT"] = icalendar.vText("NEEDS-ACTION")
        person.params["RSVP"] = icalendar.vText("FALSE")
        item.add("ATTENDEE", person)
    item.add("STATUS", "CANCELLED" if event.cancelled else "CONFIRMED")
    item.add("TRANSP", "OPAQUE")
    cal.add_component(item)
    data: bytes = cal.to_ical()
    return data


def _description(series: Series, event: Event, join_url: str | None) -> str:
    parts = []
    if event.description:
        parts.append(event.description.strip())
    if join_url is not None:
        parts.append(f"Zugang zur Online-Veranstaltung:\n{join_url}")
    else:
        parts.append("Den Zugangslink erhalten Sie rechtzeitig vor dem Termin per E-Mail.")
    parts.append(f"{series.title} – {series.organiser.name}\n{series.organiser.email}")
    return "\n\n".join(parts)


class CalendarFiles:
    """Builds each date's ``.ics`` once and hands out the same bytes.

    The files do not depend on the recipient; only ``DTSTAMP`` (when the file
    was made) depends on the time. It is *now* to the minute, so a mailing
    shares one file per date and minute, a preview with ``--now`` is
    reproducible, and a check run at another time (validate renders with the
    series' start) never leaves a stale or future stamp behind. One cache
    belongs to one loaded configuration.
    """

    def __init__(self, series: Series, *, domain: str) -> None:
        self._series = series
        self._domain = domain
        # (event id, sequence, join link) -> (stamp, bytes): only the latest stamp is kept.
        self._cache: dict[tuple[str, int, bool], tuple[datetime, bytes]] = {}

    def get(
        self,
        event: Event,
        *,
        now: datetime,
        sequence: int = 0,
        method: str = METHOD,
        attendee: tuple[str, str] | None = None,
        join_link: bool = True,
    ) -> bytes:
        stamp = now.astimezone(UTC).replace(second=0, microsecond=0)

        def build() -> bytes:
            return build_event_calendar(
                self._series,
                event,
                domain=self._domain,
                now=stamp,
                sequence=sequence,
                method=method,
                attendee=attendee,
                join_link=join_link,
            )

        if method != METHOD or attendee is not None:
            return build()  # updates and cancellations name their recipient: one file each
        key = (event.id, sequence, join_link)
        cached = self._cache.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        data = build()
        self._cache[key] = (stamp, data)
        return data

    def filename(self, event: Event) -> str:
        return ics_filename(self._series, event)


# --- VTIMEZONE ------------------------------------------------------------------


def series_timezone(series: Series) -> icalendar.Timezone:
    """The VTIMEZONE for the series' zone, valid for all its dates."""
    days = [e.date for e in series.events]
    return vtimezone(series.timezone, min(days).year, max(days).year)


@lru_cache(maxsize=32)
def _vtimezone_bytes(key: str, first_year: int, last_year: int) -> bytes:
    zone = ZoneInfo(key)
    component = _rrule_timezone(zone, key, first_year, last_year)
    if component is None:
        component = icalendar.Timezone.from_tzinfo(
            zone,
            tzid=key,
            first_date=date(first_year - 1, 1, 1),
            last_date=date(last_year + 1, 12, 31),
        )
    data: bytes = component.to_ical()
    return data


def vtimezone(key: str, first_year: int, last_year: int) -> icalendar.Timezone:
    """A VTIMEZONE for the IANA zone *key*, covering *first_year*..*last_year*.

    Outlook matches a VTIMEZONE to a Windows zone reliably only in the form it
    writes itself: one STANDARD and one DAYLIGHT with a yearly RRULE (it
    misreads RDATE lists, which is what ``icalendar.Timezone.from_tzinfo``
    produces). So zones whose changes follow a yearly weekday rule in and
    around those years get that form, anchored in 1970 as Thunderbird and
    Google do; zones without daylight saving get one STANDARD; anything
    irregular falls back to icalendar's exact RDATE form.
    """
    component = icalendar.Timezone.from_ical(_vtimezone_bytes(key, first_year, last_year))
    assert isinstance(component, icalendar.Timezone)
    return component


_Rule = tuple[int, int, int, int, int]  # month, weekday, nth (-1 = last), hour, minute


def _rrule_timezone(
    zone: ZoneInfo, key: str, first_year: int, last_year: int
) -> icalendar.Timezone | None:
    years = range(first_year - 1, last_year + 2)
    per_year = [_transitions(zone, year) for year in years]
    tz = icalendar.Timezone()
    tz.add("TZID", key)
    if not any(per_year):
        offset = zone.utcoffset(datetime(first_year, 1, 1))
        std = icalendar.TimezoneStandard()
        std.add("DTSTART", datetime(1970, 1, 1))
        std.add("TZOFFSETFROM", offset)
        std.add("TZOFFSETTO", offset)
        std.add("TZNAME", zone.tzname(datetime(first_year, 1, 1)) or key)
        tz.add_component(std)
        return tz
    if any(len(found) != 2 for found in per_year):
        return None
    shapes = {
        tuple((_rule(onset), before, after, name) for onset, before, after, name in found)
        for found in per_year
    }
    if len(shapes) != 1:
        return None
    for rule, before, after, name in shapes.pop():
        month, weekday, nth, hour, minute = rule
        observance = (
            icalendar.TimezoneDaylight() if after > before else icalendar.TimezoneStandard()
        )
        anchor = _nth_weekday(1970, month, weekday, nth)
        observance.add("DTSTART", datetime(1970, month, anchor, hour, minute))
        observance.add(
            "RRULE",
            {"FREQ": "YEARLY", "BYMONTH": month, "BYDAY": f"{nth}{_DAYS[weekday]}"},
        )
        observance.add("TZOFFSETFROM", before)
        observance.add("TZOFFSETTO", after)
        observance.add("TZNAME", name)
        tz.add_component(observance)
    return tz


_DAYS = ("MO", "TU", "WE", "TH", "FR", "SA", "SU")


def _transitions(zone: ZoneInfo, year: int) -> list[tuple[datetime, timedelta, timedelta, str]]:
    """Offset changes in *year*: (local onset in the old offset, old, new, new name)."""
    found = []
    moment = datetime(year, 1, 1, tzinfo=UTC)
    end = datetime(year + 1, 1, 1, tzinfo=UTC)
    step = timedelta(hours=1)
    previous = moment.astimezone(zone).utcoffset()
    while moment < end:
        following = moment + step
        offset = following.astimezone(zone).utcoffset()
        if offset != previous:
            # Narrow the change down to the minute.
            low, high = moment, following
            while high - low > timedelta(minutes=1):
                middle = low + (high - low) / 2
                if middle.astimezone(zone).utcoffset() == previous:
                    low = middle
                else:
                    high = middle
            assert previous is not None and offset is not None
            onset = (high + previous).replace(tzinfo=None)
            found.append((onset, previous, offset, high.astimezone(zone).tzname() or ""))
            previous = offset
        moment = following
    return found


def _rule(onset: datetime) -> _Rule:
    days_in_month = _gregorian.monthrange(onset.year, onset.month)[1]
    nth = -1 if onset.day + 7 > days_in_month else (onset.day - 1) // 7 + 1
    return (onset.month, onset.weekday(), nth, onset.hour, onset.minute)


def _nth_weekday(year: int, month: int, weekday: int, nth: int) -> int:
    days = [
        day
        for day in range(1, _gregorian.monthrange(year, month)[1] + 1)
        if date(year, month, day).weekday() == weekday
    ]
    return days[nth - 1] if nth > 0 else days[nth]
