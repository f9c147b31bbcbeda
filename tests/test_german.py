from __future__ import annotations

from datetime import date, time

import pytest

from invite_mailer.core import german
from invite_mailer.inputs import typeset


@pytest.mark.parametrize(
    ("anrede", "titel", "vorname", "nachname", "expected"),
    [
        ("Frau", "Dr.", "Jana", "Müller", "Sehr geehrte Frau Dr. Müller,"),
        ("Herr", "", "Thomas", "Schmidt", "Sehr geehrter Herr Schmidt,"),
        # only the highest title (DIN 5008): "Prof. Dr." is "Prof."
        ("Frau", "Prof. Dr.", "Sabine", "Groß", "Sehr geehrte Frau Prof. Groß,"),
        ("Herr", "Dr. Dr.", "Jürgen", "Weiß", "Sehr geehrter Herr Dr. Weiß,"),
        ("Herr", "Dr. rer. nat.", "Jürgen", "Weiß", "Sehr geehrter Herr Dr. Weiß,"),
        ("Herr", "Dr.-Ing.", "Jürgen", "Weiß", "Sehr geehrter Herr Dr. Weiß,"),
        ("Frau", "apl. Prof. Dr.-Ing. habil.", "Sabine", "Groß", "Sehr geehrte Frau Prof. Groß,"),
        ("Frau", "Prof. Dr. Dr. h. c. mult.", "Sabine", "Groß", "Sehr geehrte Frau Prof. Groß,"),
        ("Frau", "PD Dr.", "Jana", "Müller", "Sehr geehrte Frau Dr. Müller,"),
        ("", "Prof. Dr.", "Kim", "Schäfer", "Guten Tag Prof. Kim Schäfer,"),
        # a title the rules do not know stays as written
        ("Herr", "Senator", "Björn", "Östreich", "Sehr geehrter Herr Senator Östreich,"),
        ("Herr", "Prof.", "Björn", "Östreich", "Sehr geehrter Herr Prof. Östreich,"),
        ("Herr", "Dr.", "Jürgen", "Weiß", "Sehr geehrter Herr Dr. Weiß,"),
        ("Frau", "", "Özlem", "Yılmaz", "Sehr geehrte Frau Yılmaz,"),
        ("", "", "Alex", "Meyer", "Guten Tag Alex Meyer,"),
        ("", "Dr.", "Kim", "Schäfer", "Guten Tag Dr. Kim Schäfer,"),
        ("", "", "", "", "Sehr geehrte Damen und Herren,"),
        ("Frau", "Dr.", "", "", "Sehr geehrte Damen und Herren,"),
        # written the way office exports spell it
        ("frau", "", "Maria", "König", "Sehr geehrte Frau König,"),
        ("Hr.", "", "Klaus-Dieter", "Fuchs", "Sehr geehrter Herr Fuchs,"),
        ("  Frau ", " Dr. ", " Jana ", "  Müller  ", "Sehr geehrte Frau Dr. Müller,"),
        # Frau/Herr without a family name: neutral, never "Sehr geehrte Frau Jana,"
        ("Frau", "", "Jana", "", "Guten Tag Jana,"),
        # unknown Anrede ("divers", "Firma"): gender-neutral
        ("divers", "", "Alex", "Meyer", "Guten Tag Alex Meyer,"),
        # degrees do not belong into a salutation
        ("Herr", "Dipl.-Ing.", "Thomas", "Schmidt", "Sehr geehrter Herr Schmidt,"),
        ("Frau", "Dr. M.A.", "Jana", "Müller", "Sehr geehrte Frau Dr. Müller,"),
        # line breaks in data cannot break the line
        ("Herr", "", "Thomas", "Schmidt\r\nBcc: x", "Sehr geehrter Herr Schmidt Bcc: x,"),
    ],
)
def test_salutation(anrede: str, titel: str, vorname: str, nachname: str, expected: str) -> None:
    assert german.salutation(anrede, titel, vorname, nachname) == expected


@pytest.mark.parametrize(
    ("titel", "vorname", "nachname", "expected"),
    [
        ("Dr.", "Jana", "Müller", "Dr. Jana Müller"),
        ("", "Alex", "Meyer", "Alex Meyer"),
        ("Dr.", "", "", ""),
        ("", "", "", ""),
        ("", "Jana\n", "Mül\x00ler", "Jana Müller"),
    ],
)
def test_full_name(titel: str, vorname: str, nachname: str, expected: str) -> None:
    assert german.full_name(titel, vorname, nachname) == expected


@pytest.mark.parametrize(
    ("day", "long", "short", "day_month", "numeric"),
    [
        (
            date(2024, 11, 14),
            "Donnerstag, 14. November 2024",
            "Do., 14.11.2024",
            "14. November 2024",
            "14.11.2024",
        ),
        (
            date(2024, 12, 5),
            "Donnerstag, 5. Dezember 2024",
            "Do., 05.12.2024",
            "5. Dezember 2024",
            "05.12.2024",
        ),
        (date(2025, 3, 3), "Montag, 3. März 2025", "Mo., 03.03.2025", "3. März 2025", "03.03.2025"),
    ],
)
def test_dates(day: date, long: str, short: str, day_month: str, numeric: str) -> None:
    assert german.date_long(day) == long
    assert german.date_short(day) == short
    assert german.date_day_month(day) == day_month
    assert german.date_numeric(day) == numeric


def test_weekday_and_times() -> None:
    assert german.weekday(date(2024, 11, 14)) == "Donnerstag"
    assert german.clock(time(9, 5)) == "09:05"
    assert german.time_range(time(14), time(16)) == "14:00–16:00 Uhr"
    assert "\u2013" in german.time_range(time(14), time(16))  # en dash, not hyphen


@pytest.mark.parametrize(
    ("day", "today", "expected"),
    [
        (date(2024, 11, 14), date(2024, 11, 14), "heute"),
        (date(2024, 11, 14), date(2024, 11, 13), "morgen"),
        (date(2024, 11, 14), date(2024, 11, 12), "übermorgen"),
        (date(2024, 11, 14), date(2024, 11, 7), "am Donnerstag, 14. November 2024"),
        (date(2024, 11, 14), date(2024, 11, 20), "am Donnerstag, 14. November 2024"),
    ],
)
def test_relative_day(day: date, today: date, expected: str) -> None:
    assert german.relative_day(day, today) == expected


@pytest.mark.parametrize(
    ("number", "word"), [(1, "ein"), (4, "vier"), (5, "fünf"), (12, "zwölf"), (13, "13")]
)
def test_number_word(number: int, word: str) -> None:
    assert typeset.number_word(number) == word
