"""Stripe events as received: decoding, and which organization they concern.

An event is routed by the Stripe ids it names (its customer, payment intent, charge),
looked up in the index billing keeps of its own objects; the event's content is trusted
only after the signature check, and acted on only by the worker.
"""

from __future__ import annotations

from typing import Any

import msgspec

from billing.gateway import object_id

# What billing acts on; other events are stored (deduplicated) and marked done.
HANDLED = frozenset(
    {
        "payment_intent.succeeded",
        "payment_intent.payment_failed",
        "payment_intent.processing",
        "payment_intent.requires_action",
        "payment_intent.canceled",
        "invoice.created",
        "invoice.finalized",
        "invoice.updated",
        "invoice.paid",
        "invoice.payment_succeeded",
        "invoice.payment_failed",
        "invoice.voided",
        "invoice.marked_uncollectible",
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "customer.subscription.paused",
        "customer.subscription.resumed",
        "charge.refunded",
        "charge.dispute.closed",
        "payment_method.attached",
        "payment_method.detached",
        "payment_method.updated",
        "setup_intent.succeeded",
        "customer.updated",
    }
)


class EventData(msgspec.Struct):
    object: dict[str, Any]


class Event(msgspec.Struct):
    """The part of a Stripe event we read (Stripe adds fields: unknown ones pass)."""

    id: str
    type: str
    created: int
    data: EventData
    api_version: str | None = None


class EventError(ValueError):
    """The body is not a Stripe event."""


_decode = msgspec.json.Decoder(Event).decode


def decode_event(payload: bytes) -> Event:
    try:
        event = _decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise EventError(f"not a Stripe event: {exc}") from None
    if not event.id.startswith("evt_") or len(event.id) > 255 or not event.type or len(event.type) > 100:
        raise EventError("not a Stripe event: bad id or type")
    return event


def routing_ids(event: Event) -> list[str]:
    """The Stripe ids that can tell whose event this is (customer first)."""
    obj = event.data.object
    ids: list[str] = []
    kind = obj.get("object")
    own = object_id(obj.get("id"))
    if kind == "customer" and own:
        ids.append(own)
    for key in ("customer", "payment_intent", "charge"):
        value = object_id(obj.get(key))
        if value:
            ids.append(value)
    if kind in ("payment_intent", "charge") and own:
        ids.append(own)
    return list(dict.fromkeys(ids))
