"""The bounce mailbox over IMAP (RFC 9051): fetch what is new, record it, mark it.

With the standard library's :mod:`imaplib`, in a thread. A poll reads the
unseen messages of ``imap.folder`` without marking them (``BODY.PEEK[]``),
records each one (:class:`~invite_mailer.delivery.bounce_intake.Intake`) and
only then marks it: moved to ``imap.processed_folder`` when one is set, else
flagged ``\\Seen``. A message is never deleted before it is recorded, and
one recorded twice (a crash between the two steps) counts once.
"""

from __future__ import annotations

import asyncio
import imaplib
import re
import ssl
from datetime import datetime

from invite_mailer.delivery.bounce_intake import Intake
from invite_mailer.delivery.bounces import MAX_REPORT_BYTES
from invite_mailer.errors import SetupFailure
from invite_mailer.inputs.settings import ImapSettings, Security

__all__ = ["MAX_PER_POLL", "poll"]

#: Messages one poll takes; the rest waits for the next.
MAX_PER_POLL = 500

_SIZE = re.compile(rb"RFC822\.SIZE (\d+)")


async def poll(settings: ImapSettings, intake: Intake, now: datetime) -> None:
    """Take in what is new in the mailbox; SetupFailure when it cannot be read."""
    fetched = await asyncio.to_thread(_fetch, settings)
    done: list[str] = []
    for uid, data in fetched:
        if data is None:
            intake.ignored.append((_where(settings, uid), "larger than a report can be"))
        else:
            await intake.take(_where(settings, uid), data, now)
        done.append(uid)
    if done:
        await asyncio.to_thread(_mark, settings, done)


def _where(settings: ImapSettings, uid: str) -> str:
    return f"imap://{settings.host}/{settings.folder};UID={uid}"


def _connect(settings: ImapSettings) -> imaplib.IMAP4:
    context = ssl.create_default_context()
    if not settings.verify_certificates:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    client: imaplib.IMAP4 | None = None
    try:
        if settings.security is Security.TLS:
            client = imaplib.IMAP4_SSL(
                settings.host, settings.port, ssl_context=context, timeout=settings.timeout
            )
        else:
            client = imaplib.IMAP4(settings.host, settings.port, timeout=settings.timeout)
            if settings.security is Security.STARTTLS:
                client.starttls(ssl_context=context)
        _log_in(client, settings.username, settings.password.get_secret_value())
    except (OSError, imaplib.IMAP4.error) as exc:
        if client is not None:
            _close(client)
        raise SetupFailure(
            f"cannot read the bounce mailbox {settings.username}@{settings.host}:"
            f"{settings.port}: {_said(exc)}",
            hint="check imap.host, imap.port, imap.security, imap.username and "
            "INVITE_MAILER_IMAP__PASSWORD",
            temporary=isinstance(exc, OSError),
        ) from None
    return client


def _close(client: imaplib.IMAP4) -> None:
    try:
        client.shutdown()
    except OSError:
        pass


def _log_in(client: imaplib.IMAP4, user: str, password: str) -> None:
    if (user + password).isascii():
        client.login(user, password)
        return
    # LOGIN takes ASCII only; AUTHENTICATE PLAIN (RFC 4616) carries UTF-8.
    secret = f"\0{user}\0{password}".encode()
    client.authenticate("PLAIN", lambda _challenge: secret)


def _said(exc: BaseException) -> str:
    text = exc.args[0] if exc.args else exc
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return f"{type(exc).__name__}: {text}"


def _select(client: imaplib.IMAP4, settings: ImapSettings) -> None:
    status, answer = client.select(f'"{settings.folder}"')
    if status != "OK":
        raise SetupFailure(
            f"the bounce mailbox has no folder {settings.folder!r}: {answer!r}",
            hint="set imap.folder to an existing folder (INBOX for the inbox)",
        )


def _fetch(settings: ImapSettings) -> list[tuple[str, bytes | None]]:
    """(UID, raw message or None when too large) of the unseen messages."""
    client = _connect(settings)
    try:
        _select(client, settings)
        status, found = client.uid("SEARCH", "UNSEEN")
        if status != "OK":
            raise SetupFailure(f"the bounce mailbox refused SEARCH: {found!r}")
        uids = [uid.decode() for uid in (found[0] or b"").split()[:MAX_PER_POLL]]
        messages: list[tuple[str, bytes | None]] = []
        for uid in uids:
            status, sized = client.uid("FETCH", uid, "(RFC822.SIZE)")
            size = _SIZE.search(sized[0] if sized and isinstance(sized[0], bytes) else b"")
            if status != "OK" or size is None:
                continue  # gone meanwhile
            if int(size.group(1)) > MAX_REPORT_BYTES:
                messages.append((uid, None))
                continue
            status, parts = client.uid("FETCH", uid, "(BODY.PEEK[])")
            data = next((p[1] for p in parts if isinstance(p, tuple)), None)
            if status == "OK" and isinstance(data, bytes):
                messages.append((uid, data))
        return messages
    except imaplib.IMAP4.error as exc:
        raise SetupFailure(f"the bounce mailbox failed: {_said(exc)}", temporary=True) from None
    finally:
        _logout(client)


def _mark(settings: ImapSettings, uids: list[str]) -> None:
    """Move the messages read to the processed folder, or flag them as seen."""
    client = _connect(settings)
    try:
        target = settings.processed_folder
        if target:
            client.create(f'"{target}"')  # NO when it exists: fine
        _select(client, settings)
        capabilities = _capabilities(client)
        moved = []
        for uid in uids:
            if not target:
                client.uid("STORE", uid, "+FLAGS.SILENT", r"(\Seen)")
            elif "MOVE" in capabilities:
                client.uid("MOVE", uid, f'"{target}"')
            else:
                status, _ = client.uid("COPY", uid, f'"{target}"')
                if status == "OK":  # only a copy that exists lets the original go
                    client.uid("STORE", uid, "+FLAGS.SILENT", r"(\Seen \Deleted)")
                    moved.append(uid)
        if moved:
            # UID EXPUNGE removes only these, not what someone else flagged as deleted.
            if "UIDPLUS" in capabilities:
                client.uid("EXPUNGE", ",".join(moved))
    except imaplib.IMAP4.error as exc:
        raise SetupFailure(f"the bounce mailbox failed: {_said(exc)}", temporary=True) from None
    finally:
        _logout(client)


def _capabilities(client: imaplib.IMAP4) -> set[str]:
    """What the server offers once logged in (the greeting may list less)."""
    status, answer = client.capability()
    found = answer[0] if status == "OK" and answer and isinstance(answer[0], bytes) else b""
    return set(found.decode("ascii", "replace").upper().split()) | set(client.capabilities)


def _logout(client: imaplib.IMAP4) -> None:
    try:
        client.logout()
    except (OSError, imaplib.IMAP4.error):
        pass
