"""``sgxvtpm fleet ...``: the operator's side of the fleet (docs/ARCHITECTURE.md, "Many hosts").

Every command is one K1 request to this host's manager (the operator's key
authenticates it); ``fleet join`` makes that manager open the fleet session
to the member itself, through hostd: the token goes to our manager inside
K1 and from there inside the attested fleet session, nowhere else.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

from sgxvtpm.host.statedir import StateDir
from sgxvtpm.vmm.client import VmmClient
from sgxvtpm.wire import k1


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fleet = sub.add_parser("fleet", help="a fleet of managers on several hosts (VM migration)")
    fsub = fleet.add_subparsers(dest="fleet_command", required=True, help="what to do")
    invite = fsub.add_parser("invite", help="print a one-time token for one host to join")
    invite.add_argument("--address", default="", metavar="HOST:PORT",
                        help="this host's fleet address (hostd --fleet-listen), for the list")
    invite.add_argument("--json", action="store_true", help="print the token as JSON")
    join = fsub.add_parser("join", help="join the fleet of the host at HOST:PORT")
    join.add_argument("peer", metavar="HOST:PORT", help="a member's hostd --fleet-listen address")
    join.add_argument("--token", required=True, help="the token `fleet invite` printed there")
    join.add_argument("--address", default="", metavar="HOST:PORT",
                      help="this host's own fleet address, for the member list")
    show = fsub.add_parser("show", help="list the fleet's members")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    fsub.add_parser("leave", help="forget the fleet (its key too) on this host")
    remove = fsub.add_parser("remove", help="remove a member from this host's list")
    remove.add_argument("member", help="the member's platform id (fleet show)")


def address(text: str) -> tuple[str, int]:
    """HOST:PORT (a bracketed IPv6 host too), or ValueError with one line."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _token(text: str) -> bytes:
    try:
        token = bytes.fromhex(text.strip())
    except ValueError:
        token = b""
    if len(token) != 32:
        raise ValueError("--token: not a fleet token (64 hex digits, from `fleet invite`)")
    return token


def _print(info: k1.FleetInfo, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info.to_json(), indent=1, sort_keys=True))
        return
    if not info.fleet_id:
        print("not in a fleet")
        return
    print(f"fleet {info.fleet_id}")
    for m in info.members:
        joined = datetime.datetime.fromtimestamp(m.joined, datetime.UTC).isoformat(
            timespec="seconds"
        )
        mark = " (this host)" if m.platform_id == info.self_id else ""
        print(f"  {m.platform_id}  {m.address or '-':21}  joined {joined}{mark}")


async def run(args: argparse.Namespace, state: StateDir) -> int:
    client = VmmClient(state)
    cmd = args.fleet_command
    if cmd == "invite":
        invitation = await client.request(k1.FleetInvite(address=args.address))
        expires = datetime.datetime.fromtimestamp(invitation.expires, datetime.UTC)
        if args.json:
            print(json.dumps({"token": invitation.token.hex(), "expires": invitation.expires}))
        else:
            print(invitation.token.hex())
            print(f"valid once, until {expires.isoformat(timespec='seconds')}", file=sys.stderr)
        return 0
    if cmd == "join":
        host, port = address(args.peer)
        token = _token(args.token)
        if args.address:
            address(args.address)
        status = await client.request(k1.FleetJoin(host, port, token, address=args.address))
    elif cmd == "leave":
        status = await client.request(k1.FleetLeave())
    elif cmd == "remove":
        status = await client.request(k1.FleetRemove(args.member))
    else:
        status = await client.request(k1.FleetShow())
    _print(status.fleet, bool(getattr(args, "json", False)))
    return 0
