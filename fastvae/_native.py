"""The compiled C-ABI library (``cpu`` and ``cuda`` backends): not built yet."""

from __future__ import annotations


def unusable_reason(kind: str) -> str | None:
    return "the native library is not part of this build"


def implementation(kind: str):
    raise RuntimeError(f"fastvae backend {kind!r}: {unusable_reason(kind)}")
