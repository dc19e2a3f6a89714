"""Server-sent events split into whole events: the one splitter for every SSE relay.

vLLM (and any OpenAI-compatible server) ends each event with a blank line. A relay must never
pass on half an event, so it keeps what follows the last blank line until the rest arrives.
Used by the router's ``Transcript`` (hpcside/resume.py) and by the web side's gateway
(gateway/sse.py). Pure: no I/O.
"""

from __future__ import annotations

from typing import List, Tuple

SEPARATOR = b"\n\n"


def split_events(buffer: bytes) -> Tuple[List[bytes], bytes]:
    """The complete events in ``buffer`` (each without its blank line) and the incomplete rest."""
    if SEPARATOR not in buffer:
        return [], buffer
    complete, _, rest = buffer.rpartition(SEPARATOR)
    return complete.split(SEPARATOR), rest
