"""The chat page's pure modules (static/chatai/chat/sse.js and conversations.js), run in Node: the
stream reader at every byte boundary, the newest-first order, search, the request, imports. The page
itself (DOM, IndexedDB, the live API) is tested in Chromium: tests/test_browser.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

CHAT = Path(__file__).resolve().parent.parent / "static" / "chatai" / "chat"
SCRIPT = """
import { readEvents } from "%(dir)s/sse.js";
import * as c from "%(dir)s/conversations.js";

const out = {};
const raw = new TextEncoder().encode(': queued (3s)\\n\\ndata: {"a":"é"}\\n\\ndata: [DONE]\\n\\n');
out.reads = [];
for (const size of [1, 2, 5, raw.length]) {
  const seen = [];
  let i = 0;
  const body = new ReadableStream({ pull(ctl) {
    if (i >= raw.length) { ctl.close(); return; }
    ctl.enqueue(raw.slice(i, i + size)); i += size;
  } });
  await readEvents(body, { comment: (t) => seen.push(["comment", t]), data: (t) => seen.push(["data", t]) });
  out.reads.push(seen);
}
const defaults = { system_prompt: "Be brief.", temperature: 0.5, top_p: null, max_tokens: 0 };
const a = c.newConversation(defaults, "m1"); a.updated = 1; a.title = "Alpha";
const b = c.newConversation(defaults, ""); b.updated = 3; b.title = "Beta";
b.messages.push({ role: "user", content: "tell me about Zebras" });
out.order = c.newestFirst([a, b]).map((x) => x.title);
out.unsorted = [a.title, b.title];
out.search = [c.matches(a, ""), c.matches(a, "alp"), c.matches(a, "zebra"), c.matches(b, "zebra")];
out.blankModel = b.model;
a.messages = [{ role: "user", content: "hi" }, { role: "assistant", content: "", error: "failed" },
              { role: "assistant", content: "hello" }];
a.max_tokens = "12"; a.top_p = "";
out.request = c.requestBody(a);
out.title = c.titleFrom("  a\\n\\nlong   question " + "x".repeat(80));
const blank = () => c.newConversation(defaults, "fallback");
const messages = [{ role: "system", content: "sys" }, { role: "user", content: [{ type: "text", text: "q?" }] }];
out.plain = c.parseImport(messages, defaults, blank, () => false);
out.ours = c.parseImport(c.exportFile([{ id: "keep", title: "T", messages: [{ role: "user", content: "x" }] },
                                       { id: "taken", messages: [] }, { no: "messages" }]),
                         defaults, blank, (id) => id === "taken");
try { c.parseImport({ nothing: 1 }, defaults, blank, () => false); out.bad = "accepted"; }
catch (e) { out.bad = e.message; }
console.log(JSON.stringify(out));
"""


@pytest.fixture(scope="module")
def result() -> dict:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is needed (it is installed with the browser tests' tools)")
    proc = subprocess.run([node, "--input-type=module", "-e", SCRIPT % {"dir": CHAT.as_uri()}],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_the_stream_reader_hands_on_whole_events_whatever_the_byte_boundaries(result: dict) -> None:
    expected = [["comment", "queued (3s)"], ["data", '{"a":"é"}'], ["data", "[DONE]"]]
    assert result["reads"] == [expected] * 4


def test_conversations_are_listed_newest_first_without_reordering_the_list(result: dict) -> None:
    assert result["order"] == ["Beta", "Alpha"] and result["unsorted"] == ["Alpha", "Beta"]


def test_search_matches_titles_and_message_text(result: dict) -> None:
    assert result["search"] == [True, True, False, True]


def test_the_request_skips_failed_empty_replies_and_unset_settings(result: dict) -> None:
    assert result["request"] == {
        "model": "m1", "stream": True, "temperature": 0.5, "max_tokens": 12,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"}]}
    assert result["blankModel"] == ""


def test_a_title_is_the_first_sixty_characters_on_one_line(result: dict) -> None:
    assert result["title"] == (" a long question " + "x" * 80)[:60]


def test_imports_take_openai_messages_and_our_export(result: dict) -> None:
    (plain,) = result["plain"]
    assert plain["system"] == "sys" and plain["messages"] == [{"role": "user", "content": "q?"}]
    assert plain["title"] == "q?" and plain["model"] == "fallback"
    keep, taken = result["ours"]
    assert (keep["id"], keep["title"], keep["model"]) == ("keep", "T", "fallback")
    assert taken["id"] != "taken" and taken["title"] == "Imported chat"
    assert result["bad"] == "This file holds no conversations."
