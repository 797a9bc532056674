"""Reading OpenAI-compatible request and response bodies, as the ext_proc endpoint picker sees them.

Requests: ``model``, the size of the prompt (``messages``, ``prompt`` or ``input``) for the
input-token estimate, and the output budget (``max_tokens`` / ``max_completion_tokens`` /
``max_output_tokens``). Responses: the ``usage`` object, either in a JSON body or in the chunks of
a server-sent-event stream (``stream_options.include_usage``). When a stream carries no usage, the
number of content chunks stands in for the completion tokens (vLLM sends one token per chunk).

A stream also says whether it finished: chat and text completions (OpenAI, vLLM) end with
``data: [DONE]``, even after an error event; the Responses API ends with ``response.completed``
(or ``response.incomplete`` / ``response.failed``). A stream of either kind that ends without it
was cut short upstream (the backend died mid-generation, yet the connection closed cleanly).
"""

from __future__ import annotations

import codecs
import json
import math
import re
from dataclasses import dataclass, replace
from typing import Any

# About four characters per token for English BPE vocabularies; the learner corrects the rest.
CHARS_PER_TOKEN = 4.0
# Role markers and separators every chat template adds per message.
TOKENS_PER_MESSAGE = 4
# What one image part is charged, whatever its size (it is not decoded here): OpenAI's charge for a
# 1024x1024 image at high detail (85 + 4 tiles x 170). Open vision models spend a few hundred to
# ~1,500 tokens per image (LLaVA-1.5 576; Qwen2-VL one per 28x28 pixels); the outcome's usage
# reports what was spent, and the tenant's token quota is trued up to it.
TOKENS_PER_IMAGE = 765
# The content part types that carry an image (chat completions, the Responses API, Anthropic-style).
_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    """What the endpoint picker needs from one request body.

    Attributes
    ----------
    model
        The ``model`` field ("" when absent).
    estimated_input_tokens
        Prompt size estimate: characters / :data:`CHARS_PER_TOKEN`, plus per-message overhead,
        plus :data:`TOKENS_PER_IMAGE` for each image part.
    max_tokens
        Output budget the client asked for (0 when unspecified).
    stream
        Whether the client asked for a server-sent-event stream.
    body_read
        How much of the body the estimate saw: ``"whole"``; ``"partial"``, its first ``seen_bytes``
        (the proxy passed only those, :func:`parse_cut_request`); ``"unseen"``, none of it (it
        streams past after the decision, :func:`unseen_request`).
    seen_bytes, body_bytes
        For a body not read whole: the bytes seen, and the whole body's size from its
        ``content-length`` (0 when unknown). Both 0 when the whole body was seen.
    image_bytes
        For a partial body: the bytes of inline base64 images in the part seen, charged as images
        rather than as prompt text (see :func:`inline_images`).
    images
        Image parts charged :data:`TOKENS_PER_IMAGE` each.
    """

    model: str
    estimated_input_tokens: int
    max_tokens: int
    stream: bool
    seen_bytes: int = 0
    body_bytes: int = 0
    body_read: str = "whole"
    image_bytes: int = 0
    images: int = 0


def _content_size(content: Any) -> tuple[int, int]:
    """Characters of text and image parts in a message ``content`` (a string or a list of typed parts).

    >>> _content_size([{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "https://x"}}])
    (2, 1)
    """
    if isinstance(content, str):
        return len(content), 0
    chars = images = 0
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                chars += len(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    chars += len(text)
                elif part.get("type") in _IMAGE_PARTS:
                    images += 1
    return chars, images


def _int_field(doc: dict[str, Any], *names: str) -> int:
    """The first of ``names`` holding a positive whole number (JSON writers may send ``64.0``), else 0.

    >>> _int_field({"max_tokens": 64.0}, "max_tokens"), _int_field({"max_tokens": "64"}, "max_tokens")
    (64, 0)
    """
    for name in names:
        v = doc.get(name)
        if isinstance(v, float) and v.is_integer() and 0 < v < 2**53:
            return int(v)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return 0


def _is_token_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _loads(data: bytes) -> Any:
    """``json.loads``, or ``None`` when ``data`` is not JSON the reader can take.

    Deep nesting (``[[[[...``) exhausts the parser's recursion limit: a client or backend body
    must not get past here with an exception, so it is unparseable like any other bad JSON.
    """
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


def parse_request(body: bytes) -> OpenAIRequest | None:
    """Parse an OpenAI-compatible JSON request body; ``None`` when it is not a JSON object.

    Examples
    --------
    >>> r = parse_request(b'{"model": "m", "max_tokens": 64, '
    ...                   b'"messages": [{"role": "user", "content": "hello there, model"}]}')
    >>> (r.model, r.estimated_input_tokens, r.max_tokens, r.stream)
    ('m', 9, 64, False)
    """
    if not body:
        return None
    doc = _loads(body)
    if not isinstance(doc, dict):
        return None
    return _request_of(doc)


def _request_of(doc: dict[str, Any]) -> OpenAIRequest:
    chars = 0
    images = 0
    overhead = 0
    token_ids = 0  # a prompt given as token ids (completions, embeddings) is its own count
    messages = doc.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                c, i = _content_size(m.get("content"))
                chars, images = chars + c, images + i
                overhead += TOKENS_PER_MESSAGE
    for key in ("prompt", "input"):
        value = doc.get(key)
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, list):
            for v in value:
                if isinstance(v, str):
                    chars += len(v)
                elif _is_token_id(v):
                    token_ids += 1
                elif isinstance(v, list) and all(map(_is_token_id, v)):  # a batch of token-id prompts
                    token_ids += len(v)
                else:  # an input item: a message (its content), a content part, or a list of parts
                    if isinstance(v, dict):
                        v = v.get("content", [v])
                    c, i = _content_size(v)
                    chars, images = chars + c, images + i
    model = doc.get("model")
    return OpenAIRequest(
        model=model if isinstance(model, str) else "",
        estimated_input_tokens=math.ceil(chars / CHARS_PER_TOKEN) + overhead + token_ids + images * TOKENS_PER_IMAGE,
        max_tokens=_int_field(doc, "max_tokens", "max_completion_tokens", "max_output_tokens"),
        stream=doc.get("stream") is True,
        images=images,
    )


_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"  # JSON's


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def _members_before_cut(text: str) -> dict[str, Any] | None:
    """The members of the JSON object ``text`` begins that are whole before it is cut; ``None`` if no object begins.

    A member is taken once the ``,`` or ``}`` after it is in: a number at the cut may be the first
    digits of a longer one. The first member the cut falls in ends the reading (so does JSON that
    is malformed from there on: what comes after it is as unknown as what is past the cut).

    >>> _members_before_cut('{"model": "m", "max_tokens": 12')
    {'model': 'm'}
    >>> _members_before_cut('{"max_tokens": 128, "model": "m", "messages": [{"role": "user", "content": "hel')
    {'max_tokens': 128, 'model': 'm'}
    """
    i = _skip(text, 0)
    if i >= len(text) or text[i] != "{":
        return None
    out: dict[str, Any] = {}
    i += 1
    first = True
    while True:
        i = _skip(text, i)
        if i >= len(text) or text[i] == "}":
            return out
        if not first:
            if text[i] != ",":
                return out
            i = _skip(text, i + 1)
        first = False
        try:
            key, i = _DECODER.raw_decode(text, i)
            i = _skip(text, i)
            if not isinstance(key, str) or i >= len(text) or text[i] != ":":
                return out
            value, i = _DECODER.raw_decode(text, _skip(text, i + 1))
        except (ValueError, RecursionError):  # the cut falls in this member (RecursionError: nesting)
            return out
        if _skip(text, i) >= len(text):  # nothing after it yet: it may itself be cut
            return out
        out[key] = value


# An image sent inline as a base64 data URL, as the value of "url" (chat completions:
# {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}) or of "image_url" (the
# Responses API's {"type": "input_image", "image_url": "data:..."}); up to its closing quote, or up to
# the cut when the cut falls in it (even between an escape's two characters). The quotes around the
# key are bare, so a key-like text inside a JSON string (where every quote is escaped) does not match.
# A JSON writer may escape "/" as "\/".
_INLINE_IMAGE = re.compile(r'"(?:url|image_url)"\s*:\s*"(data:image/[A-Za-z0-9.+-]+;base64,'
                           r'(?:[A-Za-z0-9+/=]++|\\[/nr])*+)(?:"|\\?\Z)')


def inline_images(text: str) -> tuple[int, int]:
    r"""The inline base64 images in ``text`` (JSON, possibly cut): their data URLs' characters, and how many.

    >>> inline_images('{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
    ...               '{"url": "data:image/png;base64,iVBORw0KGgo="}}, {"type": "text", "text": "hi"}]}]}')
    (34, 1)
    >>> inline_images('{"input": [{"type": "input_image", "image_url": "data:image/jpeg;base64,/9j/4AAQ')  # cut
    (31, 1)
    >>> inline_images('{"content": "\\"url\\": \\"data:image/png;base64,AAAA\\""}')  # text that quotes one
    (0, 0)
    """
    sizes = [len(m.group(1)) for m in _INLINE_IMAGE.finditer(text)]
    return sum(sizes), len(sizes)


def _bytes_per_ascii_char(encoding: str) -> int:
    """What one ASCII character (all of base64) takes in the JSON encodings :func:`json.detect_encoding` names."""
    return 4 if "32" in encoding else 2 if "16" in encoding else 1


def parse_cut_request(prefix: bytes, body_bytes: int) -> OpenAIRequest | None:
    """What a JSON request body says when the proxy passed only its first bytes, ``prefix``, of ``body_bytes``.

    Envoy's ``BUFFERED_PARTIAL`` body mode does that for a body bigger than its buffer. The members
    whole before the cut are read as in a whole body (``model``, ``max_tokens``, ``stream``;
    :func:`_members_before_cut`); one the cut falls in, or past it, is unknown. The prompt is
    mostly past the cut, so the input-token estimate counts every byte of the whole body as a
    character of prompt: about what the whole body would get (for a text prompt, no less, as the
    JSON around each message outweighs its per-message overhead), so more bytes past the cut can
    never lower it. Except the inline base64 images in the part seen (:func:`inline_images`): the
    model server decodes them into images, which cost tokens by their pixel size, not by the length
    of their base64, so each is charged :data:`TOKENS_PER_IMAGE`, as in a whole body. Counted as
    text, a 3 MB photo (4 MB of base64) would be charged some 1,000,000 tokens, which a token quota
    would then deny. Images past the cut cannot be told from text, so they are charged as text.
    ``None`` when ``prefix`` does not begin a JSON object.

    Examples
    --------
    >>> r = parse_cut_request(b'{"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "xx', 4000)
    >>> (r.model, r.estimated_input_tokens, r.max_tokens, r.seen_bytes, r.body_bytes)
    ('m', 1000, 64, 77, 4000)
    """
    try:
        # As json.loads reads bytes (a UTF-8 BOM, UTF-16 or -32: what a backend in Python takes),
        # so no encoding can pass for "not JSON" and go uncharged. Incremental: a character the cut
        # split in two is left out, while a bad byte before the cut is an error.
        encoding = json.detect_encoding(prefix)
        decoder = codecs.getincrementaldecoder(encoding)("strict")
        text = decoder.decode(prefix, final=False)
    except UnicodeDecodeError:
        return None
    members = _members_before_cut(text)
    if members is None:
        return None
    seen = _request_of(members)
    chars, count = inline_images(text)
    images = chars * _bytes_per_ascii_char(encoding)
    # The images of members whole before the cut are in both counts: the larger estimate, not their sum.
    est = max(seen.estimated_input_tokens,
              math.ceil(max(0, body_bytes - images) / CHARS_PER_TOKEN) + count * TOKENS_PER_IMAGE)
    return replace(seen, estimated_input_tokens=est, seen_bytes=len(prefix), body_bytes=body_bytes,
                   body_read="partial", image_bytes=images, images=max(seen.images, count))


def unseen_request(body_bytes: int) -> OpenAIRequest:
    """The request whose body of ``body_bytes`` is decided on before any of it is seen.

    Envoy's ``STREAMED`` body mode sends the body only once the answer to the headers has let
    them go upstream, so the route is chosen on the headers. As for a cut body
    (:func:`parse_cut_request`), every byte of the body counts as a character of prompt; the model
    and the output budget are unknown (the model then comes from a header).

    >>> r = unseen_request(4000)
    >>> (r.estimated_input_tokens, r.max_tokens, r.seen_bytes, r.body_bytes, r.body_read)
    (1000, 0, 0, 4000, 'unseen')
    """
    return OpenAIRequest("", math.ceil(body_bytes / CHARS_PER_TOKEN), 0, False, body_bytes=body_bytes,
                         body_read="unseen")


DONE_EVENT = "data: [DONE]"
COMPLETED_EVENT = "response.completed"
_RESPONSES_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_RESPONSES_ENDS_QUOTED = tuple(f'"{e}"'.encode() for e in sorted(_RESPONSES_ENDS))


def terminal_event(path: str) -> str:
    """The event a stream from the API at ``path`` ends with ("" when that API is not known to have one).

    >>> [terminal_event(p) for p in ("/v1/chat/completions", "/v1/completions?x=1", "/v1/responses", "/generate")]
    ['data: [DONE]', 'data: [DONE]', 'response.completed', '']
    """
    p = path.split("?", 1)[0].rstrip("/")
    if p.endswith("/completions"):
        return DONE_EVENT
    if p.endswith("/responses"):
        return COMPLETED_EVENT
    return ""


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


def _usage_of(doc: Any) -> Usage | None:
    if not isinstance(doc, dict):
        return None
    u = doc.get("usage")
    if u is None and isinstance(doc.get("response"), dict):  # the Responses API: response.completed
        u = doc["response"].get("usage")
    if not isinstance(u, dict):
        return None
    p = u.get("prompt_tokens", u.get("input_tokens"))
    c = u.get("completion_tokens", u.get("output_tokens"))
    if not isinstance(p, int) or not isinstance(c, int):
        return None
    return Usage(max(0, p), max(0, c))


class UsageReader:
    """Incremental reader of ``usage`` from a response body, fed chunk by chunk.

    JSON bodies are buffered (up to ``max_json_bytes``) and parsed at the end; SSE streams are
    parsed line by line as they pass, so memory stays flat however long the stream.

    Parameters
    ----------
    sse
        Whether the response is ``text/event-stream``.
    max_json_bytes
        Bodies longer than this are not parsed (their usage is reported as unknown).
    terminal
        The event the stream should end with, from the request's API (:func:`terminal_event`);
        the events themselves decide when they show which kind of stream this is.

    Examples
    --------
    >>> r = UsageReader(sse=True)
    >>> r.feed(b'data: {"choices": [{"delta": {"content": "Hi"}}]}\\n\\ndata: {"choices": [], ')
    >>> r.feed(b'"usage": {"prompt_tokens": 7, "completion_tokens": 1}}\\n\\ndata: [DONE]\\n\\n')
    >>> r.result(), r.content_chunks
    (Usage(prompt_tokens=7, completion_tokens=1), 1)
    """

    def __init__(self, *, sse: bool, max_json_bytes: int = 4 << 20, terminal: str = "") -> None:
        self.sse = sse
        self.max_json_bytes = max_json_bytes
        self.content_chunks = 0
        # An error event in a stream that began with HTTP 200 (a generation that failed part way).
        self.error = ""
        self.terminal = terminal
        self._seen_kind = ""  # the terminal event of the kind of stream the events show
        self.finished = False  # its terminal event arrived
        self._buf = bytearray()
        self._overflow = False
        self._usage: Usage | None = None

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        if not self.sse:
            if len(self._buf) + len(chunk) > self.max_json_bytes:
                self._overflow = True
                self._buf.clear()
            elif not self._overflow:
                self._buf += chunk
            return
        self._buf += chunk
        end = self._buf.rfind(b"\n") + 1
        # Take the complete lines out of the buffer before parsing them, so a line that cannot be
        # parsed is gone either way and is never parsed again (by the next feed or by result()).
        lines = bytes(self._buf[:end])
        del self._buf[:end]
        if len(self._buf) > self.max_json_bytes:  # a line that never ends: drop it, not the process
            self._buf.clear()
        for line in lines.split(b"\n"):
            self._line(line.strip())

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        data = line[5:].strip()
        if data == b"[DONE]":
            self.finished = True
            return
        if not data:
            return
        if not self._seen_kind:  # the first event that shows which kind of stream this is
            if b'"choices"' in data:
                self._seen_kind = DONE_EVENT
            elif b'"type":"response.' in data or b'"type": "response.' in data:
                self._seen_kind = COMPLETED_EVENT
        has_usage = b'"usage"' in data and b"tokens" in data
        if b'"error"' in data or b'"response.failed"' in data:
            self._error_event(_loads(data))
        # Which events may end a Responses stream, found without parsing the deltas before them.
        may_end = self._seen_kind == COMPLETED_EVENT and any(e in data for e in _RESPONSES_ENDS_QUOTED)
        if not has_usage and not may_end:
            # Cheap path for the common chunk: count it without parsing JSON.
            if b'"choices"' in data and b'"choices":[]' not in data and b'"choices": []' not in data:
                self.content_chunks += 1
            return
        doc = _loads(data)
        if not isinstance(doc, dict):
            return
        if may_end and doc.get("type") in _RESPONSES_ENDS:
            self.finished = True
        if doc.get("choices"):
            self.content_chunks += 1
        u = _usage_of(doc)
        if u is not None:
            self._usage = u

    def _error_event(self, doc: Any) -> None:
        """Note an error event: ``{"error": ...}`` (vLLM, OpenAI) or a Responses API ``response.failed``."""
        if not isinstance(doc, dict):
            return
        err = doc.get("error")
        if err is None and doc.get("type") == "response.failed" and isinstance(doc.get("response"), dict):
            err = doc["response"].get("error") or "response.failed"
        if err is None or self.error:
            return
        message = err.get("message") if isinstance(err, dict) else err
        self.error = f"error event in the stream: {str(message or err)[:200]}"

    def unfinished(self) -> str:
        """Why a stream that has ended did not finish ("" when it did, or its kind has no terminal event).

        Read after :meth:`result`, which takes in a last line that had no newline. An error event
        already says what went wrong, so it is not repeated here.
        """
        expected = self._seen_kind or self.terminal
        if not self.sse or not expected or self.finished or self.error:
            return ""
        return f"stream ended without its terminal event ({expected})"

    def result(self) -> Usage | None:
        """The usage reported by the body, or ``None`` when it had none."""
        if self.sse:
            last = bytes(self._buf).strip()  # the stream's last line, when it ended without a newline
            self._buf.clear()
            if last:
                self._line(last)
            return self._usage
        if self._overflow or not self._buf:
            return None
        return _usage_of(_loads(bytes(self._buf)))
