"""Hostfile and node-filter validation for launch.sh, done before any process starts.

The `deepspeed` launcher reads an MPI-style hostfile (``HOST slots=N`` per line) and hands the host
names to pdsh/ssh/mpirun. Its own parser accepts trailing junk, any characters in a host name and
slot counts of 0, and reports an unknown ``--include`` host only after ssh has been tried. This
module checks all of that up front and fails with one line that names the file, the line and the
fix, so that nothing the user did not mean (shell metacharacters above all) reaches pdsh or ssh.

Command line (used by launch.sh; prints ``key=value`` lines on success, one ``error: ...`` line on
stderr and exit status 2 on failure)::

    python -m engine.hostfile check FILE [--include SPEC | --exclude SPEC] [--node_rank N]
    python -m engine.hostfile host NAME [NAME ...]

SPEC is DeepSpeed's ``NODE_SPEC[@NODE_SPEC ...]`` with ``NODE_SPEC = HOST[:SLOT[,SLOT ...]]``.

Standard library only: launch.sh runs this before torch is imported anywhere.
"""
from __future__ import annotations

import argparse
import ipaddress
import re
import sys
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

__all__ = ["HostfileError", "is_valid_host", "parse_hostfile", "read_hostfile", "apply_filter", "main"]


class HostfileError(ValueError):
    """A hostfile or node filter that must not be launched; the message is one line."""


# RFC 1123 label: letters, digits and '-', not starting or ending with '-', at most 63 characters.
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
# A hostfile line: HOST slots=N, optionally followed by a comment.
_LINE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>\S+)\s*(?:#.*)?$")


def is_valid_host(name: str) -> bool:
    """True for a DNS host name (RFC 1123) or an IPv4 address; nothing else reaches ssh.

    IPv6 literals are refused: DeepSpeed's --include/--exclude syntax uses ':' for slots.
    """
    if not name or len(name) > 253:
        return False
    if re.fullmatch(r"[0-9.]+", name):  # looks numeric: must then be a real IPv4 address
        try:
            ipaddress.IPv4Address(name)
            return True
        except ValueError:
            return False
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    return all(_LABEL.match(label) for label in labels)


def parse_hostfile(lines: Sequence[str], source: str = "hostfile") -> "OrderedDict[str, int]":
    """Parse hostfile lines into an ordered {host: slots}; raise HostfileError on the first bad line.

    Blank lines and lines starting with '#' are ignored, as DeepSpeed does.
    """
    hosts: "OrderedDict[str, int]" = OrderedDict()
    seen_at: Dict[str, int] = {}
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{lineno}"
        m = _LINE.match(line)
        if m is None:
            raise HostfileError(f"{where}: malformed line {line!r}; expected 'HOSTNAME slots=N'")
        host, slots_text = m.group("host"), m.group("slots")
        if not is_valid_host(host):
            raise HostfileError(f"{where}: invalid host name {host!r}; use a DNS name "
                                "(letters, digits, '-', '.') or an IPv4 address")
        if not re.fullmatch(r"[0-9]+", slots_text):
            raise HostfileError(f"{where}: slots must be a whole number >= 1, got 'slots={slots_text}'")
        slots = int(slots_text)
        if slots < 1:
            raise HostfileError(f"{where}: host {host!r} has slots={slots}; slots must be >= 1 "
                                "(remove the line to leave the host out)")
        if host in hosts:
            raise HostfileError(f"{where}: duplicate host {host!r} (first listed on line {seen_at[host]}); "
                                "list each host once with its total slots")
        hosts[host] = slots
        seen_at[host] = lineno
    if not hosts:
        raise HostfileError(f"{source}: no hosts; expected lines of 'HOSTNAME slots=N'")
    return hosts


def read_hostfile(path: str) -> "OrderedDict[str, int]":
    try:
        with open(path, "r", encoding="utf-8") as fd:
            lines = fd.readlines()
    except FileNotFoundError:
        raise HostfileError(f"hostfile not found: {path}") from None
    except IsADirectoryError:
        raise HostfileError(f"hostfile is a directory, not a file: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise HostfileError(f"cannot read hostfile {path}: {err}") from None
    return parse_hostfile(lines, source=path)


def _parse_spec(spec: str, flag: str, hosts: "OrderedDict[str, int]") -> Dict[str, List[int]]:
    """Parse HOST[:SLOT[,SLOT]][@...] against the hostfile; slots are checked to exist."""
    result: Dict[str, List[int]] = OrderedDict()
    for node in spec.split("@"):
        if not node:
            raise HostfileError(f"{flag} {spec!r}: empty node entry; expected HOST[:SLOT,...][@HOST...]")
        host, sep, slot_text = node.partition(":")
        if not is_valid_host(host):
            raise HostfileError(f"{flag} {spec!r}: invalid host name {host!r}")
        if host not in hosts:
            raise HostfileError(f"{flag}: unknown host {host!r}, not in the hostfile "
                                f"(hosts: {', '.join(hosts)})")
        slots: List[int] = []
        if sep:
            for item in slot_text.split(","):
                if not re.fullmatch(r"[0-9]+", item):
                    raise HostfileError(f"{flag} {spec!r}: slot {item!r} on {host!r} is not a number")
                slot = int(item)
                if slot >= hosts[host]:
                    raise HostfileError(f"{flag}: host {host!r} has slots 0..{hosts[host] - 1}, "
                                        f"no slot {slot}")
                slots.append(slot)
        else:
            slots = list(range(hosts[host]))
        result.setdefault(host, [])
        result[host] = sorted(set(result[host]) | set(slots))
    return result


def apply_filter(hosts: "OrderedDict[str, int]", include: str = "",
                 exclude: str = "") -> "OrderedDict[str, List[int]]":
    """Return the {host: [slot ids]} that remain after --include or --exclude, in hostfile order."""
    if include and exclude:
        raise HostfileError("--include and --exclude are mutually exclusive; use one")
    pool = OrderedDict((h, list(range(n))) for h, n in hosts.items())
    if include:
        chosen = _parse_spec(include, "--include", hosts)
        pool = OrderedDict((h, chosen[h]) for h in hosts if h in chosen)
    elif exclude:
        dropped = _parse_spec(exclude, "--exclude", hosts)
        pool = OrderedDict((h, [s for s in slots if s not in dropped.get(h, [])]) for h, slots in pool.items())
        pool = OrderedDict((h, s) for h, s in pool.items() if s)
    if not pool:
        raise HostfileError("--exclude leaves no host to run on")
    return pool


def check(path: str, include: str = "", exclude: str = "", node_rank: Optional[int] = None) -> Dict[str, str]:
    """Validate everything launch.sh needs; return the summary it prints."""
    hosts = read_hostfile(path)
    pool = apply_filter(hosts, include, exclude)
    names = list(pool)
    summary = {
        "nodes": str(len(pool)),
        "procs": str(sum(len(s) for s in pool.values())),
        "max_slots": str(max(len(s) for s in pool.values())),
        "first_host": names[0],
        "hosts": ",".join(names),
    }
    if node_rank is not None:
        if not 0 <= node_rank < len(names):
            raise HostfileError(f"--node_rank {node_rank} is out of range; the hostfile gives "
                                f"{len(names)} node(s), so use 0..{len(names) - 1}")
        summary["node_host"] = names[node_rank]
        summary["node_slots"] = str(len(pool[names[node_rank]]))
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.hostfile",
                                     description="Validate a DeepSpeed hostfile and node filter.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="validate FILE; print key=value lines (nodes, procs, max_slots, ...)")
    p.add_argument("hostfile")
    p.add_argument("--include", default="")
    p.add_argument("--exclude", default="")
    p.add_argument("--node_rank", type=int, default=None)
    h = sub.add_parser("host", help="check that each NAME is a valid host name or IPv4 address")
    h.add_argument("names", nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.command == "host":
            for name in args.names:
                if not is_valid_host(name):
                    raise HostfileError(f"invalid host name {name!r}; use a DNS name "
                                        "(letters, digits, '-', '.') or an IPv4 address")
            return 0
        summary = check(args.hostfile, args.include, args.exclude, args.node_rank)
    except HostfileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for key, value in summary.items():
        print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
