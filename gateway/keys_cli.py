"""``slmgate keys create|list|revoke``: API key records in the ledger database the gateway (and
every replica sharing that database) reads keys from."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from router.ledger.key_store import ApiKey, KeyLimits


def add_keys_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="create, list and revoke API keys (stored hashed in the "
                          "ledger database)")  # fmt: skip
    keys.add_argument("--config", default=None, help="YAML or TOML config file (its ledger_url)")
    keys.add_argument("--ledger", default=None, help="ledger database URL (overrides the config)")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key; its secret is printed once")
    create.add_argument("name")
    create.add_argument("--budget-daily", type=float, default=None, help="USD per UTC day")
    create.add_argument("--budget-monthly", type=float, default=None, help="USD per UTC month")
    create.add_argument("--rpm", type=int, default=None, help="requests per minute")
    create.add_argument("--tpm", type=int, default=None, help="tokens per minute")
    create.add_argument("--models", default="",
                        help="comma-separated routes/models it may call (default all)")  # fmt: skip
    create.add_argument("--admin", action="store_true",
                        help="may also read stats, tasks, metrics and the dashboard")  # fmt: skip
    create.add_argument("--json", action="store_true")
    listing = actions.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    listing.add_argument("--json", action="store_true")
    revoke = actions.add_parser("revoke", help="revoke a key by id (or name)")
    revoke.add_argument("key")
    keys.set_defaults(func=run_keys)


def key_dict(key: ApiKey) -> dict[str, Any]:
    lim = key.limits
    return {"key_id": key.key_id, "name": key.name, "prefix": key.key_prefix,
            "created_at": key.created_at, "revoked_at": key.revoked_at, "admin": key.admin,
            "rpm": lim.rpm, "tpm": lim.tpm, "budget_daily_usd": lim.budget_daily_usd,
            "budget_monthly_usd": lim.budget_monthly_usd, "models": list(lim.models)}  # fmt: skip


def _limits_text(key: ApiKey) -> str:
    lim, parts = key.limits, []
    if lim.budget_daily_usd is not None:
        parts.append(f"${lim.budget_daily_usd:g}/day")
    if lim.budget_monthly_usd is not None:
        parts.append(f"${lim.budget_monthly_usd:g}/month")
    if lim.rpm is not None:
        parts.append(f"{lim.rpm} rpm")
    if lim.tpm is not None:
        parts.append(f"{lim.tpm} tpm")
    if lim.models:
        parts.append("models " + ",".join(lim.models))
    return ", ".join(parts) or "no limits"


def run_keys(args: argparse.Namespace) -> int:
    from router.ledger import Ledger

    url = args.ledger
    if url is None:  # the config (and the model registry it imports) only when needed
        from gateway.config import load_config

        try:
            url = load_config(args.config).resolved_ledger_url()
        except (OSError, ValueError, TypeError) as exc:
            print(f"slmgate: invalid config: {exc}", file=sys.stderr)
            return 2
    if url is None:
        print("slmgate keys: the ledger is off (ledger_url: off); keys live in the ledger "
              "database", file=sys.stderr)  # fmt: skip
        return 2
    ledger = Ledger(url)
    try:
        store = ledger.key_store()
        if args.action == "create":
            try:
                limits = KeyLimits(
                    rpm=args.rpm, tpm=args.tpm, budget_daily_usd=args.budget_daily,
                    budget_monthly_usd=args.budget_monthly,
                    models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
                )  # fmt: skip
            except ValueError as exc:
                print(f"slmgate keys: {exc}", file=sys.stderr)
                return 2
            key, secret = store.create(args.name, limits, admin=args.admin)
            if args.json:
                print(json.dumps({**key_dict(key), "key": secret}))
            else:
                print(f"created {key.key_id} ({key.name}; {_limits_text(key)}"
                      f"{'; admin' if key.admin else ''})")  # fmt: skip
                print(f"key (shown once, store it now): {secret}")
            return 0
        if args.action == "list":
            keys = store.list(include_revoked=args.all)
            if args.json:
                print(json.dumps([key_dict(k) for k in keys]))
                return 0
            for k in keys:
                created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(k.created_at))
                state = "revoked" if k.revoked_at is not None else ("admin" if k.admin else "")
                print(f"{k.key_id:18s} {k.name:20s} {k.key_prefix}…  {created} UTC  "
                      f"{_limits_text(k)}  {state}".rstrip())  # fmt: skip
            if not keys:
                print("no keys")
            return 0
        if store.revoke(args.key):
            print(f"revoked {args.key} (replicas stop accepting it within a few seconds)")
            return 0
        print(f"slmgate keys: no active key {args.key!r}", file=sys.stderr)
        return 1
    finally:
        ledger.close()
