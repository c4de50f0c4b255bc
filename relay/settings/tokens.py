"""Which label of `RELAY_AIRCALL_TOKENS` a token is: the receiver's check of each webhook's
token, and the match of Aircall's listed webhooks to labels (`relay.aircall_api.webhooks`).

The given token is hashed and compared with the SHA-256 of every configured token, all of them,
with `hmac.compare_digest`: the time taken depends neither on how much of a token matched nor on
which entry matched.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from relay.settings.values import AircallToken


class TokenTable:
    def __init__(self, tokens: Iterable[AircallToken]) -> None:
        self._entries = [
            (hashlib.sha256(entry.token.reveal().encode("utf-8")).digest(), entry.label)
            for entry in tokens
        ]

    def __len__(self) -> int:
        return len(self._entries)

    def label_for(self, token: str | None) -> str | None:
        """The label of the matching token, or None for a missing or unknown one."""
        digest = hashlib.sha256((token or "").encode("utf-8", "surrogatepass")).digest()
        found: str | None = None
        for expected, label in self._entries:
            if hmac.compare_digest(digest, expected) and token:
                found = label
        return found
