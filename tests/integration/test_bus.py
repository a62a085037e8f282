"""The one definition of streams and consumers: created when missing, and an existing consumer converges to it."""

from __future__ import annotations

import nats
import pytest

from hapki.contracts import subjects
from hapki.lab import stack
from hapki.runtime import bus

pytestmark = pytest.mark.integration


async def test_an_existing_consumer_with_an_old_ack_wait_is_updated(env) -> None:
    nc = await nats.connect(**env.nats.connect_kwargs())
    try:
        js = nc.jetstream()
        await bus.ensure_topology(js, stack.nats_config(env))
        old = bus.signing_consumer()
        old.ack_wait = 30.0  # what an earlier release deployed
        await js.add_consumer(subjects.SIGNING_STREAM, old)
        assert (await js.consumer_info(subjects.SIGNING_STREAM, subjects.SIGNING_CONSUMER)).config.ack_wait == 30.0
        await bus.ensure_topology(js, stack.nats_config(env))
        info = await js.consumer_info(subjects.SIGNING_STREAM, subjects.SIGNING_CONSUMER)
        assert info.config.ack_wait == bus.SIGNING_ACK_WAIT_SECONDS
        assert (await js.stream_info(subjects.HA_EVENTS_STREAM)).config.name == subjects.HA_EVENTS_STREAM
    finally:
        await nc.close()
