"""argparse ``type=`` functions shared by every das-sd command: a bad number is refused while the
flags are parsed (usage line, exit status 2), never later as a traceback or an empty result."""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind, what: str):
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, sizes, k of top-k).

    Args:
        text: The flag's value as typed.

    Returns:
        The integer.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not an integer, or is below 1.
    """
    value = _number(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer (must be >= 1)")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (0 meaning none, e.g. a text-encoder rank of 0: UNet only).

    Args:
        text: The flag's value as typed.

    Returns:
        The integer.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not an integer, or is negative.
    """
    value = _number(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative (must be >= 0)")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (no nan, inf or 0).

    Args:
        text: The flag's value as typed.

    Returns:
        The number.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not a number, or is not finite and positive.
    """
    value = _number(text, float, "a number")
    if not math.isfinite(value) or not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite positive number")
    return value


def method_list(text: str) -> list[str]:
    """Comma-separated attribution methods, each one of das_sd.registry.METHOD_NAMES.

    Args:
        text: The flag's value as typed, e.g. ``"das,dtrak"``; blanks around names and empty items
            are ignored.

    Returns:
        The method names, in the order given.

    Raises:
        argparse.ArgumentTypeError: a name is not a known method, or ``text`` names none.
    """
    from .registry import METHOD_NAMES

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHOD_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: {'unknown ' + ', '.join(unknown) if unknown else 'no method'}; "
                                         f"expected some of {', '.join(METHOD_NAMES)}")
    return names


def positive_float_list(text: str) -> tuple[float, ...]:
    """Comma-separated finite numbers > 0, e.g. a grid of rho values ``1,10,100``.

    Args:
        text: the flag's value.

    Returns:
        The numbers, in the order given.

    Raises:
        argparse.ArgumentTypeError: when the list is empty or an item is not a finite positive number.
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        if items:
            return tuple(positive_float(item) for item in items)
    except argparse.ArgumentTypeError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated finite positive numbers, e.g. 1,10,100")


def memory_size(text: str) -> int:
    """A memory size such as ``24GB`` or ``512MiB`` (binary units), in bytes.

    Args:
        text: The flag's value.

    Returns:
        The size in bytes.

    Raises:
        argparse.ArgumentTypeError: When the text is not a positive size.
    """
    from .memory import parse_memory_size

    try:
        return parse_memory_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
