"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class UserError(ValueError):
    """A mistake in the user's input (path, option, data). Message must say what to do.

    A ValueError, so library callers can catch either; the CLI prints it as one line."""


def closest_matches(name: str, choices, n: int = 5) -> list[str]:
    """Closest names to `name`, for 'did you mean' messages."""
    import difflib

    choices = list(choices)
    found = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not found:
        found = [c for c in choices if name.lower() in c.lower() or c.lower() in name.lower()][:n]
    return found


def parse_duration(text) -> float:
    """'90', '90s', '5m', '1.5h', '1h30m' -> seconds."""
    import re

    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms]?)", s)
    if not parts or "".join(a + b for a, b in parts) != s.replace(" ", ""):
        raise UserError(f"cannot read duration {text!r}: use e.g. 90s, 5m, 1.5h or 1h30m")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}
    return sum(float(a) * scale[b] for a, b in parts)
