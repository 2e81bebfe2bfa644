"""`credits dev` (the whole stack), `credits dev card` (a test card on the local Stripe
stand-in) and `credits dev authenticate` (finish 3-D Secure there, as Stripe.js would)."""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from accounts.admin import AdminError
from billing import config as billing_config
from core.config import Config
from ops import dev, stack
from ops.commands.common import Subparsers, json_flag, write_json, write_text

# Card numbers localstripe knows (Stripe's test numbers).
CARDS = {
    "visa": ("4242424242424242", "succeeds"),
    "3ds": ("4000002760003184", "needs 3-D Secure: the purchase answers requires_action and a client_secret"),
    "declined": ("4000000000000341", "attaches, then every charge is declined"),
}
# On Stripe itself (test mode) the same cards exist as ready-made payment methods.
STRIPE_TEST_METHODS = {
    "visa": "pm_card_visa",
    "3ds": "pm_card_threeDSecure2Required",
    "declined": "pm_card_chargeDeclined",
}
HTTP_TIMEOUT_S = 10.0


def register(sub: Subparsers) -> None:
    d = sub.add_parser("dev", help="run the whole stack on this machine (each service in its own process)")
    for spec in dev.PORTS:
        default = f"default {spec.default}" if spec.default else "default a free port"
        d.add_argument(spec.flag, type=int, help=f"{spec.what} ({spec.variable}; {default}, then kept)")
    json_flag(d)
    d.set_defaults(fn=cmd_dev)
    tools = d.add_subparsers(dest="dev_command", required=False)
    card = tools.add_parser("card", help="a test card (pm_...) on the running stack's local Stripe stand-in")
    card.add_argument("--kind", choices=sorted(CARDS), default="visa", help="visa (default), 3ds or declined")
    json_flag(card)
    card.set_defaults(fn=cmd_dev_card)
    auth = tools.add_parser("authenticate", help="finish 3-D Secure of a payment on the local Stripe stand-in")
    auth.add_argument("client_secret", help="the client_secret a purchase or subscription answered")
    auth.add_argument("--fail", action="store_true", help="fail the authentication instead")
    json_flag(auth)
    auth.set_defaults(fn=cmd_dev_authenticate)


def cmd_dev(config: Config, args: argparse.Namespace) -> int:
    flags = {spec.name: getattr(args, spec.flag.removeprefix("--").replace("-", "_")) for spec in dev.PORTS}
    from billing.localstripe import LocalStripeError
    from ops.supervisor import SupervisorError

    try:
        return dev.run(config, flags, as_json=args.json, env=os.environ)
    except dev.DevError as exc:
        raise AdminError(str(exc)) from None
    except (SupervisorError, LocalStripeError) as exc:
        raise AdminError(f"credits dev did not start: {exc}") from None


def _local_stripe(config: Config) -> tuple[str, str, str]:
    """(api base, secret key, publishable key) of the running stack's localstripe."""
    from billing.runtime import running_localstripe

    if billing_config.load().stripe_configured:
        methods = ", ".join(f"{k}: {v}" for k, v in STRIPE_TEST_METHODS.items())
        raise AdminError(f"STRIPE_SECRET_KEY is set: on Stripe's test mode use its test payment methods ({methods})")
    live = stack.running(config)
    found = running_localstripe(live.data_dir) if live is not None else None
    if found is None:
        raise AdminError("no local Stripe stand-in is running: start the stack with `credits dev`")
    return found.stripe_api_base, found.stripe_secret_key or "", found.stripe_publishable_key or ""


def _post(url: str, form: dict[str, str], secret: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    request = urllib.request.Request(  # noqa: S310 - the local Stripe stand-in's URL
        url, data=urllib.parse.urlencode(form).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as reply:  # noqa: S310
            body: dict[str, Any] = json.loads(reply.read())
            return body
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise AdminError(f"the local Stripe stand-in answered {exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise AdminError(f"the local Stripe stand-in is unreachable: {exc.reason}") from None


def cmd_dev_card(config: Config, args: argparse.Namespace) -> int:
    api_base, secret, _ = _local_stripe(config)
    number, behaviour = CARDS[args.kind]
    form = {"type": "card", "card[number]": number, "card[exp_month]": "12", "card[exp_year]": "2034"}
    pm = _post(f"{api_base}/v1/payment_methods", {**form, "card[cvc]": "123"}, secret)
    if args.json:
        write_json({"payment_method_id": pm["id"], "kind": args.kind, "number": number, "behaviour": behaviour})
    else:
        write_text(str(pm["id"]))
    return 0


def cmd_dev_authenticate(config: Config, args: argparse.Namespace) -> int:
    api_base, _, publishable = _local_stripe(config)
    intent, marker, _ = args.client_secret.partition("_secret_")
    if not marker or not intent.startswith("pi_"):
        raise AdminError("expected a PaymentIntent's client secret (pi_..._secret_...)")
    done = _post(
        f"{api_base}/v1/payment_intents/{urllib.parse.quote(intent)}/_authenticate",
        {"client_secret": args.client_secret, "success": "false" if args.fail else "true", "key": publishable},
    )
    if args.json:
        write_json({"payment_id": done.get("id"), "status": done.get("status")})
    else:
        write_text(f"{done.get('id')} {done.get('status')}")
    return 0
