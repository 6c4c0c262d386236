"""What an event source's poller needs from a broker: `QueueConsumer`, and the `Message`s it hands out.

Two implementations: `redis_stream_source.StreamConsumer` (a Redis Stream through a consumer
group) and `nats_source.JetStreamConsumer` (a JetStream durable pull consumer). Both share their
messages among the activator replicas through the broker's own groups, redeliver what was not
acked, count deliveries, and keep the backlog in the broker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Message:
    """One message as delivered: its id, its fields (`body` among them), how many times it has
    been delivered (this time included), and when it entered the broker (Unix milliseconds)."""

    id: str
    fields: dict[str, bytes]
    deliveries: int
    sent_ms: int


class QueueConsumer(Protocol):
    """One consumer of a source's group; every method may raise StoreError naming the broker."""

    description: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def take(self, count: int, window_s: float = 0.0) -> list[Message]:
        """Up to `count` messages (redeliveries first), waiting a little for the first and up to
        `window_s` more to fill the batch."""
        ...

    async def ack(self, ids: Sequence[str]) -> None: ...

    async def retry_in(self, ids: Sequence[str], delay_s: float) -> None:
        """Deliver these again after `delay_s`."""
        ...

    async def dead_letter(self, message: Message, dead_stream: str | None, reason: str) -> None:
        """Copy the message with the reason to `dead_stream` (when set), and never deliver it again."""
        ...

    async def backlog(self) -> int:
        """Messages not acked yet: waiting in the broker, or delivered and running."""
        ...
