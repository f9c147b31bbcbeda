"""Generated ``contacts.csv`` files, for the tests and the benchmarks."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from pathlib import Path

HEADER = "email;anrede;titel;vorname;nachname;organisation;anmeldungen"
EVENTS = ("verwaltung", "kreislaufwirtschaft", "allianzen", "forschung")

FIRST_NAMES = (
    "Jana Jürgen Sören Björn Käthe Lena Özlem Thomas Sabine Alex Uwe Gülay Maximilian Zoë "
    "Änne Frauke Jörg Mats Dörte Ingrid Nils Bärbel Hans-Peter Marie-Luise Ülkü".split()
)
LAST_NAMES = (
    "Müller Schmidt Meyer Groß Weiß Schäfer Köhler Bäcker Jäger Hoffmann Krüger Wolff "
    "Schröder Neumann Böhm Fuchs Löffler Günther Voß Strauß Öztürk Lüdenscheidt "
    "Graf-Dörnberg von Bülow".split()
)
ORGANISATIONS = (
    "Stadt Musterhausen, Amt für Digitalisierung",
    "Landkreis Beispielkreis",
    "Regionalverband Nordost",
    "Hochschule Beispielstadt",
    "Ministerium für Umwelt, Klima und Energiewirtschaft",
    "Gemeinde Süderlügum",
    "Deutscher Städte- und Gemeindebund",
)


def write_contacts(path: Path, rows: Iterable[tuple[str, str, str, str, str]]) -> None:
    """A contacts.csv: (email, anrede, vorname, nachname, anmeldungen) per row."""
    lines = [HEADER]
    for address, anrede, first, last, registrations in rows:
        lines.append(f"{address};{anrede};;{first};{last};Testorganisation;{registrations}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def contact_rows(count: int, *, seed: int = 1) -> Iterator[str]:
    """*count* contacts.csv lines (after the header): varied, umlauts, all unique.

    The same *seed* gives the same contacts, so benchmark runs compare alike.
    """
    rng = random.Random(seed)
    for number in range(count):
        anrede = rng.choice(("Frau", "Herr", "", "Frau", "Herr"))
        titel = rng.choice(("", "", "", "Dr.", "Prof. Dr."))
        vorname, nachname = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        registered = rng.random()
        if registered < 0.15:
            anmeldungen = "alle"
        elif registered < 0.6:
            anmeldungen = ",".join(sorted(rng.sample(EVENTS, rng.randint(1, 3))))
        else:
            anmeldungen = ""
        organisation = rng.choice(ORGANISATIONS)
        email = f"kontakt{number:06d}@bench.example.org"
        yield f'{email};{anrede};{titel};{vorname};{nachname};"{organisation}";"{anmeldungen}"\n'


def write_generated(path: Path, count: int, *, seed: int = 1) -> None:
    """A contacts.csv of *count* contacts from :func:`contact_rows`."""
    with path.open("w", encoding="utf-8") as file:
        file.write(HEADER + "\n")
        file.writelines(contact_rows(count, seed=seed))
