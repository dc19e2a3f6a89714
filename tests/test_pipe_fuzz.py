"""Property-based tests: random commands and random byte streams execute nothing, hang nothing, print no traceback."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcside import protocol as p
from hpcside.config import load
from hpcside.forcecommand import VERBS, Refused, parse_command, run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    path = d / "services.ini"
    path.write_text(f"[hpcside]\nstate_dir = {d}/state\nlauncher = local\nmin_interval = 1h\n\n"
                    "[service:m]\ntemplate = vllm-cpu\nmodel_path = /nonexistent\n")
    return path


@given(st.one_of(st.none(), st.text(max_size=200), st.sampled_from(VERBS).map(lambda v: f" {v}\t")))
def test_parse_command_accepts_exactly_the_verbs(text: str | None) -> None:
    try:
        command = parse_command(text)
    except Refused as exc:
        assert text is None or text.strip(" \t") not in VERBS or len(text) > 64
        # One of three fixed messages: the input is never echoed back.
        assert str(exc) in ("command too long", "no command given; this key only runs: serve, ping, status, version",
                            "command not allowed; this key only runs: serve, ping, status, version")
    else:
        assert command.verb in VERBS and text is not None and command.verb == text.strip(" \t")


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300).filter(lambda t: t.strip(" \t") not in VERBS))
def test_forcecommand_refuses_every_other_command_in_one_line(config_path: Path, text: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert run(load(config_path), {"SSH_ORIGINAL_COMMAND": text}, out, err) == 1
    assert out.getvalue() == ""
    assert err.getvalue().startswith("hpcside: ") and err.getvalue().count("\n") == 1
    assert "Traceback" not in err.getvalue()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_characters="\x00"), min_size=1, max_size=100)
       .filter(lambda t: t.strip(" \t") not in VERBS))
def test_the_real_forcecommand_process_refuses_random_commands(config_path: Path, tmp_path: Path, text: str) -> None:
    marker = tmp_path / "ran"
    # As bytes: sshd passes what the client sent, which need not be UTF-8 (a lone surrogate here).
    env = {b"PATH": b"/usr/bin:/bin",
           b"SSH_ORIGINAL_COMMAND": (text + f"; touch {marker}").encode("utf-8", "surrogatepass")}
    proc = subprocess.run([sys.executable, "-S", "-m", "hpcside", "--config", str(config_path), "forcecommand"],
                          cwd=ROOT, env=env, capture_output=True, timeout=20, check=False)
    assert proc.returncode == 1 and proc.stdout == b""
    assert b"Traceback" not in proc.stderr and not marker.exists()


frames = st.builds(
    lambda t, s, payload: (t, s, payload),
    st.sampled_from(sorted(p.NAMES)), st.integers(0, p.MAX_STREAM_ID), st.binary(max_size=2000))


@given(st.lists(frames, max_size=20), st.lists(st.integers(1, 5000), max_size=30))
def test_frames_survive_any_split(items: list, cuts: list) -> None:  # type: ignore[type-arg]
    wire = b"".join(p.encode(t, s, payload) for t, s, payload in items)
    decoder = p.Decoder()
    got = []
    pos = 0
    for cut in cuts + [len(wire)]:
        got += decoder.feed(wire[pos:pos + cut])
        pos += cut
    got += decoder.feed(wire[pos:])
    assert [(f.type, f.stream, f.payload) for f in got] == items


@settings(max_examples=500)
@given(st.binary(max_size=4000))
def test_the_decoder_either_decodes_or_raises_protocol_error(data: bytes) -> None:
    decoder = p.Decoder()
    try:
        for frame in decoder.feed(data):
            assert frame.type in p.NAMES and len(frame.payload) <= p.MAX_FRAME
            if frame.type in p.JSON_TYPES:
                try:
                    frame.json()
                except p.ProtocolError:
                    pass
    except p.ProtocolError:
        return
    assert decoder.pending < p.HEADER.size + p.MAX_FRAME + 5


def test_an_oversized_length_is_refused_before_buffering() -> None:
    decoder = p.Decoder()
    with pytest.raises(p.ProtocolError, match="out of bounds"):
        decoder.feed(p.HEADER.pack(p.MAX_FRAME + 6, p.DATA, 1))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hello=st.booleans(), data=st.binary(max_size=3000))
def test_the_session_server_survives_random_bytes(config_path: Path, hello: bool, data: bytes) -> None:
    stream = (p.hello_client("fuzz") if hello else b"") + data
    env = {"PATH": "/usr/bin:/bin", "SSH_ORIGINAL_COMMAND": "serve"}
    proc = subprocess.run([sys.executable, "-S", "-m", "hpcside", "--config", str(config_path), "forcecommand"],
                          cwd=ROOT, env=env, input=stream, capture_output=True, timeout=30, check=False)
    assert proc.returncode in (0, 1)
    assert b"Traceback" not in proc.stderr and proc.stderr == b""
    # Whatever it answered is well-formed frames.
    decoder = p.Decoder()
    for frame in decoder.feed(proc.stdout):
        assert frame.type in (p.HELLO, p.ERROR, p.PONG, p.RESPONSE, p.DATA, p.END, p.PROGRESS)
    assert decoder.pending == 0


def test_the_session_server_ends_a_session_without_hello_in_time(config_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "SSH_ORIGINAL_COMMAND": "serve"}
    proc = subprocess.Popen([sys.executable, "-S", "-m", "hpcside", "--config", str(config_path), "forcecommand"],
                            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"\x00\x00")  # half a header, then silence
        proc.stdin.flush()
        assert proc.wait(timeout=20) == 1  # it hangs up by itself; stdin is still open
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.communicate()
    (frame,) = p.Decoder().feed(out)
    assert frame.type == p.ERROR and "HELLO" in frame.json()["message"]
    assert err == b""
