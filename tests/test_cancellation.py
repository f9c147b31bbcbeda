"""A stop that a library swallowed still stops the pass.

Python 3.11's :func:`asyncio.wait_for` loses a cancellation that arrives in
the same turn of the event loop as the awaited result (aiosmtplib waits that
way for the connect and every reply). Here the relay's answer and the stop
arrive in one turn, on purpose and every time.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from invite_mailer.core.plan import Mailing, MailingState
from invite_mailer.delivery.cancellation import raise_lost_cancellation
from invite_mailer.delivery.results import MailingResult, Outcome, PassResult
from invite_mailer.delivery.senders import Item, SenderPool
from invite_mailer.inputs.series import Kind

NOW = datetime(2024, 10, 24, 10, 5, tzinfo=ZoneInfo("Europe/Berlin"))


def invitation(count: int) -> Mailing:
    keys = tuple(f"k{n}@example.org" for n in range(count))
    return Mailing(
        Kind.INVITATION, "", NOW, NOW + timedelta(days=21), MailingState.OPEN, keys, keys
    )


async def test_a_sender_whose_stop_came_with_the_answer_takes_no_further_mail() -> None:
    mailing = invitation(5)
    result = PassResult(NOW, {mailing.id: MailingResult(mailing)})
    answered: asyncio.Future[None] | None = None
    waiting = asyncio.Event()
    taken: list[str] = []

    async def deliver(
        item: Item, now: datetime, result: PassResult, started: float
    ) -> tuple[Outcome, float | None]:
        nonlocal answered
        taken.append(item.key)
        answered = asyncio.get_running_loop().create_future()
        waiting.set()
        await asyncio.wait_for(answered, 30)  # as aiosmtplib waits for a reply
        return Outcome.SENT, None

    senders = SenderPool(
        [Item(mailing, key) for key in mailing.audience],
        result,
        NOW,
        deliver=deliver,
        halt=lambda exc: None,
        stop=asyncio.Event(),
        workers=1,
        clock=asyncio.get_running_loop().time,
        on_progress=None,
        handovers={},
        drain_timeout=5,
    )
    run = asyncio.create_task(senders.run())
    await waiting.wait()
    assert answered is not None
    # The relay's answer and the stop (SIGINT cancels the pass) in one turn.
    answered.set_result(None)
    run.cancel()
    async with asyncio.timeout(5):
        await asyncio.gather(run, return_exceptions=True)
    assert taken == ["k0@example.org"]
    assert result.mailings[mailing.id].counts[Outcome.SENT] == 1


async def test_a_lost_cancellation_is_raised_and_a_handled_one_is_not() -> None:
    loop = asyncio.get_running_loop()

    async def answered_as_stopped() -> None:
        answered = loop.create_future()
        loop.call_soon(answered.set_result, None)
        loop.call_soon(me.cancel)  # the same turn as the answer
        await asyncio.wait_for(answered, 30)  # 3.11 returns, 3.12+ raises
        raise_lost_cancellation()
        await asyncio.sleep(3600)  # a stopped sender waiting for a rate-limit slot

    me = asyncio.create_task(answered_as_stopped())
    async with asyncio.timeout(5):
        await asyncio.wait([me])
    assert me.cancelled()

    async def stopped_and_handled() -> str:
        task = asyncio.current_task()
        assert task is not None
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            task.uncancel()  # handled on purpose, as asyncio.timeout does
        raise_lost_cancellation()
        return "went on"

    handled = asyncio.create_task(stopped_and_handled())
    await asyncio.sleep(0)
    handled.cancel()
    assert await handled == "went on"
