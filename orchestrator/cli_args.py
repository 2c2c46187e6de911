"""Argument types and checks the ``zimage-orch`` commands share: every one refuses bad input before a deployment
starts (on a GPU that is minutes of model loading), with a one-line error naming the option."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from zimage_common.errors import InvalidRequestError


def at_least(low: int):
    """An argparse ``type``: an integer of at least ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def int_list(low: int):
    """An argparse ``type``: comma-separated integers, each at least ``low`` (``1,4,8``)."""
    one = at_least(low)

    def parse(text: str) -> list[int]:
        items = [s.strip() for s in text.split(",")]
        if not all(items):
            raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers, e.g. 1,4,8")
        return [one(s) for s in items]
    return parse


def port(text: str) -> int:
    """An argparse ``type``: a TCP port, 0 (any free one) to 65535."""
    value = at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 0 to 65535, got {value}")
    return value


def output_dir(path: str | Path, option: str = "--out") -> Path:
    """``path`` as a directory the command can write, made if missing; the refusal names ``option``."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InvalidRequestError(f"{option} {p}: exists and is not a directory", param=option)
    try:
        p.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=p).close()  # a name of its own: runs sharing the directory do not collide
    except OSError as e:
        raise InvalidRequestError(f"{option} {p}: cannot write there: {e.strerror or e}", param=option) from None
    return p


def check_listen(host: str, port: int, where: str = "--host/--port") -> None:
    """Whether this process could listen on ``host:port`` now, on every address the name resolves to, as uvicorn
    binds them (IPv6 sockets IPv6-only): a name that resolves, a port free. ``serve`` checks before it starts Ray
    and loads models rather than after; ``where`` names the options or config fields the values came from."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InvalidRequestError(f"{where} {host}:{port}: {e.strerror}; give an address of this machine "
                                  f"(127.0.0.1 by default)", param=where) from None
    for family, kind, proto, _, address in dict.fromkeys((i[0], i[1], i[2], None, i[4]) for i in infos):
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(address)
            except OSError as e:
                raise InvalidRequestError(f"{where} {host}:{port}: cannot listen there: {e.strerror}; choose another "
                                          f"port or stop what holds it", param=where) from None
